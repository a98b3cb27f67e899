#!/usr/bin/env bash
# Single test entry point (make test calls it).
#   tests/run.sh [FILTER]
# Runs: unit binaries (make unit, make unit-asan), tests/t_*.py, and
# make fuzz-short if that target exists. FILTER = substring of test names
# (e.g. "unit:", "asan", "t_ring", "fuzz"). Each test's output goes to
# build/test-logs/NAME.log; on failure the last 40 lines are printed.
# Last line: "N passed, N failed"; exit status non-zero if any failed.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
FILTER=${1:-}
LOGDIR=$ROOT/build/test-logs
mkdir -p "$LOGDIR"
PASS=0
FAIL=0
FAILED_NAMES=()
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

# run every executable in DIR as one test each, named PREFIX:basename
run_unit_dir() {
    local prefix=$1 dir=$2 f n=0
    [ -d "$dir" ] || return 1
    for f in "$dir"/*; do
        [ -f "$f" ] && [ -x "$f" ] || continue
        n=$((n + 1))
        want "$prefix:$(basename "$f")" || continue
        run_test "$prefix:$(basename "$f")" "$UNIT_TIMEOUT" "$f"
    done
    [ $n -gt 0 ]
}

# does FILTER select anything of this unit variant? (before building we
# only know the names from a previous build, if any)
unit_wanted() {
    local v=$1 f
    [ -z "$FILTER" ] && return 0
    [[ "make-$v" == *"$FILTER"* ]] && return 0
    [[ "$FILTER" == "$v:"* ]] && return 0
    for f in build/tests/* build/tests-asan/* build/asan/tests/* build/asan-tests/*; do
        [ -f "$f" ] && [ -x "$f" ] || continue
        [[ "$v:$(basename "$f")" == *"$FILTER"* ]] && return 0
    done
    return 1
}

# ---- (a) unit tests, plain then ASan
for variant in unit unit-asan; do
    unit_wanted "$variant" || continue
    if ! has_target "$variant"; then
        FAIL=$((FAIL + 1)); FAILED_NAMES+=("make-$variant")
        echo "make-$variant                               FAIL (no '$variant' target in Makefile)"
        continue
    fi
    run_test "make-$variant" 900 make "$variant"
    # the build may put the asan binaries elsewhere; otherwise they
    # replaced build/tests/*
    dir=$ROOT/build/tests
    if [ "$variant" = unit-asan ]; then
        for d in build/tests-asan build/asan/tests build/asan-tests build/tests/asan; do
            if [ -d "$ROOT/$d" ]; then dir=$ROOT/$d; break; fi
        done
    fi
    if ! run_unit_dir "$variant" "$dir"; then
        FAIL=$((FAIL + 1)); FAILED_NAMES+=("$variant:none")
        echo "$variant:(none)                             FAIL (no executables in ${dir#$ROOT/})"
    fi
done

# ---- (b) integration tests
for f in tests/t_*.py; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .py)
    want "$name" || continue
    run_test "$name" "$PY_TIMEOUT" python3 "$f"
done

# ---- (c) optional short fuzz pass
if want "fuzz-short" && has_target fuzz-short; then
    run_test "fuzz-short" 900 make fuzz-short
fi

if [ ${#FAILED_NAMES[@]} -gt 0 ]; then
    echo "failed: ${FAILED_NAMES[*]}"
fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
