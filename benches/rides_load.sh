#!/usr/bin/env bash
# End-to-end ride benchmark with `sluice loadgen`, on this machine, broker and Postgres included.
#   1. Kafka -> model -> results topic (no Postgres), rides sent as fast as loadgen can;
#   2. the same with the Postgres sink as well (answers and offsets in one transaction per epoch);
#   3. latency at a steady 5,000 rides/s;
#   and, for the pipeline's own sustained rate, 1 and 2 again with the whole backlog published
#   before the worker starts (drain, drain_postgres): throughput from its first answer to its last.
# For each: throughput, p50/p95/p99 end-to-end latency, lost and duplicate answers, the worker's
# peak RSS, and where the worker's time went (from its own Prometheus histograms).
# Usage: benches/rides_load.sh [COUNT=200000] [WORKERS=1]
#   SCENARIOS="drain latency_5k" runs a subset (drain drain_postgres kafka_only with_postgres latency_5k latency_5k_4p);
#   WORKER_BIN runs another sluice binary as the worker, WORKER_WRAP prefixes its command (e.g. heaptrack);
#   PERF_DIR=DIR records a `perf` call-graph profile of the worker per scenario (PERF_SECONDS long);
#   LATENCY_COUNT (60000), EPOCH_MS (20), IN_FLIGHT (8), MAX_RECORDS (65536), MAX_BATCH (256), DRAIN_PARTITIONS (4),
#   SOURCE_CLIENT and SINK_CLIENT (librdkafka properties, e.g. "\"fetch.wait.max.ms\" = \"10\"") tune a run;
#   BROKER=mock runs each scenario on librdkafka's mock broker (`sluice mock-broker`) instead of Tansu:
#   its fetch cost does not grow with the log, but it keeps only the last 5 MB of each partition, so
#   it suits the latency scenarios, not the 1M-ride backlogs of the drains.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${1:-200000}"
WORKERS="${2:-1}"
bash scripts/setup.sh >/dev/null
bash scripts/pg.sh >/dev/null
# The bench runs its own broker on its own port and restarts it before every scenario: Tansu's
# in-memory store keeps every message ever produced, and its fetch cost grows with what a partition
# holds, so each scenario starts from an empty broker and does not inherit the previous ones' data.
BENCH_PORT="${BENCH_KAFKA_PORT:-19095}"
BROKERS="127.0.0.1:$BENCH_PORT"
cargo build --release --bin sluice 2>&1 | tail -n 1
BIN="${CARGO_TARGET_DIR:-target}/release/sluice"
TANSU=$(bash scripts/kafka.sh path)
RUN="bench$(date +%s)"
WORK=$(mktemp -d)
BROKER_PID=0
trap 'rm -rf "$WORK"; [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null; [ "${BROKER:-tansu}" = mock ] && kill "$BROKER_PID" 2>/dev/null; SLUICE_KAFKA_PORT=$BENCH_PORT bash scripts/kafka.sh stop >/dev/null 2>&1 || true' EXIT
fresh_broker() { # scenario partitions: an empty broker holding the scenario's two topics
  if [ "${BROKER:-tansu}" = mock ]; then
    [ "$BROKER_PID" != 0 ] && { kill "$BROKER_PID" 2>/dev/null; wait "$BROKER_PID" 2>/dev/null || true; }
    "$BIN" mock-broker --topic "$RUN-$1-in:$2" --topic "$RUN-$1-out:$2" > "$WORK/mock.out" 2>&1 &
    BROKER_PID=$!
    until grep -q "mock broker at" "$WORK/mock.out"; do kill -0 "$BROKER_PID" || { cat "$WORK/mock.out"; exit 1; }; sleep 0.05; done
    BROKERS=$(awk '/mock broker at/ {print $4}' "$WORK/mock.out")
  else
    SLUICE_KAFKA_PORT=$BENCH_PORT bash scripts/kafka.sh restart >/dev/null
    for t in in out; do "$TANSU" topic create "$RUN-$1-$t" --partitions "$2" --broker "tcp://$BROKERS" >/dev/null; done
    BROKER_PID=$(cat "${SLUICE_CACHE:-$HOME/.cache/sluice}/tansu-$BENCH_PORT.pid" 2>/dev/null || echo 0)
  fi
}

