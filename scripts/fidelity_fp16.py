#!/usr/bin/env python3
"""fp16 fidelity: do the fused fp16 QA model's answers match the fp32 model's on the fixed question set?

Usage::

    ~/.cache/sluice/venv/bin/python scripts/optimize_model.py     # makes ~/.cache/sluice/qa-gpu/*
    ~/.cache/sluice/venv/bin/python scripts/fidelity_fp16.py \\
        [--dir ~/.cache/sluice/qa-gpu] [--input tests/data/squad_fidelity.csv] \\
        [--provider cpu|cuda] [--min-agreement 98] [--no-int8] [--no-emulation]

Every row of ``--input`` (columns id, question, context) goes through the pipeline of
``scripts/reference_qa.py`` (same tokenizer, windows, span selection) once per model:

* ``fp32``: ``<dir>/model.fp32.onnx``, the int8 model dequantized by ``optimize_model.py``,
  unfused, always on the CPU. This is the reference.
* ``fp16``: ``<dir>/model.fp16.onnx``, the fused fp16 graph, exactly the file a GPU deployment
  would load, on ``--provider``. The check: the same answer text for at least ``--min-agreement``
  percent of the rows (default 98); every disagreement is listed with the question id, both answers
  and both scores; the exit status is 1 below the threshold.
* ``fp16-emulated`` (CPU only, unless ``--no-emulation``): see "What the CPU run checks". Reported
  and held to the same threshold.
* ``int8``: the shipped ``models/minilm-squad/model.onnx``, against fp32, for information only
  (never fails the run).

The largest absolute start/end logit difference from the fp32 reference over all windows is also
printed for each model.

What the CPU run checks
-----------------------
ONNX Runtime's CPU execution provider loads ``model.fp16.onnx`` but has fp16 kernels for only a few
of its ops. ONNX Runtime then inserts Cast nodes itself (its ``InsertCastTransformer``): with
onnxruntime 1.31.1 the 12 SkipLayerNormalization nodes run in fp16, while EmbedLayerNormalization,
the 6 Attention nodes, the 19 MatMul, the 6 BiasGelu and the final Add run in fp32 on the fp16
weights widened back to fp32, and the activations between two such fp32 nodes are never rounded to
fp16. So ``--provider cpu`` checks the fp16 conversion itself (the graph, every weight rounded to
fp16, the fp16 residual stream and layer norms), but not fp16 arithmetic inside attention
(Q/K/V, scores, softmax, context), the FFN's fp16 intermediate activations, or the CUDA kernels and
their accumulation order.

``fp16-emulated`` narrows that gap: the fused fp32 graph (``model.fused.fp32.onnx``, made from the
fp16 file's weights: every float initializer rounded to fp16) with *every* float tensor between
nodes rounded to fp16 (a Cast to fp16 and back after each node output), run on the CPU with graph
optimizations off so the casts stay. That reproduces fp16 storage of all weights and all
activations between nodes, but still computes inside each node in fp32: it is not the GPU's
arithmetic either.

The real check is ``--provider cuda`` on a machine with ``onnxruntime-gpu`` (``scripts/setup.sh
--gpu``; run with ``$SLUICE_CACHE/venv-gpu/bin/python``). The CUDA provider is then required: the
run fails rather than silently falling back to the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import reference_qa  # noqa: E402


class RecordingSession:
    """Wraps an InferenceSession for ``reference_qa``: same ``get_inputs``/``run``, and keeps the logits
    of every window so that two models can be compared window by window."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.logits: list[np.ndarray] = []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, output_names, feeds):
        outs = self.session.run(output_names, feeds)
        self.logits.append(np.concatenate([np.asarray(o, dtype=np.float32) for o in outs]))
        return outs


