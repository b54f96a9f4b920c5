#!/usr/bin/env python3
"""Python reference implementation of sluice's extractive question answering.

This script is the *oracle* for the Rust fidelity test: for every
(question, context) row of a CSV file it runs an extractive-QA ONNX model
(e.g. ``models/minilm-squad/model.onnx``) and writes the best answer span,
post-processed exactly like the Hugging Face ``transformers``
question-answering pipeline.

Usage::

    python scripts/reference_qa.py \\
        --model models/minilm-squad/model.onnx \\
        --tokenizer models/minilm-squad/tokenizer.json \\
        --input tests/data/squad_fidelity.csv \\
        --output /tmp/reference.jsonl \\
        [--max-seq-len 384 --doc-stride 128 --max-answer-len 30]

Input: a CSV file (read with the ``csv`` module) with the columns
``id, question, context``.

Output: JSON Lines, one object per input row, in input order::

    {"id": ..., "answer": ..., "start": ..., "end": ..., "score": ...}

where ``answer == context[start:end]`` and ``start``/``end`` are Python
``str`` indices (Unicode code points, not bytes) into the context.

Algorithm (per row)
-------------------
1. Tokenize the pair (question, context) with the ``tokenizers`` library:
   truncation ``only_second`` with ``max_length=max_seq_len`` and
   ``stride=doc_stride`` (``stride`` is the number of context tokens shared by
   consecutive windows), no padding. The windows are the main encoding
   followed by ``encoding.overflowing``, in that order (the order HF
   ``transformers`` uses with ``return_overflowing_tokens=True``).
2. Run every window *alone* through onnxruntime (batch of 1, no padding).
   ``token_type_ids`` is fed only if the model declares that input.
3. For each window, build ``p_mask`` (1 = token cannot be part of the answer):
   1 for every token whose sequence id is not 1 (question tokens, special
   tokens), except the CLS token at index 0, which gets 0. Then apply the
   pipeline's ``select_starts_ends`` (masked softmax over start and end logits,
   CLS included in the softmax and then zeroed) with ``top_k=1``,
   ``handle_impossible_answer=False`` and ``max_answer_len``, which calls
   ``decode_spans`` (best ``(s, e)`` with ``s <= e <= s + max_answer_len - 1``
   maximising ``p_start[s] * p_end[e]``).
4. Across windows keep the span with the highest score; on a tie the earlier
   window wins (the pipeline uses a stable sort).
5. Map tokens to characters as the pipeline's default ``align_to_words=True``
   does: widen the start and end tokens to their whole words
   (``token_to_word`` then ``word_to_chars`` on the context sequence), falling
   back to the token offsets; ``answer = context[start:end]``.

Dependencies: numpy, onnxruntime, tokenizers and (optionally) transformers,
whose ``select_starts_ends``/``decode_spans`` are used when importable; an
identical copy is used otherwise. torch is not needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_DOC_STRIDE = 128
DEFAULT_MAX_ANSWER_LEN = 30


# ---------------------------------------------------------------------------
# Span selection: copied verbatim (modulo docstrings) from
# transformers/pipelines/question_answering.py (transformers 4.x; the same
# functions live in pipelines/document_question_answering.py in 5.x).
# Used only if transformers is not importable.
# ---------------------------------------------------------------------------


def _decode_spans_fallback(
    start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired_tokens: np.ndarray
) -> tuple:
    """Best ``topk`` spans ``(s, e)`` with ``s <= e < s + max_answer_len`` by ``start[s] * end[e]``."""
    # Ensure we have batch axis
    if start.ndim == 1:
        start = start[None]

    if end.ndim == 1:
        end = end[None]

    # Compute the score of each tuple(start, end) to be the real answer
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))

    # Remove candidate with end < start and end - start > max_answer_len
    candidates = np.tril(np.triu(outer), max_answer_len - 1)

    #  Inspired by Chen & al. (https://github.com/facebookresearch/DrQA)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) <= topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]

    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]

    return starts, ends, scores


def _select_starts_ends_fallback(
    start,
    end,
    p_mask,
    attention_mask,
    min_null_score=1000000,
    top_k=1,
    handle_impossible_answer=False,
    max_answer_len=15,
):
    """Masked softmax of start/end logits, then :func:`_decode_spans_fallback`."""
    # Ensure padded tokens & question tokens cannot belong to the set of candidate answers.
    undesired_tokens = np.abs(np.array(p_mask) - 1)

    if attention_mask is not None:
        undesired_tokens = undesired_tokens & attention_mask

    # Generate mask
    undesired_tokens_mask = undesired_tokens == 0.0

    # Make sure non-context indexes in the tensor cannot contribute to the softmax
    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)

    # Normalize logits and spans to retrieve the answer
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()

    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()

    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())

    # Mask CLS
    start[0, 0] = end[0, 0] = 0.0

    starts, ends, scores = _decode_spans_fallback(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def _import_span_selection():
    """Return ``(select_starts_ends, source)``, preferring the transformers implementation."""
    for module in (
        "transformers.pipelines.question_answering",  # transformers 4.x
        "transformers.pipelines.document_question_answering",  # transformers 5.x
    ):
        try:
            mod = __import__(module, fromlist=["select_starts_ends", "decode_spans"])
            return mod.select_starts_ends, module
        except Exception:  # ImportError, or a broken optional dependency
            continue
    return _select_starts_ends_fallback, "reference_qa (built-in copy)"


select_starts_ends, SPAN_SELECTION_SOURCE = _import_span_selection()


# ---------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------


@dataclass
class Answer:
    """Best span for one (question, context) pair."""

    answer: str
    start: int  # Python str index into the context (inclusive)
    end: int  # Python str index into the context (exclusive)
    score: float


def load_tokenizer(path: str, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, doc_stride: int = DEFAULT_DOC_STRIDE) -> Tokenizer:
    """Load ``tokenizer.json`` and configure the sliding-window truncation used for QA."""
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_len, stride=doc_stride, strategy="only_second")
    return tokenizer


def load_session(path: str) -> ort.InferenceSession:
    """Create a CPU onnxruntime session (default thread settings)."""
    sess_options = ort.SessionOptions()
    return ort.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])


def windows_for(tokenizer: Tokenizer, question: str, context: str) -> List[Encoding]:
    """All windows of the pair: the main encoding first, then the overflowing ones."""
    encoding = tokenizer.encode(question, context)
    return [encoding] + list(encoding.overflowing)


def run_window(session: ort.InferenceSession, window: Encoding):
    """Run one window (batch of 1, unpadded). Returns ``(start_logits, end_logits)``, each ``[1, seq]``."""
    input_names = {i.name for i in session.get_inputs()}
    feeds = {
        "input_ids": np.asarray([window.ids], dtype=np.int64),
        "attention_mask": np.asarray([window.attention_mask], dtype=np.int64),
    }
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = np.asarray([window.type_ids], dtype=np.int64)
    start_logits, end_logits = session.run(["start_logits", "end_logits"], feeds)
    return start_logits, end_logits


def p_mask_for(window: Encoding) -> np.ndarray:
    """1 for tokens that cannot be in the answer (sequence id != 1), 0 for context tokens and CLS."""
    p_mask = np.asarray([0 if sid == 1 else 1 for sid in window.sequence_ids], dtype=np.int64)
    p_mask[0] = 0  # CLS (index 0) is kept, as in the pipeline
    return p_mask


def char_span(window: Encoding, s: int, e: int):
    """Character span of tokens s..e widened to whole words, as the pipeline's default
    ``align_to_words=True`` does (``get_indices``); token offsets when a token has no word."""
    try:
        start_word = window.token_to_word(s)
        end_word = window.token_to_word(e)
        return window.word_to_chars(start_word, sequence_index=1)[0], window.word_to_chars(end_word, sequence_index=1)[1]
    except Exception:
        return window.offsets[s][0], window.offsets[e][1]


def answer_question(
    session: ort.InferenceSession,
    tokenizer: Tokenizer,
    question: str,
    context: str,
    max_answer_len: int = DEFAULT_MAX_ANSWER_LEN,
) -> Answer:
    """Best answer span for one question over all windows of its context."""
    best: Optional[Answer] = None
    for window in windows_for(tokenizer, question, context):
        start_logits, end_logits = run_window(session, window)
        attention_mask = np.asarray([window.attention_mask], dtype=np.int64)
        starts, ends, scores, _ = select_starts_ends(
            start_logits,
            end_logits,
            p_mask_for(window),
            attention_mask,
            top_k=1,
            handle_impossible_answer=False,
            max_answer_len=max_answer_len,
        )
        for s, e, score in zip(starts, ends, scores):
            score = float(score)
            # Strictly greater: on a tie the earlier window wins.
            if best is None or score > best.score:
                start_char, end_char = char_span(window, int(s), int(e))
                best = Answer(context[start_char:end_char], start_char, end_char, score)
    if best is None:  # cannot happen with a non-empty context; kept for robustness
        best = Answer("", 0, 0, 0.0)
    return best


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def read_rows(path: str) -> Iterable[dict]:
    """Rows of the input CSV (columns id, question, context)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"id", "question", "context"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: missing column(s) {sorted(missing)}")
        yield from reader


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="ONNX model (inputs input_ids, attention_mask[, token_type_ids])")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--input", required=True, help="CSV with columns id, question, context")
    parser.add_argument("--output", required=True, help="JSON Lines output")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    parser.add_argument("--doc-stride", type=int, default=DEFAULT_DOC_STRIDE)
    parser.add_argument("--max-answer-len", type=int, default=DEFAULT_MAX_ANSWER_LEN)
    args = parser.parse_args(argv)

    session = load_session(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.max_seq_len, args.doc_stride)

    t0 = time.perf_counter()
    n = 0
    with open(args.output, "w", encoding="utf-8") as out:
        for row in read_rows(args.input):
            ans = answer_question(session, tokenizer, row["question"], row["context"], args.max_answer_len)
            record = {"id": row["id"], "answer": ans.answer, "start": ans.start, "end": ans.end, "score": ans.score}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    elapsed = time.perf_counter() - t0
    print(
        f"reference_qa: {n} rows in {elapsed:.2f}s ({SPAN_SELECTION_SOURCE}) -> {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
