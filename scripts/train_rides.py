#!/usr/bin/env python3
"""Train the ride-duration model and export it to ONNX.

Pipeline (scikit-learn)::

    ColumnTransformer(
        OneHotEncoder(handle_unknown="ignore") on [PULocationID, DOLocationID],
        "passthrough"                          on [trip_distance],
    ) -> Ridge(alpha=1.0)

Data: synthetic rides from ``scripts/ride_generator.py`` (see its docstring for
the exact formula).  Training, metric evaluation and parity sets use distinct
seeds.

Artifacts written (relative to the repository root):

* ``models/rides/model.onnx``      -- ONNX model with three inputs
  ``PULocationID`` int64 [N,1], ``DOLocationID`` int64 [N,1],
  ``trip_distance`` float32 [N,1] and one output ``duration`` float32 [N,1].
* ``models/rides/parity.jsonl``    -- held-out rides with sklearn's prediction
  (``expected_duration``, float64 printed with full precision).
* ``models/rides/MODEL_CARD.md``   -- provenance, metrics, interface.
* ``tests/data/rides_sample.jsonl`` -- 200 rides with ids + 5 malformed lines.

The script checks that onnxruntime reproduces sklearn's predictions on the
parity rows within ``--tolerance`` (default 1e-4) and exits non-zero otherwise.

Usage (from the repository root)::

    ~/.cache/sluice/train-venv/bin/python scripts/train_rides.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

import onnx
import onnxruntime as ort
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import ride_generator  # noqa: E402

ZONE_COLS = ["PULocationID", "DOLocationID"]
NUM_COLS = ["trip_distance"]
INPUTS = ZONE_COLS + NUM_COLS
OUTPUT_NAME = "duration"


def to_frame(rides: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rides)
    df["PULocationID"] = df["PULocationID"].astype(np.int64)
    df["DOLocationID"] = df["DOLocationID"].astype(np.int64)
    df["trip_distance"] = df["trip_distance"].astype(np.float64)
    return df


def onnx_feeds(df: pd.DataFrame) -> dict:
    return {
        "PULocationID": df["PULocationID"].to_numpy(np.int64).reshape(-1, 1),
        "DOLocationID": df["DOLocationID"].to_numpy(np.int64).reshape(-1, 1),
        "trip_distance": df["trip_distance"].to_numpy(np.float32).reshape(-1, 1),
    }


def build_pipeline(alpha: float) -> Pipeline:
    pre = ColumnTransformer(
        [
            ("zones", OneHotEncoder(handle_unknown="ignore"), ZONE_COLS),
            ("dist", "passthrough", NUM_COLS),
        ]
    )
    return Pipeline([("pre", pre), ("reg", Ridge(alpha=alpha))])


def export_onnx(pipe: Pipeline, opset: int, ml_opset: int) -> onnx.ModelProto:
    initial_types = [
        ("PULocationID", Int64TensorType([None, 1])),
        ("DOLocationID", Int64TensorType([None, 1])),
        ("trip_distance", FloatTensorType([None, 1])),
    ]
    final_types = [(OUTPUT_NAME, FloatTensorType([None, 1]))]
    model = convert_sklearn(
        pipe,
        name="sluice_ride_duration",
        initial_types=initial_types,
        final_types=final_types,
        target_opset={"": opset, "ai.onnx.ml": ml_opset},
    )
    model.producer_name = "skl2onnx"
    model.doc_string = (
        "Ride duration (minutes) from PULocationID, DOLocationID, trip_distance. "
        "Trained on synthetic rides from scripts/ride_generator.py; see MODEL_CARD.md."
    )
    onnx.checker.check_model(model)
    return model


def describe_io(model: onnx.ModelProto) -> tuple[list, list]:
    def dims(t):
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                for d in t.type.tensor_type.shape.dim]

    def dtype(t):
        return onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type).lower()

    ins = [(i.name, dtype(i), dims(i)) for i in model.graph.input]
    outs = [(o.name, dtype(o), dims(o)) for o in model.graph.output]
    return ins, outs


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    err = y_pred - y_true
    rmse = float(math.sqrt(np.mean(err ** 2)))
    mae = float(np.mean(np.abs(err)))
    ss_res = float(np.sum(err ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    return {"rmse": rmse, "mae": mae, "r2": 1.0 - ss_res / ss_tot}


def write_sample(path: Path, n: int, seed: int) -> list[str]:
    """200 valid rides (inputs + id) followed by 5 deliberately bad lines."""
    rides = ride_generator.generate(n, seed)
    lines = []
    for i, r in enumerate(rides, start=1):
        rec = {"id": f"ride-{i:06d}"}
        rec.update({k: r[k] for k in INPUTS})
        lines.append(json.dumps(rec))
    base = {k: rides[0][k] for k in INPUTS}
    bad = [
        # 1. not JSON at all
        "this is not json {",
        # 2. missing field (no trip_distance)
        json.dumps({"id": f"ride-{n + 2:06d}", "PULocationID": base["PULocationID"],
                    "DOLocationID": base["DOLocationID"]}),
        # 3. wrongly typed field: PULocationID is a non-numeric string
        json.dumps({"id": f"ride-{n + 3:06d}", "PULocationID": "abc",
                    "DOLocationID": base["DOLocationID"],
                    "trip_distance": base["trip_distance"]}),
        # 4. empty object
        "{}",
        # 5. trip_distance as a numeric-looking string
        json.dumps({"id": f"ride-{n + 5:06d}", "PULocationID": base["PULocationID"],
                    "DOLocationID": base["DOLocationID"], "trip_distance": "3.2"}),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + bad) + "\n")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train + export the ride-duration model")
    p.add_argument("--n-train", type=int, default=200_000)
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--n-test", type=int, default=50_000)
    p.add_argument("--test-seed", type=int, default=2)
    p.add_argument("--n-parity", type=int, default=1_000)
    p.add_argument("--parity-seed", type=int, default=3)
    p.add_argument("--n-sample", type=int, default=200)
    p.add_argument("--sample-seed", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--ml-opset", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--out-dir", default=str(ROOT / "models" / "rides"))
    p.add_argument("--sample-out", default=str(ROOT / "tests" / "data" / "rides_sample.jsonl"))
    args = p.parse_args(argv)

    seeds = {args.train_seed, args.test_seed, args.parity_seed}
    if len(seeds) != 3:
        sys.exit("train/test/parity seeds must be distinct")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data -----------------------------------------------------------
    print(f"generating {args.n_train} training rides (seed={args.train_seed})", flush=True)
    train = to_frame(ride_generator.generate(args.n_train, args.train_seed))
    test = to_frame(ride_generator.generate(args.n_test, args.test_seed))
    parity = to_frame(ride_generator.generate(args.n_parity, args.parity_seed))

    # ---- train ----------------------------------------------------------
    pipe = build_pipeline(args.alpha)
    pipe.fit(train[INPUTS], train["duration"].to_numpy())
    reg = pipe.named_steps["reg"]
    dist_coef = float(reg.coef_[-1])
    print(f"trained: intercept={reg.intercept_:.4f} trip_distance coef={dist_coef:.4f}")

    y_test = test["duration"].to_numpy()
    pred_test = pipe.predict(test[INPUTS])
    m_sklearn = metrics(y_test, pred_test)
    m_baseline = metrics(y_test, np.full_like(y_test, train["duration"].mean()))
    m_train = metrics(train["duration"].to_numpy(), pipe.predict(train[INPUTS]))
    print(f"held-out (n={args.n_test}, seed={args.test_seed}) sklearn: {m_sklearn}")
    print(f"held-out baseline (predict train mean): {m_baseline}")

    # ---- export ---------------------------------------------------------
    model = export_onnx(pipe, args.opset, args.ml_opset)
    model_path = out_dir / "model.onnx"
    model_path.write_bytes(model.SerializeToString())
    size = model_path.stat().st_size
    ins, outs = describe_io(model)
    print(f"wrote {model_path} ({size} bytes); inputs={ins} outputs={outs}")

    expected_inputs = [("PULocationID", "int64"), ("DOLocationID", "int64"),
                       ("trip_distance", "float")]
    if [(n, t) for n, t, _ in ins] != expected_inputs or [o[0] for o in outs] != [OUTPUT_NAME]:
        sys.exit(f"FAIL: unexpected ONNX signature inputs={ins} outputs={outs}")

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    # ---- parity ---------------------------------------------------------
    expected = pipe.predict(parity[INPUTS])
    got = sess.run([OUTPUT_NAME], onnx_feeds(parity))[0]
    if got.shape != (len(parity), 1) or got.dtype != np.float32:
        sys.exit(f"FAIL: onnx output has shape {got.shape} dtype {got.dtype}")
    diff = np.abs(got[:, 0].astype(np.float64) - expected)
    max_diff = float(diff.max())
    print(f"parity: max |onnx - sklearn| over {len(parity)} rows = {max_diff:.3g}")
    if not np.all(diff <= args.tolerance):
        bad = int(np.argmax(diff))
        sys.exit(f"FAIL: parity row {bad} differs by {diff[bad]} > {args.tolerance}: "
                 f"sklearn={expected[bad]!r} onnx={got[bad, 0]!r}")

    # metrics of the exported model on the held-out set (should equal sklearn's)
    pred_test_onnx = sess.run([OUTPUT_NAME], onnx_feeds(test))[0][:, 0].astype(np.float64)
    m_onnx = metrics(y_test, pred_test_onnx)
    max_diff_test = float(np.max(np.abs(pred_test_onnx - pred_test)))
    if max_diff_test > args.tolerance:
        sys.exit(f"FAIL: held-out onnx/sklearn max diff {max_diff_test} > {args.tolerance}")

    # unknown zones must be ignored (all-zero one-hot) in both implementations
    unk = pd.DataFrame({"PULocationID": np.array([0, 266, 999, 5], dtype=np.int64),
                        "DOLocationID": np.array([7, -1, 1000, 266], dtype=np.int64),
                        "trip_distance": np.array([1.0, 2.5, 0.0, 10.0])})
    unk_diff = float(np.max(np.abs(
        sess.run([OUTPUT_NAME], onnx_feeds(unk))[0][:, 0] - pipe.predict(unk))))
    if unk_diff > args.tolerance:
        sys.exit(f"FAIL: unknown-zone handling differs between onnx and sklearn ({unk_diff})")
    print(f"unknown-zone rows: max |onnx - sklearn| = {unk_diff:.3g}")

    parity_path = out_dir / "parity.jsonl"
    with parity_path.open("w") as f:
        for row, exp in zip(parity[INPUTS].itertuples(index=False), expected):
            f.write(json.dumps({
                "PULocationID": int(row.PULocationID),
                "DOLocationID": int(row.DOLocationID),
                "trip_distance": float(row.trip_distance),
                "expected_duration": float(exp),  # repr: shortest round-trip float64
            }) + "\n")
    print(f"wrote {parity_path}")

    # ---- sample input file for the engine's tests -----------------------
    sample_path = Path(args.sample_out)
    write_sample(sample_path, args.n_sample, args.sample_seed)
    print(f"wrote {sample_path}")

    # ---- model card -----------------------------------------------------
    cmd = "~/.cache/sluice/train-venv/bin/python scripts/train_rides.py"
    defaults = p.parse_args([])
    extra = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if getattr(defaults, k) != v]
    if extra:
        cmd += " " + " ".join(extra)

    def rel(pth: Path) -> str:
        try:
            return str(Path(pth).resolve().relative_to(ROOT))
        except ValueError:
            return str(pth)

    first_row = parity.iloc[0]
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    card = f"""# Ride-duration model (`models/rides/model.onnx`)

