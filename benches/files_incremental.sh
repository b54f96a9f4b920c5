#!/usr/bin/env bash
# Incremental recompute of a watched file: a ROWS-row rides CSV (with an `id` column) answered by
# the tabular task into JSON lines, then EDIT_PCT% of its rows edited in place, in one sluice run
# that keeps watching. Both passes are timed the same way: from the moment the file is in the
# folder (renamed in) to the moment the sinks have made the last of its answers durable (read from
# the Prometheus endpoint), so both include the same listing and settle wait. Model work is the
# units the model ran (sum of sluice_inference_batch_size). Peak RSS is VmHWM after each pass.
#
#   benches/files_incremental.sh [rows=1000000] [workers=2]
#
# EDIT_PCT (default 1) sets the share of rows edited; SLUICE_BIN another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
WORKERS="${2:-2}"
EDIT_PCT="${EDIT_PCT:-1}"
PORT="${METRICS_PORT:-19465}"
BIN="${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}"
if [ ! -x "$BIN" ]; then
  cargo build --release --bin sluice
fi
lib=$(bash scripts/setup.sh | sed -n 's/^setup: ONNX Runtime library at //p')
export ORT_DYLIB_PATH="$lib"
WORK="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/in" "$WORK/out"
python3 - "$WORK/rides.csv" "$WORK/edited.csv" "$ROWS" "$EDIT_PCT" <<'PY'
import random, sys
path, edited, rows, pct = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rnd = random.Random(11)
lines = [f"r{i},{rnd.randint(1, 265)},{rnd.randint(1, 265)},{rnd.uniform(0.1, 30):.2f}\n" for i in range(rows)]
with open(path, "w") as f:
    f.write("id,PULocationID,DOLocationID,trip_distance\n")
    f.writelines(lines)
step = max(1, int(round(100 / pct)))
for i in range(0, rows, step):
    lines[i] = f"r{i},{rnd.randint(1, 265)},{rnd.randint(1, 265)},{rnd.uniform(30.1, 60):.2f}\n"
with open(edited, "w") as f:
    f.write("id,PULocationID,DOLocationID,trip_distance\n")
    f.writelines(lines)
print(f"files_incremental: {rows} rows, {len(range(0, rows, step))} edited", file=sys.stderr)
PY
edits=$(( (ROWS + (100 / EDIT_PCT) - 1) / (100 / EDIT_PCT) ))
cat > "$WORK/t.toml" <<TOML
name = "files_incremental"
[source]
type = "files"
path = "$WORK/in"
watch = true
poll_ms = 50
settle_ms = 0
[task]
type = "tabular"
model = "models/rides/model.onnx"
[batching]
max_batch = 256
max_delay_ms = 1
[runtime]
workers = $WORKERS
progress = false
[metrics]
listen = "127.0.0.1:$PORT"
[[sinks]]
type = "jsonl"
dir = "$WORK/out"
TOML
echo "files_incremental: machine $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $WORKERS workers"
RUST_LOG=sluice=info "$BIN" run "$WORK/t.toml" --no-progress >"$WORK/stdout" 2>"$WORK/stderr" &
pid=$!
metric() {
  curl -s --max-time 1 "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'
}
until curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/metrics"; do sleep 0.05; done
now_ms() { date +%s%3N; }
# Waits until the durable answers reach $1; prints the milliseconds since $2.
wait_answers() {
  local want=$1 since=$2
  until [ "$(metric sluice_sink_answers_total)" -ge "$want" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "sluice exited:"; tail -20 "$WORK/stderr"; exit 1; }
    sleep 0.01
  done
  echo $(( $(now_ms) - since ))
}
hwm() { awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$pid/status"; }

cp "$WORK/rides.csv" "$WORK/in/.rides.tmp"
t0=$(now_ms)
mv "$WORK/in/.rides.tmp" "$WORK/in/rides.csv"
first_ms=$(wait_answers "$ROWS" "$t0")
first_units=$(metric sluice_inference_batch_size_sum)
first_rss=$(hwm)
sleep 1
cp "$WORK/edited.csv" "$WORK/in/.rides.tmp"
t1=$(now_ms)
mv "$WORK/in/.rides.tmp" "$WORK/in/rides.csv"
second_ms=$(wait_answers $(( ROWS + edits )) "$t1")
second_units=$(( $(metric sluice_inference_batch_size_sum) - first_units ))
second_rss=$(hwm)
sleep 0.5
diff_line=$(grep -o 'rides.csv: [0-9]* rows, [0-9]* new or changed, [0-9]* gone, in [0-9]* ms ([0-9]* rows passed over in unchanged blocks)' "$WORK/stderr" | tail -1)
kill -TERM "$pid"
wait "$pid" || true
echo "first pass:  $ROWS rows, model units $first_units, ${first_ms} ms, peak RSS ${first_rss} MB"
echo "second pass: $edits edited, model units $second_units, ${second_ms} ms, peak RSS ${second_rss} MB"
echo "  source's own diff of the file: $diff_line"
awk -v a="$second_units" -v b="$first_units" -v c="$second_ms" -v d="$first_ms" \
  'BEGIN { printf "ratio: model work %.2f%% of the first pass, time %.2f%%\n", 100 * a / b, 100 * c / d }'
