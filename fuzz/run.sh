#!/usr/bin/env bash
# Builds every fuzz target, then runs each for a bounded time on its seed
# corpus (fuzz/corpus/<target>) and its committed crashes
# (fuzz/regressions/<target>, which are re-run first). Exits non-zero if
# any target crashes, times out or runs out of memory; its input is left
# in fuzz/artifacts/<target>/ and the log in fuzz/target/fuzz-logs/.
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_RUNS       also stop a target after this many executions
#   FUZZ_TARGETS    space-separated targets (default: all, `cargo fuzz list`)
#   FUZZ_SANITIZER  none (default) or address
#   FUZZ_TOOLCHAIN  default nightly
#   CARGO_BUILD_JOBS, as for cargo (e.g. 1 on a shared machine)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# New inputs found go to fuzz/target/fuzz-work/<target>, never into the
# committed corpus.
set -uo pipefail

cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-20}
SANITIZER=${FUZZ_SANITIZER:-none}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
RUNS=()
[ -n "${FUZZ_RUNS:-}" ] && RUNS=(-runs="$FUZZ_RUNS")
TRIPLE=$(rustc +"$TOOLCHAIN" -vV | sed -n 's/^host: //p')

start=$(date +%s)
# -a: debug assertions and overflow checks, so an arithmetic overflow on
# outside input is a crash too.
if ! cargo +"$TOOLCHAIN" fuzz build -s "$SANITIZER" -a; then
    echo "fuzz: build failed" >&2
    exit 2
fi
built=$(date +%s)
echo "fuzz: built in $((built - start)) s"

TARGETS=${FUZZ_TARGETS:-$(cargo +"$TOOLCHAIN" fuzz list)}
mkdir -p target/fuzz-logs
failed=()
printf '%-16s %12s  %s\n' target executions result
for t in $TARGETS; do
    bin=target/$TRIPLE/release/$t
    work=target/fuzz-work/$t
    mkdir -p "$work" "artifacts/$t" "corpus/$t"
    dirs=("$work" "corpus/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    log=target/fuzz-logs/$t.log
    "$bin" "${dirs[@]}" \
        -max_total_time="$SECONDS_EACH" "${RUNS[@]}" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ $rc -eq 0 ]; then
        printf '%-16s %12s  ok\n' "$t" "${execs:-?}"
    else
        printf '%-16s %12s  FAILED (exit %d), see fuzz/%s\n' "$t" "${execs:-?}" "$rc" "$log"
        grep -m1 -A15 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" | sed 's/^/    /'
        failed+=("$t")
    fi
done
echo "fuzz: $((built - start)) s building, $(( $(date +%s) - built )) s fuzzing"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
