#!/usr/bin/env bash
# The test suite, on any machine of this project's kind (Debian, root): installs
# what the suite needs and the machine lacks, then runs every test.
#   - a C compiler (the build scripts of ring and glommio compile C);
#   - mosquitto and nats-server (the perf harness's peer smoke test starts them);
#   - systemd, for systemd-analyze, systemd-sysusers and systemd-tmpfiles (the
#     deploy tests check the unit and its snippets), and systemd-container:
#     the operator test boots systemd as PID 1 in a systemd-nspawn container
#     and runs irisd as the unit there;
#   - prometheus and its promtool (the metrics tests scrape irisd with it and
#     check the exposition, the scrape config and the alert rules).
# Extra arguments go to `cargo test` (e.g. `bash scripts/test.sh -p irisd`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

exec cargo test --workspace --locked "$@"
