#!/usr/bin/env bash
# Online inference over HTTP, side by side on one machine, one model and one load generator
# (benches/oip_load.rs, Open Inference Protocol JSON, one ride per request):
#   sluice   `sluice serve` (release), its rides template, 2 timely workers;
#   fastapi  FastAPI + uvicorn (2 workers) + onnxruntime, one request per model run
#            (benches/online/fastapi_rides.py);
#   mlserver MLServer from PyPI with its adaptive batching on (max_batch_size 512, max_batch_time
#            2 ms) and an onnxruntime custom runtime (benches/online/mlserver/).
# For each, rounds interleaved: the saturation rate (closed loop, CONNS connections, SECONDS s)
# and its p99; then sluice's p99 open-loop at half its own saturation rate; then sluice's online
# p99 at a steady RATE req/s alone and while a 1M-ride job runs on the same model (with the
# model's mean batch time); then QA requests over HTTP against the same questions as a job.
#
#   benches/online_load.sh [rounds=2] [seconds=10] [conns=64]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
SECONDS_RUN="${2:-10}"
CONNS="${3:-64}"
RATE="${RATE:-500}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --bin sluice --bench oip_load >&2
BIN="${SLUICE_BIN:-$CARGO_TARGET_DIR/release/sluice}"
LOAD=$(ls -t "$CARGO_TARGET_DIR"/release/deps/oip_load-* | grep -v '\.d$' | head -n1)
lib=$(bash scripts/setup.sh | sed -n 's/^setup: ONNX Runtime library at //p')
export ORT_DYLIB_PATH="$lib"
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
PEERS="$CACHE/venv-online"
if [ ! -x "$PEERS/bin/mlserver" ] || ! "$PEERS/bin/python" -c "import fastapi, uvicorn, onnxruntime, uvloop, sys; sys.exit(uvloop.__version__ >= '0.22')" 2>/dev/null; then
  echo "online_load: installing the peers (mlserver, fastapi, uvicorn, onnxruntime) into $PEERS" >&2
  python3 -m venv "$PEERS"
  # uvloop 0.22 refuses asyncio.get_event_loop() in a fresh process, which MLServer 1.7.1's inference
  # workers call: they die at start and no model loads. 0.21 is the uvloop MLServer 1.7.1 shipped with.
  "$PEERS/bin/pip" install -q mlserver==1.7.1 "uvloop<0.22" fastapi uvicorn onnxruntime==1.31.1 numpy
fi
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
export MODEL="$PWD/models/rides/model.onnx"
echo "online_load: $ROUNDS rounds, ${SECONDS_RUN}s each, $CONNS connections (machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"

