#!/usr/bin/env python3
"""Make the GPU variants of an extractive-QA ONNX model: dequantized fp32, fused fp32 and fused fp16.

Usage::

    scripts/setup.sh --models            # once: installs onnx and sympy into ~/.cache/sluice/venv
    ~/.cache/sluice/venv/bin/python scripts/optimize_model.py \\
        [--model models/minilm-squad/model.onnx] [--tokenizer models/minilm-squad/tokenizer.json] \\
        [--out ~/.cache/sluice/qa-gpu] [--num-heads 12] [--hidden-size 384] [--no-fused-fp32]

Steps:

1. Dequantize. If the model is dynamically quantized (``DynamicQuantizeLinear`` +
   ``MatMulInteger``, or ``DequantizeLinear`` of a constant), rewrite it to a plain fp32 graph:

   * every ``DynamicQuantizeLinear(X) -> MatMulInteger(Xq, Wq, x_zp, w_zp) -> Cast -> Mul(x_scale *
     w_scale)`` chain becomes one ``MatMul(X, W)`` with ``W = (Wq - w_zp) * w_scale`` computed in
     numpy (per-tensor or per-output-channel scales);
   * ``DequantizeLinear`` of an initializer becomes that fp32 initializer, and
     ``DequantizeLinear(Gather(Wq, ids))`` (quantized embedding tables) becomes
     ``Gather(dequantized Wq, ids)``.

   The result is checked with ``onnx.checker`` and run next to the quantized model on real windows
   of the fidelity question set; the largest absolute start/end logit difference is printed.
   The weights are the int8 weights, exactly, in fp32: this is *not* the fp32 model the int8 one was
   quantized from (that one is not needed and not recovered), only the int8 model without activation
   quantization. Written to ``<out>/model.fp32.onnx``. A model that is not quantized is copied as is.

2. Fuse with ONNX Runtime's transformers optimizer (``model_type="bert"``, ``use_gpu=True``):
   EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu. ONNX Runtime's basic
   (execution-provider independent) graph optimizations are run first on the CPU, which is what
   ``optimize_model``'s default ``opt_level=1`` would do, without its need for torch and a GPU.
   Written to ``<out>/model.fused.fp32.onnx`` (skip with ``--no-fused-fp32``).

3. Convert the fused graph to fp16 with fp32 inputs and outputs (``keep_io_types=True``):
   ``<out>/model.fp16.onnx``, the model for ONNX Runtime's CUDA execution provider.

``tokenizer.json`` is copied next to the models. The output folder defaults to
``$SLUICE_CACHE/qa-gpu`` (``SLUICE_CACHE`` defaults to ``~/.cache/sluice``).

Requires numpy, onnx, onnxruntime (CPU is enough), sympy (symbolic shape inference for the fp16
conversion) and tokenizers; ``scripts/setup.sh --models`` installs them. Nothing is installed here.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP_HINT = "scripts/setup.sh --models"


def require(module: str, package: str):
    """Import ``module`` or exit with a message naming the PyPI ``package`` and the setup command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        sys.exit(
            f"optimize_model: the Python package '{package}' is missing ({e}).\n"
            f"Install it with: {SETUP_HINT}   (then run this script with $SLUICE_CACHE/venv/bin/python,\n"
            f"by default ~/.cache/sluice/venv/bin/python)"
        )


np = require("numpy", "numpy")
onnx = require("onnx", "onnx")
ort = require("onnxruntime", "onnxruntime")
require("sympy", "sympy")
require("tokenizers", "tokenizers")
from onnx import helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import reference_qa  # noqa: E402

FUSED_OPS = [
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "MatMul",
    "Cast",
]


def default_out() -> Path:
    return Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice")) / "qa-gpu"


# ---------------------------------------------------------------------------
# Step 1: dequantize
# ---------------------------------------------------------------------------


def is_quantized(model) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear", "QLinearMatMul"})


