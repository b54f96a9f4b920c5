#!/bin/bash
# run_one.sh SYSTEM REP [COUNT=1000000]
#   SYSTEM: sluice | plain512 | plain1 | bw1 | bw2 | pw1 | pw2
# One measurement: a fresh Tansu broker (port $PB_PORT, default 19097), a 4-partition input topic and a
# 4-partition results topic; `sluice loadgen --preload` publishes COUNT rides (seed 42) and, once it has
# printed `preloaded`, the system starts (under /usr/bin/time -v and timeout 300) and drains the backlog;
# loadgen listens on the results topic and reports first-to-last-answer throughput, lost and duplicates.
# The window for the broker's CPU is from the system's start until the system exits or loadgen is done
# (sluice never exits on its own: it gets SIGTERM once loadgen has every answer).
# Afterwards verify.py reads both topics completely. Outputs: results/<SYSTEM>_<REP>.{lg,time,log,verify,meta}.
set -u
SYS=$1; REP=$2; COUNT=${3:-1000000}
PB=$PEERBENCH; R=$PB/results; mkdir -p $R
PORT=${PB_PORT:-19097}; BROKERS=127.0.0.1:$PORT
SLUICE=${SLUICE_BIN:-$PROJECT/target/release/sluice}   # set by benches/peers_rides.sh
TANSU=$(bash $PROJECT/scripts/kafka.sh path)
TAG=${SYS}_${REP}; IN=pb-$TAG-in-$(date +%s); OUT=pb-$TAG-out-$(date +%s)
HZ=$(getconf CLK_TCK)
cpu_of() { awk -v hz="$HZ" '{sub(/.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# machine-speed probe (CPython loop, ns per iteration), to show drift of this shared VM between runs
PROBE=$(python3 -c "
import time
t=time.perf_counter(); x=0
for i in range(1000000): x+=1
print(round((time.perf_counter()-t)*1e3,1))")
SLUICE_KAFKA_PORT=$PORT bash $PROJECT/scripts/kafka.sh stop >/dev/null 2>&1
SLUICE_KAFKA_PORT=$PORT bash $PROJECT/scripts/kafka.sh start >/dev/null || { echo "broker start failed"; exit 1; }
BPID=$(cat ~/.cache/sluice/tansu-$PORT.pid)
for t in $IN $OUT; do "$TANSU" topic create "$t" --partitions 4 --broker "tcp://$BROKERS" >/dev/null; done

# sluice topology: topologies/rides_kafka.toml without the Postgres sink, own topics, metrics on port 0, 2 workers
cat > $R/$TAG.toml <<TOML
name = "pb_$TAG"
[source]
type = "kafka"
brokers = "$BROKERS"
topic = "$IN"
group_id = "sluice-pb-$TAG"
id = { from = "field", name = "request_id" }
max_message_bytes = 65536
epoch_ms = 20
[task]
type = "tabular"
model = "$PROJECT/models/rides/model.onnx"
[batching]
max_batch = 256
max_delay_ms = 1
[runtime]
workers = 2
epoch_records = 8192
max_epochs_in_flight = 8
max_records_in_flight = 65536
[[sinks]]
type = "kafka"
brokers = "$BROKERS"
topic = "$OUT"
dead_letter_topic = "$OUT-dead"
[metrics]
listen = "127.0.0.1:0"
TOML

"$SLUICE" loadgen --brokers $BROKERS --topic $IN --results $OUT --count $COUNT --preload --drain-ms 20000 > $R/$TAG.lg 2>&1 &
LG=$!
until grep -q preloaded $R/$TAG.lg 2>/dev/null; do kill -0 $LG 2>/dev/null || { echo "loadgen died"; cat $R/$TAG.lg; exit 1; }; sleep 0.1; done
if [ "${LISTEN:-0}" = 0 ]; then
  # observer-free: stop loadgen's listener once the backlog is in; answers are counted afterwards
  kill -TERM $LG; wait $LG 2>/dev/null
fi
sleep 1   # let the broker settle after the publish burst

export BROKER=$BROKERS IN_TOPIC=$IN OUT_TOPIC=$OUT CFG=$TAG
TV="/usr/bin/time -v -o $R/$TAG.time timeout 300"
cd $PB/rides
case $SYS in
  sluice)   $TV "$SLUICE" run $R/$TAG.toml --no-progress ;;
  plain512) $TV $PB/plain/bin/python plain.py $TAG $OUT --batch 512 ;;
  plain1)   $TV $PB/plain/bin/python plain.py $TAG $OUT ;;
  bw1)      $TV $PB/bytewax/bin/python -m bytewax.run -w 1 bw_flow:flow ;;
  bw2)      $TV $PB/bytewax/bin/python -m bytewax.run -w 2 bw_flow:flow ;;
  pw1)      PATHWAY_THREADS=1 $TV $PB/pathway/bin/python pw_flow.py ;;
  pw2)      PATHWAY_THREADS=2 $TV $PB/pathway/bin/python pw_flow.py ;;
  *) echo "unknown system $SYS"; exit 2 ;;
