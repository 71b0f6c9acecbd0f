#!/usr/bin/env bash
# Runs Iris and peer servers (mosquitto MQTT QoS 1 with persistence, NATS
# JetStream with file storage and acked publish, NATS core) through the same
# open-loop pairs shape, each server pinned to CPU 0 and the load generator to
# CPU 1, and prints them side by side.
#
#   perf/compare-peers.sh                       # defaults below
#   PAIRS=50 RATE=400 DURATION=10 perf/compare-peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-50}
RATE=${RATE:-200}
DURATION=${DURATION:-10}
PAYLOAD=${PAYLOAD:-150}
MQTT_PORT=${MQTT_PORT:-18830}
NATS_PORT=${NATS_PORT:-14222}

if ! command -v mosquitto >/dev/null || ! command -v nats-server >/dev/null; then
    apt-get update -q && apt-get install -y -q mosquitto nats-server
fi
cargo build --release -q -p irisd -p iris-perf
perf=target/release/iris-perf
work=$(mktemp -d)
trap 'pkill -f "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
common=(--pairs "$PAIRS" --rate "$RATE" --payload "$PAYLOAD" --duration "$DURATION")

echo "== iris (fsync)"
"$perf" pairs --spawn-server --durability fsync "${common[@]}" --json "$work/iris-fsync.json" >/dev/null
echo "== iris (none)"
"$perf" pairs --spawn-server --durability none "${common[@]}" --json "$work/iris-none.json" >/dev/null

echo "== mosquitto (MQTT QoS 1, persistence on)"
mkdir -p "$work/mosquitto"
cat >"$work/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/mosquitto/
max_inflight_messages 1000
max_queued_messages 1000000
CONF
taskset -c 0 mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pid=$!
sleep 0.5
"$perf" peer --kind mqtt --port "$MQTT_PORT" --server-pid "$pid" "${common[@]}" --json "$work/mqtt.json" >/dev/null
kill "$pid"; wait "$pid" 2>/dev/null || true

echo "== nats-server (JetStream, file storage) and NATS core"
taskset -c 0 nats-server -js -sd "$work/jetstream" -a 127.0.0.1 -p "$NATS_PORT" >"$work/nats.log" 2>&1 &
pid=$!
sleep 0.5
"$perf" peer --kind nats-js --port "$NATS_PORT" --server-pid "$pid" "${common[@]}" --json "$work/nats-js.json" >/dev/null
"$perf" peer --kind nats-core --port "$NATS_PORT" --server-pid "$pid" "${common[@]}" --json "$work/nats-core.json" >/dev/null
kill "$pid"; wait "$pid" 2>/dev/null || true

python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
rows = [("iris fsync", "iris-fsync"), ("iris none", "iris-none"), ("mosquitto qos1", "mqtt"),
        ("nats jetstream", "nats-js"), ("nats core", "nats-core")]
print(f"{'server':<16} {'delivered/s':>12} {'deliv/CPU-s':>12} {'us/deliv':>9} {'p50 ms':>8} {'p99 ms':>8} {'acked':>9} {'delivered':>10}")
for name, key in rows:
    r = json.load(open(f"{work}/{key}.json"))
    d = r["deliver_latency"]
    per = r.get("delivered_per_server_cpu_second") or 0
    us = r.get("server_cpu_us_per_delivered") or 0
    c = r["counts"]
    print(f"{name:<16} {r['delivered_per_second']:>12.0f} {per:>12.0f} {us:>9.2f} {d['p50_us']/1000:>8.2f} {d['p99_us']/1000:>8.2f} {c['acked']:>9} {c['delivered']:>10}")
PY
