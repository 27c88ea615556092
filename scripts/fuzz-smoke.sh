#!/usr/bin/env bash
# Short fuzzing run of every target in fuzz/fuzz_targets/, for CI and before
# a commit. Each target starts from a temporary copy of fuzz/seeds/<target>/
# (the seeds themselves are never modified) and runs for FUZZ_SECONDS.
#
#   scripts/fuzz-smoke.sh                 # every target, 20 s each
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh keyval qmp_input
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_PARALLEL  targets fuzzed at the same time (default: 2, at most nproc)
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang (default 10)
#   FUZZ_SANITIZER cargo-fuzz sanitizer: none (default) or address
#
# The fuzzed crates forbid unsafe code, so AddressSanitizer finds little there
# and makes the QMP target about six times slower; panics, failed assertions
# and integer overflows (debug assertions are on) are caught either way. Use
# FUZZ_SANITIZER=address for long campaigns (see fuzz/README.md).
#
# cargo-fuzz passes nightly-only flags (-Z...); RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them. Crash inputs are kept in
# fuzz/artifacts/<target>/. Exits non-zero if any target crashed or failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz_dir="$root/fuzz"
seconds=${FUZZ_SECONDS:-20}
timeout=${FUZZ_TIMEOUT:-10}
sanitizer=${FUZZ_SANITIZER:-none}
cores=$(nproc 2>/dev/null || echo 1)
parallel=${FUZZ_PARALLEL:-$((cores < 2 ? cores : 2))}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz (takes a few minutes)..."
    start=$(date +%s)
    cargo install cargo-fuzz --locked
    echo "fuzz-smoke: cargo-fuzz installed in $(($(date +%s) - start)) s"
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in "$fuzz_dir"/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/qsd-fuzz-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Build everything once, up front, so the fuzzing time is not spent compiling
# and a build failure is reported as such.
start=$(date +%s)
build_all() {
    if [ $# -eq 0 ]; then
        cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$sanitizer"
    else
        # `cargo fuzz build` takes at most one target.
        for t in "$@"; do cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$sanitizer" "$t" || return 1; done
    fi
}
if ! build_all "$@" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    echo "fuzz-smoke: build failed" >&2
    exit 2
fi
echo "fuzz-smoke: built in $(($(date +%s) - start)) s"

run_target() {
    local t=$1 corpus="$work/corpus-$1" log="$work/$1.log"
    mkdir -p "$corpus"
    if [ -d "$fuzz_dir/seeds/$t" ]; then
        cp -r "$fuzz_dir/seeds/$t/." "$corpus/"
    fi
    local rc=0
    (cd "$root" && cargo fuzz run --fuzz-dir "$fuzz_dir" -s "$sanitizer" "$t" "$corpus" -- \
        -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1) \
        >"$log" 2>&1 || rc=$?
    echo "$rc" >"$work/$t.rc"
}

summary() {
    local t=$1 log="$work/$1.log" rc
    rc=$(cat "$work/$t.rc")
    # libFuzzer ends with "Done <runs> runs in <secs> second(s)".
    local done_line runs secs corpus
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n1 || true)
    runs=$(sed -E 's/^Done ([0-9]+) runs.*/\1/' <<<"$done_line")
    secs=$(sed -E 's/.* in ([0-9]+) second.*/\1/' <<<"$done_line")
    corpus=$(find "$work/corpus-$t" -type f | wc -l)
    if [ "$rc" = 0 ] && [ -n "$done_line" ]; then
        printf 'fuzz-smoke: %-16s ok     %10s runs in %3s s, corpus %s files\n' \
            "$t" "$runs" "$secs" "$corpus"
        return 0
    fi
    printf 'fuzz-smoke: %-16s FAILED (exit %s)\n' "$t" "$rc"
    local why
    why=$(grep -m1 -A4 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$log" || true)
    [ -n "$why" ] || why=$(grep -vE '^#[0-9]+' "$log" | tail -n 20)
    sed 's/^/    /' <<<"$why"
    local artifact
    artifact=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -n1 | sed 's/Test unit written to //' || true)
    if [ -n "$artifact" ]; then
        echo "    crash input: $artifact"
        echo "    reproduce:   RUSTC_BOOTSTRAP=1 cargo fuzz run -s $sanitizer $t $artifact"
    fi
    echo "    full log:    $work/$t.log"
    return 1
}

running=0
for t in "${targets[@]}"; do
    if [ ! -f "$fuzz_dir/fuzz_targets/$t.rs" ]; then
        echo "fuzz-smoke: no such target '$t'" >&2
        exit 2
    fi
    run_target "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$parallel" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

failed=0
for t in "${targets[@]}"; do
    summary "$t" || failed=1
done
if [ "$failed" != 0 ]; then
    trap - EXIT # keep the logs and corpora for a look
    echo "fuzz-smoke: FAILED; crash inputs are in fuzz/artifacts/<target>/" >&2
    exit 1
fi
echo "fuzz-smoke: all ${#targets[@]} targets ok"
