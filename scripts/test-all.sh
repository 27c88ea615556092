#!/usr/bin/env bash
# Run every check the project has, stopping at the first failure:
# dependencies, formatting, clippy, release build, unit tests, the
# end-to-end iotests against target/release/qsd, and a fuzz smoke run.
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STEPS=()
START=$SECONDS

step() {
    local name=$1
    shift
    local t0=$SECONDS
    echo
    echo "==> $name"
    if ! "$@"; then
        echo
        echo "FAILED: $name (after $((SECONDS - t0))s)"
        summary
        exit 1
    fi
    STEPS+=("ok   $name ($((SECONDS - t0))s)")
}

summary() {
    echo
    echo "==> summary"
    local s
    for s in "${STEPS[@]}"; do
        echo "  $s"
    done
    echo "  total $((SECONDS - START))s"
}

unit_tests() {
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace
    else
        cargo test --workspace
    fi
}

iotests() {
    QSD_BINARY="$PWD/target/release/qsd" "$PYTHON" -m pytest -v iotests
}

licences() {
    if ! cargo deny --version >/dev/null 2>&1; then
        echo "installing cargo-deny (about 3 minutes)..."
        cargo install cargo-deny --locked
    fi
    cargo deny check licenses bans sources
}

fuzz_smoke() {
    if [[ -x scripts/fuzz-smoke.sh ]]; then
        scripts/fuzz-smoke.sh
    else
        echo "scripts/fuzz-smoke.sh not present yet; skipped"
    fi
}

step "test dependencies" scripts/setup-test-deps.sh
step "cargo fmt" cargo fmt --all -- --check
step "cargo deny (licences, sources)" licences
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "cargo build --release -p qsd" cargo build --release -p qsd
step "unit tests" unit_tests
step "iotests (qsd)" iotests
step "fuzz smoke" fuzz_smoke

summary
echo "ALL PASSED"