def make_session(model, provider: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit(
                "fidelity_fp16: --provider cuda needs onnxruntime-gpu with CUDA 13/cuDNN 9 "
                f"(this onnxruntime {ort.__version__} offers {ort.get_available_providers()}); "
                "install with scripts/setup.sh --gpu and run $SLUICE_CACHE/venv-gpu/bin/python"
            )
        s = ort.InferenceSession(model, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if s.get_providers()[0] != "CUDAExecutionProvider":
            sys.exit(f"fidelity_fp16: CUDA provider failed to load (session providers {s.get_providers()})")
        return s
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def emulated_fp16(fused_fp32: Path) -> tuple[bytes, ort.SessionOptions]:
    """The fused fp32 graph with every float initializer rounded to fp16 precision and every float
    node output rounded to fp16 (Cast to fp16 then back to fp32); graph optimizations disabled.
    Needs onnx and sympy (``scripts/setup.sh --models``); the --provider cuda run needs neither."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    m = onnx.load(str(fused_fp32))
    g = m.graph
    for k, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            g.initializer[k].CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    # Types of every value, com.microsoft fused ops included (ONNX's own inference skips those).
    typed = SymbolicShapeInference.infer_shapes(m, auto_merge=True)
    float_values = {
        v.name
        for v in list(typed.graph.value_info) + list(typed.graph.output)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    total = sum(1 for n in g.node for o in n.output if o)
    nodes = []
    rounded = 0
    for n in g.node:
        renamed = {}
        for k, o in enumerate(n.output):
            if o in float_values:
                renamed[o] = f"{o}__fp32_unrounded"
                n.output[k] = renamed[o]
        nodes.append(n)
        for o, raw in renamed.items():
            half = f"{o}__fp16"
            nodes.append(helper.make_node("Cast", [raw], [half], to=TensorProto.FLOAT16))
            nodes.append(helper.make_node("Cast", [half], [o], to=TensorProto.FLOAT))
            rounded += 1
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    print(f"fidelity_fp16: fp16-emulated rounds {rounded} of {total} node outputs to fp16 (the others are integers)")
    return m.SerializeToString(), so


def run_all(session, tokenizer, rows, max_answer_len):
    rec = RecordingSession(session)
    t0 = time.perf_counter()
    answers = [reference_qa.answer_question(rec, tokenizer, r["question"], r["context"], max_answer_len) for r in rows]
    return answers, rec.logits, time.perf_counter() - t0


def compare(name, rows, ref, ref_logits, got, got_logits, min_agreement=None) -> bool:
    same = [a.answer == b.answer for a, b in zip(ref, got)]
    same_span = sum(a.start == b.start and a.end == b.end for a, b in zip(ref, got))
    pct = 100.0 * sum(same) / len(rows)
    dmax = max(float(np.max(np.abs(a - b))) for a, b in zip(ref_logits, got_logits))
    dscore = max(abs(a.score - b.score) for a, b in zip(ref, got))
    ok = min_agreement is None or pct >= min_agreement
    verdict = "" if min_agreement is None else (f" (>= {min_agreement}%: ok)" if ok else f" (< {min_agreement}%: FAIL)")
    print(
        f"{name} vs fp32: same answer text {sum(same)}/{len(rows)} = {pct:.2f}%{verdict}; same span {same_span}; "
        f"max |logit diff| {dmax:.4f} over {len(ref_logits)} windows; max |score diff| {dscore:.4f}"
    )
    for r, a, b, s in zip(rows, ref, got, same):
        if not s:
            print(f"  {r['id']}: fp32 {a.answer!r} ({a.score:.4f})  vs  {name} {b.answer!r} ({b.score:.4f})")
    return ok


def main(argv=None) -> int:
    cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(cache / "qa-gpu"), help="optimize_model.py's output folder")
    p.add_argument("--fp32", default=None, help="reference model (default <dir>/model.fp32.onnx)")
    p.add_argument("--fp16", default=None, help="model under test (default <dir>/model.fp16.onnx)")
    p.add_argument("--fused-fp32", default=None, help="for fp16-emulated (default <dir>/model.fused.fp32.onnx)")
    p.add_argument("--int8", default=str(REPO / "models/minilm-squad/model.onnx"))
    p.add_argument("--tokenizer", default=str(REPO / "models/minilm-squad/tokenizer.json"))
    p.add_argument("--input", default=str(REPO / "tests/data/squad_fidelity.csv"))
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="where the fp16 model runs")
    p.add_argument("--min-agreement", type=float, default=98.0, help="percent of same answer text required")
    p.add_argument("--max-seq-len", type=int, default=reference_qa.DEFAULT_MAX_SEQ_LEN)
    p.add_argument("--doc-stride", type=int, default=reference_qa.DEFAULT_DOC_STRIDE)
    p.add_argument("--max-answer-len", type=int, default=reference_qa.DEFAULT_MAX_ANSWER_LEN)
    p.add_argument("--no-int8", action="store_true", help="skip the informational int8 comparison")
    p.add_argument("--no-emulation", action="store_true", help="skip fp16-emulated (CPU)")
    args = p.parse_args(argv)

    d = Path(args.dir).expanduser()
    fp32 = Path(args.fp32) if args.fp32 else d / "model.fp32.onnx"
    fp16 = Path(args.fp16) if args.fp16 else d / "model.fp16.onnx"
    fused = Path(args.fused_fp32) if args.fused_fp32 else d / "model.fused.fp32.onnx"
    for f in (fp32, fp16):
        if not f.exists():
            sys.exit(f"fidelity_fp16: {f} is missing; make it with scripts/optimize_model.py")

    if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        make_session(str(fp16), "cuda")  # exits with the explanation before the long fp32 run
    t_start = time.perf_counter()
    tokenizer = reference_qa.load_tokenizer(args.tokenizer, args.max_seq_len, args.doc_stride)
    rows = list(reference_qa.read_rows(args.input))
    print(f"fidelity_fp16: {len(rows)} rows of {args.input}; onnxruntime {ort.__version__}; "
          f"fp16 on {args.provider}; span selection {reference_qa.SPAN_SELECTION_SOURCE}")

    ref, ref_logits, t = run_all(make_session(str(fp32), "cpu"), tokenizer, rows, args.max_answer_len)
    print(f"fp32 ({fp32}, CPU): {t:.1f}s")

    s16 = make_session(str(fp16), args.provider)
    got, got_logits, t = run_all(s16, tokenizer, rows, args.max_answer_len)
    print(f"fp16 ({fp16}, {s16.get_providers()[0]}): {t:.1f}s")
    ok = compare("fp16", rows, ref, ref_logits, got, got_logits, args.min_agreement)

    if args.provider == "cpu" and not args.no_emulation:
        if fused.exists():
            data, so = emulated_fp16(fused)
            s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            emu, emu_logits, t = run_all(s, tokenizer, rows, args.max_answer_len)
            print(f"fp16-emulated ({fused} + fp16 rounding, CPU): {t:.1f}s")
            ok = compare("fp16-emulated", rows, ref, ref_logits, emu, emu_logits, args.min_agreement) and ok
        else:
            print(f"fidelity_fp16: {fused} is missing (optimize_model.py --no-fused-fp32?): no fp16-emulated run")

    if not args.no_int8:
        i8, i8_logits, t = run_all(make_session(args.int8, "cpu"), tokenizer, rows, args.max_answer_len)
        print(f"int8 ({args.int8}, CPU): {t:.1f}s  [information only]")
        compare("int8", rows, ref, ref_logits, i8, i8_logits)

    print(f"fidelity_fp16: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - t_start:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