cat > "$WORK/serve.toml" <<EOF
workers = 2
[templates]
rides = "topologies/rides_generator.toml"
qa = "topologies/qa_csv.toml"
EOF
"$BIN" serve --config "$WORK/serve.toml" --listen 127.0.0.1:8000 --state "$WORK/state" > "$WORK/sluice.out" 2> "$WORK/sluice.err" &
"$PEERS/bin/uvicorn" --workers 2 --app-dir benches/online --host 127.0.0.1 --port 8001 --log-level warning --no-access-log fastapi_rides:app > "$WORK/fastapi.log" 2>&1 &
(cd benches/online/mlserver && exec "$PEERS/bin/mlserver" start .) > "$WORK/mlserver.log" 2>&1 &
wait_up() {
  for _ in $(seq 1 300); do
    if curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' "http://127.0.0.1:$1/v2/models/rides/infer" \
      -d '{"inputs":[{"name":"PULocationID","shape":[1],"datatype":"INT64","data":[1]},{"name":"DOLocationID","shape":[1],"datatype":"INT64","data":[2]},{"name":"trip_distance","shape":[1],"datatype":"FP64","data":[1.5]}]}'; then
      return 0
    fi
    sleep 0.2
  done
  echo "online_load: nothing answers on port $1" >&2
  cat "$WORK"/*.log "$WORK/sluice.err" >&2
  exit 1
}
wait_up 8000
wait_up 8001
wait_up 8002
load() { "$LOAD" --url "127.0.0.1:$1" --seconds "$SECONDS_RUN" --warmup 2 --label "$2" "${@:3}"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

declare -A SAT P99
for r in $(seq 1 "$ROUNDS"); do
  for sys in sluice:8000 fastapi:8001 mlserver:8002; do
    name=${sys%%:*}
    port=${sys##*:}
    line=$(load "$port" "$name" --connections "$CONNS")
    echo "saturation round $r: $line"
    SAT[$name]="${SAT[$name]:-} $(field "$line" ok_per_s)"
    P99[$name]="${P99[$name]:-} $(field "$line" p99_ms)"
  done
done
mean() { python3 -c "import sys; v=[float(x) for x in sys.argv[1:]]; print(f'{sum(v)/len(v):.1f}')" $1; }
s=$(mean "${SAT[sluice]}")
f=$(mean "${SAT[fastapi]}")
m=$(mean "${SAT[mlserver]}")
echo "saturation (mean ok/s; p99 ms per round): sluice $s (${P99[sluice]} ); fastapi $f (${P99[fastapi]} ); mlserver $m (${P99[mlserver]} )"
python3 -c "import sys; s,f,m=map(float,sys.argv[1:]); print(f'ratio: sluice/fastapi {s/f:.2f}x, sluice/mlserver {s/m:.2f}x')" "$s" "$f" "$m"

half=$(python3 -c "print(round(float('$s') / 2))")
echo "half saturation: $(load 8000 sluice-half --connections "$CONNS" --rate "$half")"

# Online p99 at a steady rate, alone and beside a 1M-ride job on the same model.
stats() { curl -s http://127.0.0.1:8000/v2/models/rides/stats; }
echo "steady alone: $(load 8000 sluice-alone --connections 32 --rate "$RATE")"
before=$(stats)
curl -s -X POST -H 'Content-Type: application/json' http://127.0.0.1:8000/v1/jobs \
  -d '{"template": "rides", "source": {"type": "generator", "count": 100000000, "seed": 9}}' > "$WORK/job.json"
job=$(field "$(cat "$WORK/job.json")" job_id)
sleep 1
echo "steady beside the job: $(load 8000 sluice-with-job --connections 32 --rate "$RATE")"
after=$(stats)
curl -s -X POST "http://127.0.0.1:8000/v1/jobs/$job/cancel" > /dev/null
python3 - "$before" "$after" <<'PY'
import json, sys
b, a = (json.loads(x)["stats"] for x in sys.argv[1:3])
runs, micros = a["runs"] - b["runs"], a["run_micros"] - b["run_micros"]
print(f"model runs meanwhile: {runs}, mean batch time {micros / max(runs, 1) / 1000:.2f} ms, units {a['units'] - b['units']}")
PY

# QA over HTTP against the same questions as a job.
python3 - "$WORK" <<'PY'
import csv, json, sys
rows = [r for r in csv.DictReader(open("tests/data/squad_dev.csv", newline="", encoding="utf-8")) if r.get("question") and r.get("context")]
with open(f"{sys.argv[1]}/qa_bodies.jsonl", "w") as out:
    for i, r in enumerate(rows):
        out.write(json.dumps({"id": f"q{i}", "inputs": [{"name": "question", "shape": [1], "datatype": "BYTES", "data": [r["question"]]}, {"name": "context", "shape": [1], "datatype": "BYTES", "data": [r["context"]]}]}) + "\n")
with open(f"{sys.argv[1]}/qa.csv", "w", newline="", encoding="utf-8") as out:
    w = csv.writer(out)
    w.writerow(["id", "question", "context"])
    for i, r in enumerate(rows):
        w.writerow([f"q{i}", r["question"], r["context"]])
print(f"qa: {len(rows)} questions")
PY
echo "qa over http: $("$LOAD" --url 127.0.0.1:8000 --path /v2/models/qa/infer --bodies "$WORK/qa_bodies.jsonl" --connections 16 --seconds "$SECONDS_RUN" --warmup 2 --label qa-http)"
n=$(($(wc -l < "$WORK/qa.csv") - 1))
start=$(date +%s.%N)
job=$(field "$(curl -s -F model=qa -F "file=@$WORK/qa.csv" http://127.0.0.1:8000/v1/jobs/upload)" job_id)
while [ "$(field "$(curl -s "http://127.0.0.1:8000/v1/jobs/$job")" status)" != "succeeded" ]; do sleep 0.05; done
end=$(date +%s.%N)
python3 -c "import sys; n, t = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(f'qa as a job: {n} questions in {t:.2f} s = {n / t:.1f} questions/s')" "$n" "$start" "$end"
