#!/usr/bin/env bash
# Pub/Sub benchmark on Google's emulator, in one run, on this machine:
#   1. bare: the official client alone publishes COUNT ride-sized messages, then pulls and acks
#      them all (benches/pubsub_ceiling.rs): the ceiling of publish -> pull -> ack here;
#   2. drain: COUNT rides published first, then sluice (Pub/Sub -> model -> Pub/Sub) started;
#      answers/s from its first answer to its last, as `sluice loadgen --pubsub --preload` sees them;
#   3. drain_postgres: the same with the Postgres sink as well;
#   4. latency: RATE rides/s for LATENCY_COUNT rides through Pub/Sub -> model -> Pub/Sub + Postgres,
#      p50/p95/p99 end to end (publish to the answer's arrival at the backend's subscription).
# Each scenario gets fresh topics and subscriptions; the worker's CPU seconds and peak RSS are shown.
# Usage: benches/pubsub_load.sh [COUNT=50000] [WORKERS=2]   (RATE=500, LATENCY_COUNT=10000)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${1:-50000}"
WORKERS="${2:-2}"
RATE="${RATE:-500}"
LATENCY_COUNT="${LATENCY_COUNT:-10000}"
bash scripts/setup.sh >/dev/null
bash scripts/pg.sh >/dev/null
bash scripts/pubsub.sh start >/dev/null
PORT="${SLUICE_PUBSUB_PORT:-8085}"
export PUBSUB_EMULATOR_HOST="127.0.0.1:$PORT"
API="http://127.0.0.1:$PORT/v1/projects/sluice-local"
cargo build --release --bin sluice 2>&1 | tail -n 1
BIN="${CARGO_TARGET_DIR:-target}/release/sluice"
RUN="psbench$(date +%s)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null || true' EXIT
HZ=$(getconf CLK_TCK)
cpu_of() { awk -v hz="$HZ" '{sub(/.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), avx512: $(grep -o 'avx512[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ' | cut -c1-40)"
echo "== bare client (publish, then pull + ack), $COUNT messages"
cargo bench --bench pubsub_ceiling -- "$COUNT" 2>/dev/null | grep '^bare'

mk() { # name sinks-extra -> topics in/out, subscription, topology file
  local n="$RUN-$1"
  for t in in out dead; do curl -sf -X PUT "$API/topics/$n-$t" >/dev/null; done
  curl -sf -X PUT -H 'content-type: application/json' --data "{\"topic\": \"projects/sluice-local/topics/$n-in\", \"ackDeadlineSeconds\": 60}" "$API/subscriptions/$n-sluice" >/dev/null
  cat > "$WORK/$1.toml" <<TOML
name = "$n"
[source]
type = "pubsub"
subscription = "projects/sluice-local/subscriptions/$n-sluice"
epoch_ms = 20
[task]
type = "tabular"
model = "models/rides/model.onnx"
[batching]
max_batch = 256
max_delay_ms = 1
[runtime]
workers = $WORKERS
max_epochs_in_flight = 8
max_records_in_flight = 65536
progress = false
[[sinks]]
type = "pubsub"
topic = "projects/sluice-local/topics/$n-out"
dead_letter_topic = "projects/sluice-local/topics/$n-dead"
$2
TOML
}

PG_SINK='[[sinks]]
type = "postgres"
url = "postgres://sluice:sluice@127.0.0.1:5432/sluice"
table = "psbench_answers"
dead_letter_table = "psbench_dead"'

run_worker() { # name
  "$BIN" run "$WORK/$1.toml" --no-progress > "$WORK/$1.log" 2>&1 &
  WPID=$!
}

finish_worker() { # name
  local cpu rss
  cpu=$(cpu_of "$WPID"); rss=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$WPID/status" 2>/dev/null || echo 0)
  kill -TERM "$WPID"; wait "$WPID" || true; WPID=
  printf 'worker: %.1f CPU-s, peak RSS %.0f MB\n' "$cpu" "$rss"
}

drain() { # name sinks-extra
  mk "$1" "$2"
  local n="$RUN-$1"
  "$BIN" loadgen --pubsub --topic "projects/sluice-local/topics/$n-in" --results "projects/sluice-local/topics/$n-out" \
    --count "$COUNT" --preload --drain-ms 20000 > "$WORK/$1.report" 2>&1 &
  local lg=$!
  until grep -q preloaded "$WORK/$1.report"; do kill -0 "$lg" 2>/dev/null || { cat "$WORK/$1.report"; exit 1; }; sleep 0.2; done
  run_worker "$1"
  wait "$lg" || true
  echo "== $1 ($COUNT rides published first, $WORKERS workers)"
  grep -v '^preloaded [0-9]* rides$' "$WORK/$1.report"
  finish_worker "$1"
}

latency() {
  mk latency "$PG_SINK"
  local n="$RUN-latency"
  run_worker latency
  sleep 2
  echo "== latency: $LATENCY_COUNT rides at $RATE/s, Pub/Sub -> model -> Pub/Sub + Postgres"
  "$BIN" loadgen --pubsub --topic "projects/sluice-local/topics/$n-in" --results "projects/sluice-local/topics/$n-out" \
    --count "$LATENCY_COUNT" --rate "$RATE" --drain-ms 10000 || true
  finish_worker latency
}

drain drain ""
drain drain_postgres "$PG_SINK"
latency
