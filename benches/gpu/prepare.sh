#!/usr/bin/env bash
# Stages, on this (CPU) machine, everything the GPU benchmark carries to the device machine, which
# builds nothing: stripped release binaries (the qa_throughput bench, which holds raw ONNX Runtime
# and the whole sluice pipeline, and `sluice` itself) and the onnxruntime-gpu wheel for the device
# image's Python (3.12), in pieces small enough for one carry each (at most 64 MiB a call).
#
#   bash benches/gpu/prepare.sh          # then follow the calls it prints (benches/gpu/README.md)
#
# Output: gpu-carry/ (git-ignored): one folder per call (bin-sluice/, bin-bench/, wheel-00/, ...),
# each under 64 MiB; each call copies its folder's files into /tmp/sluice-gpu on the device.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
ORT_VERSION="1.31.1"
WHEEL="onnxruntime_gpu-$ORT_VERSION-cp312-cp312-manylinux_2_28_x86_64.whl"
rm -rf gpu-carry && mkdir -p gpu-carry/bin-sluice gpu-carry/bin-bench "$CACHE/gpu-wheel"
cargo build --release --bin sluice
bench=$(cargo bench --no-run --bench qa_throughput --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "qa_throughput"][-1])')
target="${CARGO_TARGET_DIR:-target}"
strip -o gpu-carry/bin-sluice/sluice "$target/release/sluice"
strip -o gpu-carry/bin-bench/qa_throughput "$bench"
if [ ! -f "$CACHE/gpu-wheel/$WHEEL" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    "onnxruntime-gpu==$ORT_VERSION" -d "$CACHE/gpu-wheel"
fi
split -b 50M -d "$CACHE/gpu-wheel/$WHEEL" gpu-carry/part.
for p in gpu-carry/part.*; do
  n=${p##*.}
  mkdir -p "gpu-carry/wheel-$n" && mv "$p" "gpu-carry/wheel-$n/"
done
du -sh gpu-carry/*
for d in gpu-carry/*/; do
  echo "prepare: a call carrying ${d%/}: mkdir -p /tmp/sluice-gpu && cp ${d}* /tmp/sluice-gpu/"
done
echo "prepare: then, in the last of them or one more call: bash benches/gpu/run.sh"
