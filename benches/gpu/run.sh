#!/usr/bin/env bash
# The GPU benchmark, run on the device machine (one NVIDIA GPU, the image's Python with torch,
# transformers and onnx, the CUDA 13 libraries inside PyTorch's install), from the repository root,
# after benches/gpu/prepare.sh's pieces (binaries and wheel) were carried to /tmp/sluice-gpu. It
# builds nothing. In one run:
#   1. installs the carried onnxruntime-gpu wheel (no network) and checks that sluice finds the
#      CUDA provider and the CUDA libraries by itself (no LD_LIBRARY_PATH);
#   2. makes the fused fp16 MiniLM (scripts/optimize_model.py on the shipped int8 model) and a
#      BERT-base-sized fused fp16 QA model (random weights: speed does not depend on them);
#   3. the fp16 fidelity check on the GPU (scripts/fidelity_fp16.py --provider cuda);
#   4. for each model, side by side: raw ONNX Runtime padded to 384, raw ONNX Runtime on the same
#      windows with the same bucket rule, and sluice end to end (CSV -> QA -> JSON lines; no
#      Postgres on the device machine), with batch-size and latency histograms; then a sweep of
#      timely workers (tokenizing threads) for MiniLM;
#   5. the ride-duration tabular pipeline on CUDA;
#   GPU utilisation is sampled all along (nvidia-smi, every 250 ms).
# Everything lands in $OUT (or ./gpu-out).
set -uo pipefail
W=/tmp/sluice-gpu
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" "$W"
BIN="$W"
chmod +x "$BIN/sluice" "$BIN/qa_throughput"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi | tee "$OUT/nvidia-smi.txt"
WHEEL="$W/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
if [ ! -d "$W/ort/onnxruntime" ]; then
  cat "$W"/part.* > "$WHEEL"
  python3 -m pip install -q --no-index --no-deps --target "$W/ort" "$WHEEL" || { echo "cannot install the wheel"; exit 1; }
fi
export ORT_DYLIB_PATH=$(ls "$W"/ort/onnxruntime/capi/libonnxruntime.so.* | head -n1)
export PYTHONPATH="$W/ort${PYTHONPATH:+:$PYTHONPATH}"
export SLUICE_REPO="$PWD"
unset LD_LIBRARY_PATH
(nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu-util.csv") &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT

log "1. does sluice find the CUDA provider and libraries by itself?"
printf '[execution]\nprovider = "cuda"\n' | cat topologies/qa_csv.toml - > "$W/qa_cuda.toml"
if ! "$BIN/sluice" check "$W/qa_cuda.toml" 2>&1 | tee -a "$OUT/summary.txt"; then
  purelib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  export SLUICE_CUDA_LIBS=$(find "$purelib/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  log "not by itself: retrying with SLUICE_CUDA_LIBS=$SLUICE_CUDA_LIBS"
  "$BIN/sluice" check "$W/qa_cuda.toml" 2>&1 | tee -a "$OUT/summary.txt" || exit 1
fi

log "2. models"
python3 scripts/optimize_model.py --out "$W/minilm" > "$OUT/optimize-minilm.txt" 2>&1 || { tail -20 "$OUT/optimize-minilm.txt"; exit 1; }
python3 - "$W/bert-base-export.onnx" > "$OUT/export-bert-base.txt" 2>&1 <<'PY'
import sys, torch
from transformers import BertConfig, BertForQuestionAnswering
torch.manual_seed(0)
model = BertForQuestionAnswering(BertConfig(attn_implementation="eager")).eval()  # BERT-base: 12 layers, 768 hidden, 12 heads
ids = torch.ones(2, 384, dtype=torch.long)
torch.onnx.export(model, (ids, ids, torch.zeros_like(ids)), sys.argv[1], input_names=["input_ids", "attention_mask", "token_type_ids"],
                  output_names=["start_logits", "end_logits"], opset_version=17, dynamo=False,
                  dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ["input_ids", "attention_mask", "token_type_ids", "start_logits", "end_logits"]})
PY
python3 scripts/optimize_model.py --model "$W/bert-base-export.onnx" --tokenizer models/minilm-squad/tokenizer.json \
  --hidden-size 768 --num-heads 12 --no-fused-fp32 --out "$W/bert-base" > "$OUT/optimize-bert-base.txt" 2>&1 || tail -20 "$OUT/optimize-bert-base.txt"

log "3. fp16 fidelity on the GPU"
python3 scripts/fidelity_fp16.py --dir "$W/minilm" --provider cuda --no-emulation 2>&1 | tee "$OUT/fidelity-cuda.txt" | tail -5 | tee -a "$OUT/summary.txt"

bench() { # NAME MODEL WORKERS
  log "4. $1: raw ORT vs sluice, $3 workers"
  SLUICE_BENCH_PROVIDER=cuda SLUICE_BENCH_MODEL="$2" SLUICE_BENCH_WORKERS="$3" SLUICE_BENCH_SINK=jsonl \
    SLUICE_BENCH_REPEAT="${REPEAT:-30}" SLUICE_BENCH_ROUNDS="${ROUNDS:-3}" SLUICE_BENCH_MAX_BATCH=256 \
    timeout 240 "$BIN/qa_throughput" > "$OUT/bench-$1-w$3.txt" 2>&1
  grep -E "^model|^\| |^medians|^round" "$OUT/bench-$1-w$3.txt" | tee -a "$OUT/summary.txt"
}
bench minilm-fp16 "$W/minilm/model.fp16.onnx" 8
bench bert-base-fp16 "$W/bert-base/model.fp16.onnx" 8
for w in 2 4 14; do REPEAT=30 ROUNDS=1 bench minilm-fp16 "$W/minilm/model.fp16.onnx" "$w"; done

log "5. rides (tabular) on CUDA"
printf 'name = "rides_cuda"\n[source]\ntype = "generator"\ncount = 200000\nseed = 1\n[task]\ntype = "tabular"\nmodel = "models/rides/model.onnx"\n[batching]\nmax_batch = 1024\n[execution]\nprovider = "cuda"\n[runtime]\nworkers = 4\nprogress = false\n[[sinks]]\ntype = "jsonl"\ndir = "%s/rides"\n' "$W" > "$W/rides_cuda.toml"
"$BIN/sluice" run "$W/rides_cuda.toml" --no-progress 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
kill $smi 2>/dev/null
awk -F', ' '{ if ($2 > 0) { n++; s += $2 } } END { if (n) printf "gpu utilisation: mean %.0f%% over %d busy samples\n", s / n, n }' "$OUT/gpu-util.csv" | tee -a "$OUT/summary.txt"