def dequantize(model):
    """Return ``(fp32 model, stats)``; see the module docstring for the rewrites. Raises on patterns it
    does not know, rather than leaving a half-quantized graph."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # work on a copy
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    def const(name):
        """numpy value of an initializer or Constant node output, or None."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    new_inits: dict[str, np.ndarray] = {}
    remove: set[int] = set()  # id() of nodes to drop
    replace: dict[int, onnx.NodeProto] = {}  # id(node) -> node put in its place
    stats = collections.Counter()

    def fresh(name):
        base, k = name, 0
        while name in inits or name in new_inits:
            k += 1
            name = f"{base}_{k}"
        return name

    def only_consumer(name, op_type):
        c = consumers.get(name, [])
        if len(c) != 1 or c[0].op_type != op_type:
            raise ValueError(f"{name}: expected a single {op_type} consumer, found {[x.op_type for x in c]}")
        return c[0]

    for node in g.node:
        if node.op_type == "MatMulInteger":
            a, b = node.input[0], node.input[1]
            a_zp = node.input[2] if len(node.input) > 2 else ""
            b_zp = node.input[3] if len(node.input) > 3 else ""
            wq = const(b)
            dql = producer.get(a)
            if wq is None or dql is None or dql.op_type != "DynamicQuantizeLinear":
                raise ValueError(f"{node.name}: MatMulInteger that is not DynamicQuantizeLinear(X) x constant")
            if a_zp and a_zp != dql.output[2]:
                raise ValueError(f"{node.name}: activation zero point is not the DynamicQuantizeLinear one")
            x, x_scale = dql.input[0], dql.output[1]
            cast = only_consumer(node.output[0], "Cast")
            mul = only_consumer(cast.output[0], "Mul")
            scale_in = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
            # The combined scale: x_scale * w_scale, either a Mul node or (rarely) folded away.
            sp = producer.get(scale_in)
            if sp is None or sp.op_type != "Mul" or x_scale not in sp.input:
                raise ValueError(f"{node.name}: output scale is not Mul(x_scale, w_scale)")
            w_scale = const(sp.input[1] if sp.input[0] == x_scale else sp.input[0])
            if w_scale is None:
                raise ValueError(f"{node.name}: weight scale is not a constant")
            w_zp = const(b_zp) if b_zp else np.zeros((), dtype=wq.dtype)
            if wq.ndim != 2:
                raise ValueError(f"{node.name}: weight of rank {wq.ndim}, expected 2")
            # Per-tensor scale/zero point broadcast as is; per-channel ones are per output column.
            w = (wq.astype(np.float32) - w_zp.astype(np.float32).reshape(-1 if w_zp.size > 1 else ())) * w_scale.astype(
                np.float32
            ).reshape(-1 if w_scale.size > 1 else ())
            wname = b[: -len("_quantized")] if b.endswith("_quantized") else b + "_dequantized"
            wname = fresh(wname)
            new_inits[wname] = w.astype(np.float32)
            mm = helper.make_node("MatMul", [x, wname], [mul.output[0]], name=node.name.replace("_quant", "") or None)
            replace[id(mul)] = mm
            remove.update({id(node), id(cast)})
            stats["MatMulInteger -> MatMul"] += 1
        elif node.op_type == "DequantizeLinear":
            q, scale_name = node.input[0], node.input[1]
            zp_name = node.input[2] if len(node.input) > 2 else ""
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            scale = const(scale_name)
            zp = const(zp_name) if zp_name else None
            if scale is None or (zp_name and zp is None):
                raise ValueError(f"{node.name}: DequantizeLinear with a non-constant scale or zero point")

            def deq(t):
                s, z = scale.astype(np.float32), (zp.astype(np.float32) if zp is not None else np.float32(0))
                if s.size > 1:  # per-axis
                    shape = [1] * t.ndim
                    shape[axis % t.ndim] = -1
                    s, z = s.reshape(shape), (z.reshape(shape) if np.ndim(z) else z)
                return ((t.astype(np.float32) - z) * s).astype(np.float32)

            tq = const(q)
            if tq is not None:  # DequantizeLinear(constant) -> fp32 constant
                name = fresh(q[: -len("_quantized")] if q.endswith("_quantized") else q + "_dequantized")
                new_inits[name] = deq(tq)
                # Consumers read the DequantizeLinear output: keep its name with an Identity-free rename.
                for c in consumers[node.output[0]]:
                    for k, i in enumerate(c.input):
                        if i == node.output[0]:
                            c.input[k] = name
                for o in g.output:
                    if o.name == node.output[0]:
                        raise ValueError("DequantizeLinear output is a graph output")
                remove.add(id(node))
                stats["DequantizeLinear(constant) -> constant"] += 1
                continue
            gather = producer.get(q)
            table = const(gather.input[0]) if gather is not None and gather.op_type == "Gather" else None
            if table is None or len(consumers[q]) != 1:
                raise ValueError(f"{node.name}: DequantizeLinear of a non-constant that is not Gather(constant)")
            if scale.size > 1:
                raise ValueError(f"{node.name}: per-axis DequantizeLinear after Gather is not supported")
            # Gather then dequantize (per-tensor, elementwise) == dequantize the table, then gather.
            name = gather.input[0]
            name = fresh(name[: -len("_quantized")] if name.endswith("_quantized") else name + "_dequantized")
            new_inits[name] = deq(table)
            new_gather = helper.make_node("Gather", [name, gather.input[1]], [node.output[0]], name=gather.name)
            new_gather.attribute.extend(gather.attribute)
            replace[id(node)] = new_gather
            remove.add(id(gather))
            stats["DequantizeLinear(Gather(constant)) -> Gather(fp32 constant)"] += 1
        elif node.op_type in ("QLinearMatMul", "QuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
            raise ValueError(f"{node.name}: {node.op_type} is not supported by this rewrite")

    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes.append(replace[id(n)])
        elif id(n) not in remove:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for name, arr in new_inits.items():
        g.initializer.append(numpy_helper.from_array(arr, name))
    stats.update(prune(model))
    left = {n.op_type for n in g.node} & {"DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear"}
    if left:
        raise ValueError(f"quantized nodes left after the rewrite: {sorted(left)}")
    # Shapes recorded for the quantized graph's intermediate values may be stale: drop them.
    del g.value_info[:]
    return model, stats


def prune(model) -> collections.Counter:
    """Remove nodes whose outputs nothing reads (repeatedly), then unused initializers."""
    g = model.graph
    stats = collections.Counter()
    outputs = {o.name for o in g.output}
    while True:
        used = set(outputs)
        for n in g.node:
            used.update(n.input)
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            stats[f"removed {n.op_type}"] += 1
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    stats["removed initializers"] += len(g.initializer) - len(keep)
    del g.initializer[:]
    g.initializer.extend(keep)
    return stats


# ---------------------------------------------------------------------------
# Checks on real windows
# ---------------------------------------------------------------------------


def sample_windows(tokenizer_path: str, csv_path: str, rows: int):
    tokenizer = reference_qa.load_tokenizer(tokenizer_path)
    windows = []
    for k, row in enumerate(reference_qa.read_rows(csv_path)):
        if k >= rows:
            break
        windows.extend(reference_qa.windows_for(tokenizer, row["question"], row["context"]))
    return windows


def session(path: str, providers=("CPUExecutionProvider",)):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so, providers=list(providers))


