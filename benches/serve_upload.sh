#!/usr/bin/env bash
# The job API against `sluice run`, side by side on one file: a CSV of N rides (with IDs) answered
#   1. by `sluice run` on a topology reading it through the files connector (what an upload job
#      runs), into JSON lines;
#   2. by `sluice serve`: `curl -F model=rides -F file=@rides.csv /v1/jobs/upload`, then polling
#      `GET /v1/jobs/{id}` every 50 ms until it has succeeded.
# Prints each one's wall time (for serve: from the upload's first byte to `succeeded`), the upload's
# throughput into the state folder, the server's peak RSS (VmHWM) and the ratio serve / run.
#
#   benches/serve_upload.sh [rides=1000000] [workers=2] [rounds=2]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
WORKERS="${2:-2}"
ROUNDS="${3:-2}"
BIN="${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}"
if [ ! -x "$BIN" ]; then
  cargo build --release --bin sluice
fi
lib=$(bash scripts/setup.sh | sed -n 's/^setup: ONNX Runtime library at //p')
export ORT_DYLIB_PATH="$lib"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
CSV="$WORK/rides.csv"
awk -v n="$ROWS" 'BEGIN { print "id,PULocationID,DOLocationID,trip_distance"; for (i = 0; i < n; i++) printf "r%d,%d,%d,%.2f\n", i, 1 + i % 263, 1 + (i * 7) % 263, 0.5 + (i % 97) * 0.25 }' > "$CSV"
BYTES=$(stat -c %s "$CSV")
echo "serve_upload: $ROWS rides, $((BYTES / 1048576)) MiB CSV, $WORKERS workers, $ROUNDS rounds (machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"

# The ride template with this run's worker count, used by both.
sed "s/^workers = .*/workers = $WORKERS/" topologies/rides_generator.toml | grep -v '^progress' > "$WORK/rides_template.toml"

run_once() {
  local out="$WORK/run-out-$1"
  python3 - "$WORK/rides_template.toml" "$CSV" "$out" > "$WORK/run.toml" <<'PY'
import sys
template, csv, out = sys.argv[1:4]
text = open(template).read()
head, _, rest = text.partition("[source]")
# Drop the template's source table (up to the next table) and read the CSV through the files connector.
lines = rest.split("\n")
i = 1
while i < len(lines) and not lines[i].startswith("["):
    i += 1
rest = "\n".join(lines[i:])
print(head + f'[source]\ntype = "files"\npath = "{csv}"\n\n' + rest + f'\n[[sinks]]\ntype = "jsonl"\ndir = "{out}"\n')
PY
  local t0 t1
  t0=$(date +%s.%N)
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f '%M' -o "$WORK/run.rss" "$BIN" run "$WORK/run.toml" --no-progress > /dev/null
  else
    echo 0 > "$WORK/run.rss"
    "$BIN" run "$WORK/run.toml" --no-progress > /dev/null
  fi
  t1=$(date +%s.%N)
  echo "$t0 $t1 $(cat "$WORK/run.rss")" | awk '{ printf "%.3f %d", $2 - $1, $3 / 1024 }'
}

serve_once() {
  local state="$WORK/state-$1" port=$((18500 + $1))
  cat > "$WORK/serve.toml" <<TOML
workers = $WORKERS
[templates]
rides = "$WORK/rides_template.toml"
TOML
  "$BIN" serve --config "$WORK/serve.toml" --listen "127.0.0.1:$port" --state "$state" > "$WORK/serve.out" 2> "$WORK/serve.err" &
  local pid=$!
  for _ in $(seq 100); do
    curl -sf "127.0.0.1:$port/v2/health/ready" > /dev/null && break
    sleep 0.1
  done
  local t0 t1 id status reply up_s
  t0=$(date +%s.%N)
  # curl's own clock for the upload (first byte sent to the 202), so no process start counts.
  reply=$(curl -sf -w ' %{time_total}' -F model=rides -F "file=@$CSV" "127.0.0.1:$port/v1/jobs/upload")
  up_s=${reply##* }
  id=$(echo "$reply" | sed -n 's/.*"job_id":"\([^"]*\)".*/\1/p')
  while true; do
    status=$(curl -sf "127.0.0.1:$port/v1/jobs/$id" | sed -n 's/.*"status":"\([a-z]*\)".*/\1/p')
    case "$status" in succeeded|failed|canceled) break ;; esac
    sleep 0.05
  done
  t1=$(date +%s.%N)
  local answered
  answered=$(curl -sf "127.0.0.1:$port/v1/jobs/$id" | sed -n 's/.*"answered":\([0-9]*\).*/\1/p')
  local hwm
  hwm=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$pid/status")
  kill -TERM "$pid"
  wait "$pid" 2> /dev/null || true
  echo "$t0 $up_s $t1 $hwm $status $answered" | awk -v bytes="$BYTES" '{ printf "%.3f %.0f %s %s %s", $3 - $1, bytes / $2 / 1048576, $4, $5, $6 }'
}

for r in $(seq "$ROUNDS"); do
  read -r run_s run_rss <<< "$(run_once "$r")"
  read -r serve_s up_mbs rss status answered <<< "$(serve_once "$r")"
  echo "round $r: sluice run ${run_s} s (peak RSS ${run_rss} MB); sluice serve upload job ${serve_s} s ($status, $answered answers; upload ${up_mbs} MiB/s; peak RSS ${rss} MB); serve/run $(echo "$serve_s $run_s" | awk '{ printf "%.3f", $1 / $2 }')"
done
