#!/usr/bin/env bash
# Cycle-exact regression guard for the forwarding hot path (issue 7; `make perfcheck`).
#
# Runs tests/perf_fwd.c (two nodes in one process over loopback UDP, PKTS IP
# packets pushed through ip_from_local -> link -> the other node's delivery)
# under valgrind's callgrind, counting only the instructions executed inside
# perf_measured(), and divides by the packet count: user-space instructions
# per forwarded packet (sender + receiver; syscalls' kernel side excluded).
# Instruction counts, not time: the result does not depend on machine load.
#
# tests/perfcheck.expected holds, per workload, the recorded count and the
# allowed slack in percent.  More than expected*(1+slack) fails; less than
# expected*(1-slack) passes with a note to record the improvement.
#   PERFCHECK_UPDATE=1 make perfcheck     rewrite the expected counts
set -u
cd "$(dirname "$0")/.." || exit 1
BIN=${1:-build/perf/perf_fwd}
EXP=tests/perfcheck.expected
PKTS=${PERFCHECK_PKTS:-3200}
if ! command -v valgrind >/dev/null 2>&1; then
    echo "perfcheck: valgrind missing (apt-get install valgrind)"; exit 2
fi
tmp=$(mktemp -d /tmp/ipop-perfcheck-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail=0
new=()
printf '%-16s %12s %12s %8s  %s\n' workload "instr/pkt" expected delta result
while read -r name exp slack; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    mode=${name%-*} size=${name#*-}
    if ! valgrind --tool=callgrind --toggle-collect=perf_measured \
            --callgrind-out-file="$tmp/cg.out" "$BIN" "$mode" "$size" "$PKTS" \
            >"$tmp/out" 2>"$tmp/err"; then
        echo "perfcheck: $name: perf_fwd failed:"; tail -5 "$tmp/out" "$tmp/err"; fail=1; continue
    fi
    ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/err")
    if [[ -z "$ir" || "$ir" -eq 0 ]]; then
        echo "perfcheck: $name: callgrind collected nothing (perf_measured inlined?)"; fail=1; continue
    fi
    per=$((ir / PKTS))
    new+=("$name $per $slack")
    read -r delta verdict < <(awk -v p="$per" -v e="$exp" -v s="$slack" 'BEGIN {
        d = 100 * (p - e) / e
        v = d > s ? "FAIL(slower)" : (d < -s ? "ok(faster:update-expected)" : "ok")
        printf "%+.2f%% %s\n", d, v }')
    printf '%-16s %12d %12d %8s  %s\n' "$name" "$per" "$exp" "$delta" "$verdict"
    [[ "$verdict" == FAIL* ]] && fail=1
done < "$EXP"
if [[ "${PERFCHECK_UPDATE:-0}" == 1 ]]; then
    { sed -n '/^#/p' "$EXP"; printf '%s\n' "${new[@]}"; } > "$tmp/exp" && cp "$tmp/exp" "$EXP"
    echo "perfcheck: $EXP updated"
    exit 0
fi
if [[ $fail -ne 0 ]]; then
    echo "perfcheck: FAILED (the hot path executes more instructions per packet than recorded;"
    echo "           if that is intended, PERFCHECK_UPDATE=1 make perfcheck and commit $EXP)"
    exit 1
fi
echo "perfcheck: ok"