esac > $R/$TAG.log 2>&1 &
SPID=$!   # the subshell running /usr/bin/time
B0=$(cpu_of $BPID); T0=$(date +%s.%N)
if [ "${LISTEN:-0}" = 0 ]; then
  # peers exit by themselves at the end of every partition; sluice streams on, so its Prometheus
  # counter of durable answers is polled (every 0.25 s) until it reaches COUNT or stands still for 20 s
  if [ $SYS = sluice ]; then
    MP=""; LAST=-1; STILL=0
    while kill -0 $SPID 2>/dev/null; do
      SP=$(pgrep -x sluice -P $(pgrep -x timeout -P $(pgrep -x time -P $SPID || echo $SPID) | head -1) | head -1)
      [ -z "$MP" ] && [ -n "$SP" ] && MP=$(ss -ltnpH 2>/dev/null | grep "pid=$SP," | awk '{print $4}' | head -1)
      if [ -n "$MP" ]; then
        A=$(curl -s --max-time 1 http://$MP/metrics | awk '/^sluice_sink_answers_total/ {s += $2} END {print s + 0}')
        [ "$A" -ge $COUNT ] && break
        if [ "$A" = "$LAST" ]; then STILL=$((STILL + 1)); [ $STILL -ge 80 ] && break; else STILL=0; LAST=$A; fi
      fi
      sleep 0.25
    done
  else
    while kill -0 $SPID 2>/dev/null; do sleep 0.1; done
  fi
else
  while kill -0 $SPID 2>/dev/null && kill -0 $LG 2>/dev/null; do sleep 0.1; done
fi
B1=$(cpu_of $BPID); T1=$(date +%s.%N)
if kill -0 $SPID 2>/dev/null; then
  # the system itself: time -> timeout -> system
  TPID=$(pgrep -P $SPID -x time || true); [ -z "$TPID" ] && TPID=$SPID
  TOPID=$(pgrep -P $TPID -x timeout || true); CH=$(pgrep -P ${TOPID:-0} | head -1)
  STOPPED_BY="SIGTERM to pid ${CH:-?} once done (answer counter or loadgen)"
  [ -n "$CH" ] && kill -TERM $CH
fi
wait $SPID; SRC=$?
wait $LG 2>/dev/null
BHWM=$(awk '/VmHWM/ {print $2}' /proc/$BPID/status)
cd $PB/rides && BROKER=$BROKERS $PB/plain/bin/python verify.py $OUT $IN > $R/$TAG.verify 2>&1
SLUICE_KAFKA_PORT=$PORT bash $PROJECT/scripts/kafka.sh stop >/dev/null 2>&1
cat > $R/$TAG.meta <<META
{"system": "$SYS", "rep": "$REP", "count": $COUNT, "in": "$IN", "out": "$OUT", "rc": $SRC,
 "broker_cpu_s": $(echo "$B1 - $B0" | bc | sed 's/^\./0./;s/^-\./-0./'), "window_s": $(echo "$T1 - $T0" | bc | sed 's/^\./0./'), "broker_vmhwm_kb": ${BHWM:-0},
 "stopped_by": "${STOPPED_BY:-exited by itself}", "listen": ${LISTEN:-0}, "speed_probe_ns": $PROBE}
META
echo "== $TAG rc=$SRC probe=${PROBE}ns $(grep -o 'answered.*' $R/$TAG.lg | head -1)"
echo "   $(cat $R/$TAG.verify)"
echo "   broker $(echo "$B1 - $B0" | bc) CPU-s; $(grep -E 'Maximum resident' $R/$TAG.time); user $(awk -F': ' '/User time/ {print $2}' $R/$TAG.time) sys $(awk -F': ' '/System time/ {print $2}' $R/$TAG.time)"
