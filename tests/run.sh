#!/usr/bin/env bash
# Single test entry point (make test calls it).
#   tests/run.sh [FILTER]
# Runs: unit binaries (as built by make unit / make unit-asan), tests/t_*.py,
# and a short fuzz pass. FILTER = substring of test names
# (e.g. "unit:", "asan", "t_ring", "fuzz"). Each test's output goes to
# build/test-logs/NAME.log; on failure the last 40 lines are printed.
# Last line: "N passed, N failed"; exit status non-zero if any failed.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
FILTER=${1:-}
LOGDIR=$ROOT/build/test-logs
mkdir -p "$LOGDIR"
# Nodes keep state (--ip auto leases, remembered peers) under
# $XDG_STATE_HOME/ipop: the tests' own, fresh each run, not the user's.
export XDG_STATE_HOME=$ROOT/build/test-state
rm -rf "$XDG_STATE_HOME"
# What the tests drive (ping, sshd, nft, iperf3, mpirun, clang ...): installed
# now when we are root and something is missing (the list: tests/deps.sh);
# otherwise named, and the tests that need it fail saying so.
if [ -z "${IPOP_TEST_NO_INSTALL:-}" ]; then
    tests/deps.sh || echo "tests: going on without them"
fi
PASS=0
FAIL=0
FAILED_NAMES=()
FLAKY_NAMES=()
# A test that fails fails the run: a flaky test is a bug to find, not to
# retry away.  IPOP_TEST_RETRY=1 runs a failed integration test once more
# for diagnosis (the first run's log is kept); a pass on that retry is
# reported as FLAKY and still counts as a failure.
RETRY=${IPOP_TEST_RETRY:-0}
PY_TIMEOUT=${IPOP_TEST_TIMEOUT:-600}
UNIT_TIMEOUT=${IPOP_UNIT_TIMEOUT:-300}

want() { [ -z "$FILTER" ] || [[ "$1" == *"$FILTER"* ]]; }

logname() { printf '%s' "$1" | tr '/: ' '___'; }

# run_test NAME TIMEOUT CMD...
run_test() {
    local name=$1 tmo=$2
    shift 2
    local logf="$LOGDIR/$(logname "$name").log"
    local t0=$SECONDS rc
    printf '%-40s ' "$name"
    timeout -k 10 "$tmo" "$@" >"$logf" 2>&1 </dev/null
    rc=$?
    if [ $rc -eq 0 ]; then
        PASS=$((PASS + 1))
        echo "PASS ($((SECONDS - t0))s)"
    else
        FAIL=$((FAIL + 1))
        FAILED_NAMES+=("$name")
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            echo "FAIL (timeout after ${tmo}s, rc=$rc)"
        else
            echo "FAIL (rc=$rc, $((SECONDS - t0))s)"
        fi
        echo "---- last 40 lines of $logf"
        tail -n 40 "$logf" | sed 's/^/    /'
        echo "----"
    fi
}

has_target() { make -n "$1" >/dev/null 2>&1; }

# ---- (a) unit tests: tests/unit_NAME.c -> build/tests/unit_NAME (musl)
# and build/tests/unit_NAME-asan (ASan/UBSan), the Makefile's `make unit` /
# `make unit-asan` layout. We build those exact files through the Makefile
# (its unit targets would also run them) and run each binary here as one
# test, with the sanitizer options the Makefile uses.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
shopt -s nullglob
UNIT_SRCS=(tests/unit_*.c)
shopt -u nullglob
for variant in unit unit-asan; do
    suffix=; [ "$variant" = unit-asan ] && suffix=-asan
    bins=()
    for src in "${UNIT_SRCS[@]}"; do
        n=$(basename "$src" .c)$suffix
        if want "$variant:$n" || want "build-$variant"; then
            bins+=("build/tests/$n")
        fi
    done
    [ ${#bins[@]} -gt 0 ] || continue
    run_test "build-$variant" 1200 make "${bins[@]}"
    for b in "${bins[@]}"; do
        if [ -x "$b" ]; then
            run_test "$variant:$(basename "$b")" "$UNIT_TIMEOUT" "$ROOT/$b"
        else
            FAIL=$((FAIL + 1)); FAILED_NAMES+=("$variant:$(basename "$b")")
            printf '%-40s FAIL (not built)\n' "$variant:$(basename "$b")"
        fi
    done
done

# ---- (b) integration tests
for f in tests/t_*.py; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .py)
    want "$name" || continue
    run_test "$name" "$PY_TIMEOUT" python3 "$f"
    if [ "$RETRY" -gt 0 ] && [ ${#FAILED_NAMES[@]} -gt 0 ] && [ "${FAILED_NAMES[-1]}" = "$name" ]; then
        FAIL=$((FAIL - 1))
        unset 'FAILED_NAMES[-1]'
        logf="$LOGDIR/$(logname "$name").log"
        mv "$logf" "${logf%.log}.first-failure.log"
        echo "    retrying $name once (first run's log: ${logf%.log}.first-failure.log)"
        run_test "$name (retry)" "$PY_TIMEOUT" python3 "$f"
        if [ ${#FAILED_NAMES[@]} -eq 0 ] || [ "${FAILED_NAMES[-1]}" != "$name (retry)" ]; then
            FLAKY_NAMES+=("$name")
            PASS=$((PASS - 1))
            FAIL=$((FAIL + 1))
            FAILED_NAMES+=("$name (flaky)")
        fi
    fi
done

# ---- (c) optional short fuzz pass: `make fuzz-short` if the Makefile has
# it, else `make fuzz FUZZ_SECONDS=N` (N=$IPOP_FUZZ_SECONDS, default 10) when
# there are tests/fuzz_*.c targets; IPOP_FUZZ_SECONDS=0 skips it.
if want "fuzz-short" && [ "${IPOP_FUZZ_SECONDS:-10}" != 0 ]; then
    if has_target fuzz-short; then
        run_test "fuzz-short" 1200 make fuzz-short
    elif compgen -G "tests/fuzz_*.c" >/dev/null && has_target fuzz; then
        run_test "fuzz-short" 1200 make fuzz FUZZ_SECONDS="${IPOP_FUZZ_SECONDS:-10}"
    fi
fi

if [ ${#FAILED_NAMES[@]} -gt 0 ]; then
    echo "failed: ${FAILED_NAMES[*]}"
fi
if [ ${#FLAKY_NAMES[@]} -gt 0 ]; then
    echo "FLAKY (failed, then passed on the retry; counted as failed; see build/test-logs/*.first-failure.log): ${FLAKY_NAMES[*]}"
fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