def max_logit_diff(path_a: str, path_b: str, windows, providers_b=("CPUExecutionProvider",)) -> float:
    a, b = session(path_a), session(path_b, providers_b)
    worst = 0.0
    for w in windows:
        la = np.concatenate(reference_qa.run_window(a, w))
        lb = np.concatenate(reference_qa.run_window(b, w)).astype(np.float32)
        worst = max(worst, float(np.max(np.abs(la - lb))))
    return worst


# ---------------------------------------------------------------------------
# Steps 2 and 3: fuse, fp16
# ---------------------------------------------------------------------------


def infer_hidden_size(model) -> int | None:
    """Width of the word-embedding table (the first Gather of a 2-D initializer by input_ids)."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits:
            dims = list(inits[n.input[0]].dims)
            if len(dims) == 2:
                return int(dims[1])
    return None


def ort_basic_optimize(src: Path, dst: Path):
    """ONNX Runtime's basic graph optimizations (constant folding, redundant node elimination), which
    do not depend on the execution provider, run on the CPU; the result is saved to ``dst``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["ConstantSharing"])


def op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models/minilm-squad/model.onnx"), help="QA ONNX model (int8 or fp32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: next to --model)")
    p.add_argument("--out", default=None, help="output folder (default: $SLUICE_CACHE/qa-gpu, ~/.cache/sluice/qa-gpu)")
    p.add_argument("--num-heads", type=int, default=12, help="attention heads (default 12, MiniLM-L6)")
    p.add_argument("--hidden-size", type=int, default=None,
                   help="hidden size (default: the word-embedding width, else 384)")
    p.add_argument("--check-csv", default=str(REPO / "tests/data/squad_fidelity.csv"),
                   help="CSV (id,question,context) whose first --check-rows rows give the check windows")
    p.add_argument("--check-rows", type=int, default=8)
    p.add_argument("--no-ort-basic", action="store_true",
                   help="skip ONNX Runtime's basic graph optimizations before the fusion")
    p.add_argument("--no-fused-fp32", action="store_true", help="do not keep model.fused.fp32.onnx")
    args = p.parse_args(argv)

    src = Path(args.model)
    tok = Path(args.tokenizer) if args.tokenizer else src.parent / "tokenizer.json"
    out = Path(args.out).expanduser() if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    fp32_path, fused_path, fp16_path = out / "model.fp32.onnx", out / "model.fused.fp32.onnx", out / "model.fp16.onnx"
    windows = sample_windows(str(tok), args.check_csv, args.check_rows) if tok.exists() else []
    print(f"optimize_model: onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
          f"{len(windows)} check windows from the first {args.check_rows} rows of {args.check_csv}")

    # Step 1
    t0 = time.perf_counter()
    model = onnx.load(str(src))
    if is_quantized(model):
        fp32, stats = dequantize(model)
        onnx.checker.check_model(fp32, full_check=True)
        onnx.save(fp32, str(fp32_path))
        print(f"[1] dequantized {src} -> {fp32_path} ({fp32_path.stat().st_size:,} bytes, "
              f"{time.perf_counter() - t0:.1f}s); onnx.checker: ok")
        for k, v in sorted(stats.items()):
            print(f"      {k}: {v}")
        if windows:
            d = max_logit_diff(str(src), str(fp32_path), windows)
            print(f"      max |logit(fp32 dequantized) - logit(int8)| over {len(windows)} windows: {d:.4f}")
    else:
        fp32 = model
        shutil.copyfile(src, fp32_path)
        print(f"[1] {src} is not quantized: copied to {fp32_path}")

    # Step 2
    hidden = args.hidden_size or infer_hidden_size(fp32) or 384
    if hidden % args.num_heads:
        sys.exit(f"optimize_model: hidden size {hidden} is not a multiple of {args.num_heads} heads")
    from onnxruntime.transformers.optimizer import optimize_model  # needs onnx (and sympy for fp16)

    t0 = time.perf_counter()
    fusion_input = fp32_path
    if not args.no_ort_basic:
        fusion_input = out / "model.basic.tmp.onnx"
        ort_basic_optimize(fp32_path, fusion_input)
    # The dequantized graph keeps the quantizer's producer name ("onnx.quantize"), about which the
    # optimizer warns ("Model producer not matched"): the graph is still the PyTorch export's.
    logging.getLogger("onnxruntime.transformers.optimizer").addFilter(
        lambda r: "producer not matched" not in r.getMessage())
    opt = optimize_model(str(fusion_input), model_type="bert", num_heads=args.num_heads, hidden_size=hidden,
                         opt_level=0, use_gpu=True)
    if fusion_input != fp32_path:
        fusion_input.unlink()
    counts = op_counts(opt.model)
    print(f"[2] fused (num_heads={args.num_heads}, hidden_size={hidden}, {time.perf_counter() - t0:.1f}s):")
    print("      " + ", ".join(f"{op} {counts.get(op, 0)}" for op in FUSED_OPS))
    print("      all ops: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
        print("      WARNING: no attention fusion: check --num-heads/--hidden-size", file=sys.stderr)
    opt.save_model_to_file(str(fused_path))
    if windows:
        d = max_logit_diff(str(fp32_path), str(fused_path), windows)
        print(f"      {fused_path} ({fused_path.stat().st_size:,} bytes); "
              f"max |logit(fused fp32) - logit(fp32)|: {d:.2e}")

    # Step 3
    t0 = time.perf_counter()
    opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(fp16_path))
    c16 = op_counts(opt.model)
    print(f"[3] fp16 -> {fp16_path} ({fp16_path.stat().st_size:,} bytes, {time.perf_counter() - t0:.1f}s; "
          f"Cast {c16.get('Cast', 0)})")
    if windows:
        try:
            d = max_logit_diff(str(fp32_path), str(fp16_path), windows)
            print(f"      max |logit(fp16, CPU EP) - logit(fp32)|: {d:.4f}")
        except Exception as e:  # the CPU EP may lack fp16 kernels for some fused ops
            print(f"      the CPU execution provider cannot run the fp16 model: {e}".splitlines()[0])
    if args.no_fused_fp32:
        fused_path.unlink()

    if tok.exists():
        shutil.copyfile(tok, out / "tokenizer.json")
    print(f"optimize_model: done; files in {out}:")
    for f in sorted(out.iterdir()):
        print(f"      {f.name:28s} {f.stat().st_size:>12,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
