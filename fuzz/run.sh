#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30): `fuzz/run.sh 30`.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain take
# the sanitizer flags. A finding leaves its input in fuzz/artifacts/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
bin="${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release"
mkdir -p artifacts
for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t"
    # A scratch copy: what the short run finds is not added to the committed corpus.
    work="$(mktemp -d)"
    cp -r "corpus/$t/." "$work/" 2>/dev/null || true
    echo "== fuzz $t for ${secs}s"
    ASAN_OPTIONS=detect_leaks=0 "$bin/$t" "$work" -max_total_time="$secs" -rss_limit_mb=2048 \
        -artifact_prefix=artifacts/ -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|#[0-9]+.*DONE|==|SUMMARY)" || true
    rm -rf "$work"
    if compgen -G "artifacts/*" >/dev/null; then
        echo "fuzz target $t found a failing input:"; ls artifacts; exit 1
    fi
done