Linear model that predicts a taxi ride's duration in minutes from its pickup
zone, dropoff zone and trip distance. It exists to exercise the sluice engine's
tabular/ONNX path; it is **trained on synthetic data only** and says nothing
about real NYC traffic.

## Provenance

* Data: synthetic rides from `scripts/ride_generator.py` (pure-stdlib,
  SplitMix64-based, exact formula in its module docstring).
  * training: `generate({args.n_train}, seed={args.train_seed})`
  * held-out metrics: `generate({args.n_test}, seed={args.test_seed})`
  * parity file: `generate({args.n_parity}, seed={args.parity_seed})`
  * `tests/data/rides_sample.jsonl`: `generate({args.n_sample}, seed={args.sample_seed})`
* Reproduce (from the repository root; regenerates every artifact listed here):

  ```
  {cmd}
  ```

* Software: Python {platform.python_version()}, scikit-learn {sklearn.__version__},
  skl2onnx {skl2onnx.__version__}, onnx {onnx.__version__}, onnxruntime
  {ort.__version__} (parity check), numpy {np.__version__}, pandas {pd.__version__}.
* Model: `Pipeline(ColumnTransformer([OneHotEncoder(handle_unknown="ignore")
  on PULocationID, DOLocationID; passthrough on trip_distance]), Ridge(alpha={args.alpha}))`.
  Fitted intercept {reg.intercept_:.6f}, trip_distance coefficient {dist_coef:.6f}
  min/mile (generator truth: 3.0).
