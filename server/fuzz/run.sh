#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20; `run.sh 600` for a
# longer run) from the committed corpus, which grows in place (commit what
# `cargo fuzz cmin` keeps of it). A crash fails the run and leaves its
# input in server/fuzz/artifacts/<target>/.
# Uses the nightly toolchain if there is one; otherwise stable with
# RUSTC_BOOTSTRAP=1, which accepts the flags cargo-fuzz passes to rustc.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
cargo "${toolchain[@]}" fuzz build -s none
log=$(mktemp)
for target in frame_decoder log_records token config shard_core; do
    echo "== fuzz $target for ${seconds}s"
    status=0
    cargo "${toolchain[@]}" fuzz run -s none "$target" -- -max_total_time="$seconds" >"$log" 2>&1 || status=$?
    grep -E "^#[0-9]+[[:space:]]+DONE|panicked|ERROR|SUMMARY|Test unit written" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log"
        echo "fuzz: $target failed (exit $status)" >&2
        exit 1
    fi
done
