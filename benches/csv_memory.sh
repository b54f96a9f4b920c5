#!/usr/bin/env bash
# Peak memory of the file source on a large CSV: rides with a 1 KB pass-through column, through the
# ride model, into JSON lines. The file source streams, so peak RSS must not grow with the file.
#
#   benches/csv_memory.sh [size_mb=1024] [workers=2]
#
# OLD_BIN=path runs another sluice binary on the same file first, for a side-by-side figure.
# Prints rows, seconds, rows/s and peak RSS (from /usr/bin/time, else /proc sampling) per binary.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB="${1:-1024}"
WORKERS="${2:-2}"
BIN="${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}"
if [ ! -x "$BIN" ]; then
  cargo build --release --bin sluice
fi
lib=$(bash scripts/setup.sh | sed -n 's/^setup: ONNX Runtime library at //p')
export ORT_DYLIB_PATH="$lib"
WORK="${CSV_BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$WORK"
CSV="$WORK/rides.csv"
if [ ! -s "$CSV" ] || [ "$(( $(stat -c %s "$CSV") / 1048576 ))" -lt "$SIZE_MB" ]; then
  python3 - "$CSV" "$SIZE_MB" <<'PY'
import random, sys
path, size_mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
note = "x" * 1000
target = size_mb * 1048576
with open(path, "w") as f:
    f.write("PULocationID,DOLocationID,trip_distance,note\n")
    written = 0
    while written < target:
        rows = []
        for _ in range(10000):
            rows.append(f"{rnd.randint(1, 265)},{rnd.randint(1, 265)},{rnd.uniform(0.1, 30):.2f},{note}\n")
        chunk = "".join(rows)
        f.write(chunk)
        written += len(chunk)
PY
fi
rows=$(( $(wc -l < "$CSV") - 1 ))
echo "csv_memory: $(du -h "$CSV" | cut -f1) CSV, $rows rows, $WORKERS workers (machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
cat > "$WORK/t.toml" <<TOML
name = "csv_memory"
[source]
type = "csv"
path = "$CSV"
[task]
type = "tabular"
model = "models/rides/model.onnx"
[batching]
max_batch = 256
max_delay_ms = 1
[runtime]
workers = $WORKERS
epoch_records = 4096
max_epochs_in_flight = 4
progress = false
[[sinks]]
type = "jsonl"
dir = "$WORK/out"
TOML
measure() {
  local name=$1 bin=$2
  rm -rf "$WORK/out"
  local start end peak=0 pid rss
  start=$(date +%s.%N)
  "$bin" run "$WORK/t.toml" --no-progress > "$WORK/$name.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    sleep 0.2
  done
  wait "$pid" || { echo "$name: the run failed:"; tail -5 "$WORK/$name.log"; return 1; }
  end=$(date +%s.%N)
  local answered
  answered=$(cat "$WORK"/out/answers.w*.jsonl | wc -l)
  awk -v n="$name" -v a="$answered" -v s="$start" -v e="$end" -v p="$peak" \
    'BEGIN { t = e - s; printf "%s: %d answers in %.1f s (%.0f rows/s), peak RSS %.0f MB\n", n, a, t, a / t, p / 1024 }'
}
if [ -n "${OLD_BIN:-}" ]; then
  measure old "$OLD_BIN"
fi
measure new "$BIN"
[ -z "${CSV_BENCH_DIR:-}" ] && rm -rf "$WORK"
exit 0