* ONNX: requested target opset {args.opset} / ai.onnx.ml {args.ml_opset}; the file
  declares {opsets} (skl2onnx emits the lowest opset each operator needs), IR version
  {model.ir_version}, file size {size} bytes. Operators:
  {", ".join(sorted({n.op_type for n in model.graph.node}))}.

## Interface

| | name | dtype | shape |
|---|---|---|---|
""" + "".join(
        f"| input | `{n}` | {t} | {d} |\n" for n, t, d in ins
    ) + "".join(
        f"| output | `{n}` | {t} | {d} |\n" for n, t, d in outs
    ) + f"""
* Zone IDs are fed as **int64** (not strings). IDs outside the training
  vocabulary (anything not in 1..265, e.g. 0 or 266) are ignored by the one-hot
  encoder (all-zero encoding), i.e. they contribute nothing beyond the
  intercept; sklearn and ONNX agree on this (checked by the training script).
* `trip_distance` is float32 in the ONNX graph; sklearn was fitted/evaluated on
  float64. The difference is far below the parity tolerance.
* The batch dimension is dynamic; the second dimension is 1 for every tensor.

## Metrics (held-out: {args.n_test} rides, seed {args.test_seed})

| model | RMSE (min) | MAE (min) | R² |
|---|---|---|---|
| sklearn pipeline | {m_sklearn['rmse']:.4f} | {m_sklearn['mae']:.4f} | {m_sklearn['r2']:.4f} |
| ONNX (onnxruntime) | {m_onnx['rmse']:.4f} | {m_onnx['mae']:.4f} | {m_onnx['r2']:.4f} |
| baseline: predict training mean | {m_baseline['rmse']:.4f} | {m_baseline['mae']:.4f} | {m_baseline['r2']:.4f} |