topology() { # name sinks-extra
  cat <<TOML
name = "$1"
[source]
type = "kafka"
brokers = "$BROKERS"
topic = "$RUN-$1-in"
epoch_ms = ${EPOCH_MS:-20}
client = { ${SOURCE_CLIENT:-} }
[task]
type = "tabular"
model = "models/rides/model.onnx"
[batching]
max_batch = ${MAX_BATCH:-256}
max_delay_ms = 1
[runtime]
workers = $WORKERS
epoch_records = 8192
max_epochs_in_flight = ${IN_FLIGHT:-8}
max_records_in_flight = ${MAX_RECORDS:-65536}
progress = false
[metrics]
listen = "127.0.0.1:9477"
[[sinks]]
type = "kafka"
brokers = "$BROKERS"
topic = "$RUN-$1-out"
client = { ${SINK_CLIENT:-} }
$2
TOML
}

# CPU seconds (user + system) a process has used so far.
# The harness shares the 2 cores with what it measures, so it samples sparingly and with shell
# builtins where it samples often.
HZ=$(getconf CLK_TCK)
cpu_of() { awk -v hz="$HZ" '{sub(/.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Postgres: every server process, plus what the postmaster's exited children (the backends of
# closed connections) used, so that a backend ending between two readings does not vanish.
cpu_of_postgres() { local p; for p in $(pgrep -x postgres); do cat "/proc/$p/stat" 2>/dev/null; done | awk -v hz="$HZ" '{sub(/.*\) /, ""); t += $12 + $13 + $14 + $15} END {print t / hz}'; }

start_worker() { # name
  ${WORKER_WRAP:-} "${WORKER_BIN:-$BIN}" run "$WORK/$1.toml" --no-progress > "$WORK/$1.log" 2>&1 &
  WPID=$!
}

scenario() { # name count rate(0 = max, "preload" = backlog first) partitions sinks-extra
  local name=$1 count=$2 rate=$3 parts=$4
  fresh_broker "$name" "$parts"
  topology "$name" "$5" > "$WORK/$name.toml"
  local LGPID=""
  if [ "$rate" = preload ]; then
    # Publish the whole backlog first; the worker starts once it is in the broker.
    "$BIN" loadgen --brokers "$BROKERS" --topic "$RUN-$name-in" --results "$RUN-$name-out" --count "$count" --preload --drain-ms 20000 > "$WORK/$name.report" 2>&1 &
    LGPID=$!
    until grep -q preloaded "$WORK/$name.report" 2>/dev/null; do
      kill -0 $LGPID 2>/dev/null || { cat "$WORK/$name.report"; return 1; }
      sleep 0.1
    done
    start_worker "$name"
  else
    start_worker "$name"
    sleep 2
  fi
  if [ -n "${PERF_DIR:-}" ]; then
    # A call-graph profile of the worker for PERF_SECONDS (default 4) from its start.
    mkdir -p "$PERF_DIR"
    # It attaches after 1 s: perf -p follows only the threads that exist when it attaches.
    (sleep 1; perf record -F 999 --call-graph dwarf,16384 -p "$WPID" -o "$PERF_DIR/$name.perf" -- sleep "${PERF_SECONDS:-4}" > /dev/null 2>&1) &
  fi
  local peak=0
  ( while [ -e "/proc/$WPID/status" ]; do
      while read -r k v _; do [ "$k" = VmRSS: ] && echo "$v"; done < "/proc/$WPID/status" 2>/dev/null
      sleep 0.2
    done ) > "$WORK/$name.rss" &
  local SPID=$!
  local broker_pid=$BROKER_PID
  local pg_before broker_before worker_before
  pg_before=$(cpu_of_postgres); broker_before=$(cpu_of "$broker_pid"); worker_before=$(cpu_of "$WPID")
  local t0; t0=$(date +%s.%N)
  if [ -n "$LGPID" ]; then
    # The load generator reports its own CPU from the end of publishing on (its listening).
    wait $LGPID || true
    awk '/^loadgen CPU while listening:/ {print $5, 0}' "$WORK/$name.report" > "$WORK/$name.loadgen.cpu"
  else
    { TIMEFORMAT="%U %S"; time "$BIN" loadgen --brokers "$BROKERS" --topic "$RUN-$name-in" --results "$RUN-$name-out" --count "$count" --rate "$rate" --linger-ms "${LINGER_MS:-5}" --drain-ms 5000 > "$WORK/$name.report" 2>&1 || true; } 2> "$WORK/$name.loadgen.cpu"
  fi
  local wall; wall=$(echo "$(date +%s.%N) - $t0" | bc)
  local worker_cpu broker_cpu pg_cpu lg_cpu
  worker_cpu=$(echo "$(cpu_of "$WPID") - $worker_before" | bc); broker_cpu=$(echo "$(cpu_of "$broker_pid") - $broker_before" | bc)
  pg_cpu=$(echo "$(cpu_of_postgres) - $pg_before" | bc); lg_cpu=$(awk '{print $1 + $2}' "$WORK/$name.loadgen.cpu" 2>/dev/null || echo 0)
  curl -s 127.0.0.1:9477/metrics > "$WORK/$name.metrics" || true
  if [ -n "${WORKER_LOG_DIR:-}" ]; then cp "$WORK/$name.log" "$WORKER_LOG_DIR/$name.log"; fi
  kill -TERM $WPID; wait $WPID || true; WPID=""
  kill $SPID 2>/dev/null || true
  peak=$(sort -n "$WORK/$name.rss" | tail -n1)
  echo "### $name: $count rides, rate $rate (0 = as fast as possible; preload = the backlog published before the worker starts), $parts partition(s), $WORKERS worker(s)"
  cat "$WORK/$name.report"
  if [ -n "${WORKER_LOG_DIR:-}" ]; then cp "$WORK/$name.log" "$WORKER_LOG_DIR/$name.log"; fi
  echo "worker peak RSS: $((peak / 1024)) MB; RSS over the run (MB at 25/50/75/100%): $(awk '{v[NR]=$1} END {for (q=1; q<=4; q++) {i=int(NR*q/4); if (i<1) i=1; printf "%d ", v[i]/1024}}' "$WORK/$name.rss")"
  printf 'CPU seconds over %.1f s of wall time (2 cores = %.1f CPU-s): sluice worker %.2f, %s broker %.2f, postgres %.2f, loadgen %.2f\n' "$wall" "$(echo "$wall * 2" | bc)" "$worker_cpu" "${BROKER:-tansu}" "$broker_cpu" "$pg_cpu" "$lg_cpu"
  awk -v name="$name" '
    /^sluice_inference_latency_seconds_sum/ {inf=$2}
    /^sluice_inference_latency_seconds_count/ {runs=$2}
    /^sluice_sink_write_seconds_sum\{sink="kafka"\}/ {k=$2}
    /^sluice_sink_write_seconds_count\{sink="kafka"\}/ {kn=$2}
    /^sluice_sink_write_seconds_sum\{sink="postgres"\}/ {p=$2}
    /^sluice_inference_batch_size_sum/ {rows=$2}
    END { printf "worker time: model %.2f s in %d runs (%.1f rows/run), kafka sink %.2f s in %d writes, postgres sink %.2f s\n", inf, runs, (runs>0?rows/runs:0), k, kn, p }' "$WORK/$name.metrics"
  echo
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); broker ${BROKER:-tansu} (memory) and PostgreSQL on the same machine"
want() { [ -z "${SCENARIOS:-}" ] || [[ " $SCENARIOS " == *" $1 "* ]]; }
PG_SINK() { printf '[[sinks]]\ntype = "postgres"\nurl = "postgres://sluice:sluice@127.0.0.1:5432/sluice"\ntable = "%s"\ndead_letter_table = "%s_dead"\n' "${RUN}_$1" "$RUN"; }
want drain && scenario drain "$COUNT" preload "${DRAIN_PARTITIONS:-4}" ""
want drain_postgres && scenario drain_postgres "$COUNT" preload 4 "$(PG_SINK drain)"
want kafka_only && scenario kafka_only "$COUNT" 0 4 ""
want with_postgres && scenario with_postgres "$COUNT" 0 4 "$(PG_SINK full)"
# Latency at 5,000 rides/s: one partition per topic, which is plenty for 5,000/s. Tansu's fetch
# lists every stored batch of a partition, so its cost grows with the run; with 4 partitions the
# small batches a steady rate makes are 4 times as many (latency_5k_4p shows the difference).
want latency_5k && scenario latency_5k "${LATENCY_COUNT:-60000}" 5000 1 "$(PG_SINK lat)"
want latency_5k_4p && scenario latency_5k_4p "${LATENCY_COUNT:-60000}" 5000 4 "$(PG_SINK lat4)"
