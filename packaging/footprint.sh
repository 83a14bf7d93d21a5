#!/usr/bin/env bash
# Footprint benchmark: stripped release binary size per target, then memory, idle CPU and
# start-up time of the agent on this machine (`outpost bench --footprint`).
#
#   packaging/footprint.sh                 # all targets, full measurement (about 3 minutes)
#   IDLE_SECS=10 packaging/footprint.sh    # shorter idle-CPU window
#
# Cross targets need: rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
# and Debian's gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf (see README, "ARM gateways").
set -euo pipefail
cd "$(dirname "$0")/.."

size() { stat -c %s "$1" | awk '{printf "%.2f MB", $1/1e6}'; }

echo "== stripped release binaries (profile.release: opt-level s, fat LTO, 1 codegen unit, panic=abort, strip)"
for target in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    cargo build -q --release -p outpost-agent --target "$target"
    printf '  %-34s %s\n' "$target" "$(size "target/$target/release/outpost")"
done
cargo build -q --release -p outpost-agent --target aarch64-unknown-linux-gnu --no-default-features \
    --target-dir target/minimal
printf '  %-34s %s\n' "aarch64, --no-default-features" "$(size target/minimal/aarch64-unknown-linux-gnu/release/outpost)"

echo "== running agent (native build; memory and CPU on ARM are of the same order, 32-bit armv7 less)"
target/x86_64-unknown-linux-gnu/release/outpost bench --footprint --idle-secs "${IDLE_SECS:-60}"