Training-set RMSE {m_train['rmse']:.4f}, MAE {m_train['mae']:.4f}. The generator's
irreducible noise is `1.5 * (sum of 4 U[0,1) - 2)` (sd ≈ 0.866 min) plus the
0.01-minute rounding, so RMSE ≈ 0.87 is the best achievable.
Max |ONNX − sklearn| on the held-out set: {max_diff_test:.3g}.

## Parity file (`models/rides/parity.jsonl`)

{args.n_parity} rides from seed {args.parity_seed} (not used for training), one JSON
object per line with `PULocationID`, `DOLocationID`, `trip_distance` and
`expected_duration` = sklearn `Pipeline.predict` in float64 (printed with
Python's shortest round-trip repr). onnxruntime {ort.__version__} reproduces them
with max abs difference {max_diff:.3g} (the script fails if any row exceeds
{args.tolerance:g}). Engines feeding float32 distances should compare with an
absolute tolerance of 1e-4. First row: `PULocationID={int(first_row.PULocationID)}`,
`DOLocationID={int(first_row.DOLocationID)}`, `trip_distance={float(first_row.trip_distance)!r}`
→ `expected_duration={float(expected[0])!r}`.

## Test input (`{rel(sample_path)}`)

{args.n_sample} valid rides (`id` = `ride-000001` … `ride-{args.n_sample:06d}`, plus
`PULocationID`, `DOLocationID`, `trip_distance`; no target), followed by 5
deliberately malformed lines (lines {args.n_sample + 1}–{args.n_sample + 5}):

1. line {args.n_sample + 1}: not JSON at all (`this is not json {{`);
2. line {args.n_sample + 2}: valid JSON, `trip_distance` missing (id `ride-{args.n_sample + 2:06d}`);
3. line {args.n_sample + 3}: `PULocationID` is the string `"abc"` (wrong type; id `ride-{args.n_sample + 3:06d}`);
4. line {args.n_sample + 4}: empty object `{{}}` (no id, no fields);
5. line {args.n_sample + 5}: `trip_distance` is the string `"3.2"` instead of a number (id `ride-{args.n_sample + 5:06d}`).

A strict engine should reject all 5 lines (or route them to a dead-letter
output) and score the first {args.n_sample}.

## Limitations

Synthetic data, linear model: the generator's duration is exactly additive in
distance and per-zone delays, so the model is well specified by construction.
Do not use it for anything but testing.
"""
    (out_dir / "MODEL_CARD.md").write_text(card)
    print(f"wrote {out_dir / 'MODEL_CARD.md'}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
