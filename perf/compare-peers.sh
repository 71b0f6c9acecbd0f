#!/usr/bin/env bash
# Runs Iris, the raw QUIC ceiling (minimal quinn echo and relay) and peer
# servers (mosquitto MQTT QoS 1 with persistence, NATS JetStream with file
# storage and acked publish, NATS core) through the same pairs shape, each
# server pinned to CPU 0 and the load generator to CPU 1, and prints them side
# by side.
#
#   perf/compare-peers.sh                  # the issue's two shapes, then open loop
#   SHAPES=many perf/compare-peers.sh      # 100 connections x 1 in flight
#   SHAPES=few perf/compare-peers.sh       # 10 connections x 16 in flight
#   SHAPES=open PAIRS=50 RATE=400 perf/compare-peers.sh   # open loop at a fixed rate
#
# Closed-loop shapes count a message "in flight" until it is delivered to the
# partner (for the echo: until it came back), the same rule for every server.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPES=${SHAPES:-"many few open"}
PAIRS=${PAIRS:-50}
RATE=${RATE:-200}
DURATION=${DURATION:-5}
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

# run_shape NAME PAIRS INFLIGHT (0 = open loop at RATE)
run_shape() {
    local name=$1 pairs=$2 inflight=$3 dir="$work/$1"
    mkdir -p "$dir"
    local common=(--pairs "$pairs" --payload "$PAYLOAD" --duration "$DURATION")
    if [ "$inflight" -gt 0 ]; then common+=(--inflight "$inflight"); else common+=(--rate "$RATE"); fi
    echo "== $name: ${common[*]}"
    if [ "$inflight" -gt 0 ]; then
        for mode in echo relay; do
            "$perf" raw-quic --mode "$mode" --connections $((2 * pairs)) --inflight "$inflight" \
                --payload "$PAYLOAD" --duration "$DURATION" --json "$dir/quinn-$mode.json" >/dev/null
        done
    fi
    "$perf" pairs --spawn-server --durability fsync "${common[@]}" --json "$dir/iris-fsync.json" >/dev/null
    "$perf" pairs --spawn-server --durability none "${common[@]}" --json "$dir/iris-none.json" >/dev/null

    mkdir -p "$dir/mosquitto"
    cat >"$dir/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $dir/mosquitto/
max_inflight_messages 1000
max_queued_messages 1000000
CONF
    taskset -c 0 mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
    local pid=$!
    sleep 0.5
    "$perf" peer --kind mqtt --port "$MQTT_PORT" --server-pid "$pid" "${common[@]}" --json "$dir/mqtt.json" >/dev/null
    kill "$pid"; wait "$pid" 2>/dev/null || true

    taskset -c 0 nats-server -js -sd "$dir/jetstream" -a 127.0.0.1 -p "$NATS_PORT" >"$dir/nats.log" 2>&1 &
    pid=$!
    sleep 0.5
    "$perf" peer --kind nats-js --port "$NATS_PORT" --server-pid "$pid" "${common[@]}" --json "$dir/nats-js.json" >/dev/null
    "$perf" peer --kind nats-core --port "$NATS_PORT" --server-pid "$pid" "${common[@]}" --json "$dir/nats-core.json" >/dev/null
    kill "$pid"; wait "$pid" 2>/dev/null || true

    python3 - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
rows = [("quinn echo", "quinn-echo"), ("quinn relay", "quinn-relay"), ("iris fsync", "iris-fsync"),
        ("iris none", "iris-none"), ("mosquitto qos1", "mqtt"), ("nats jetstream", "nats-js"),
        ("nats core", "nats-core")]
print(f"{'server':<16} {'delivered/s':>12} {'deliv/CPU-s':>12} {'us/deliv':>9} {'p50 ms':>8} {'p99 ms':>8} {'delivered':>10}")
for name, key in rows:
    path = f"{d}/{key}.json"
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    if r["scenario"] == "raw-quic":
        rate, per, us = r["echoed_per_second"], r.get("messages_per_server_cpu_second") or 0, r.get("server_cpu_us_per_message") or 0
        lat, count = r["round_trip_latency"], r["echoed"]
    else:
        rate, per, us = r["delivered_per_second"], r.get("delivered_per_server_cpu_second") or 0, r.get("server_cpu_us_per_delivered") or 0
        lat, count = r["deliver_latency"], r["counts"]["delivered"]
    print(f"{name:<16} {rate:>12.0f} {per:>12.0f} {us:>9.2f} {lat['p50_us']/1000:>8.2f} {lat['p99_us']/1000:>8.2f} {count:>10}")
PY
}

for shape in $SHAPES; do
    case $shape in
        many) run_shape "many-connections-x1" 50 1 ;;
        few) run_shape "few-connections-x16" 5 16 ;;
        open) run_shape "open-loop-${RATE}-per-user" "$PAIRS" 0 ;;
        *) echo "unknown shape $shape (many, few, open)" >&2; exit 2 ;;
    esac
done
