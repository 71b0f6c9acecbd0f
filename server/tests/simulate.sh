#!/usr/bin/env bash
# Runs the whole-shard simulation (tests/core_sim.rs) on fresh seeds, in
# rounds of ROUND seeds (default 2000), until MINUTES have passed (default
# 30) or a seed fails; the failing seed is printed (rerun it with
# IRIS_SIM_SEED=<seed>).
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes=${1:-30}
round=${ROUND:-2000}
deadline=$(( $(date +%s) + minutes * 60 ))
log=$(mktemp)
cargo test --release -p irisd --test core_sim --no-run >/dev/null 2>&1
while [ "$(date +%s)" -lt "$deadline" ]; do
    status=0
    IRIS_SIM_BASE=time IRIS_SIM_SEEDS=$round cargo test --release -q -p irisd --test core_sim -- --nocapture \
        >"$log" 2>&1 || status=$?
    grep -E "simulation seeds|simulated|reproduce" "$log" || true
    if [ "$status" -ne 0 ]; then
        grep -E "panicked at" -A2 "$log" | head -20
        exit 1
    fi
done
