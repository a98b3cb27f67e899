#!/usr/bin/env bash
# Data-plane benchmark (tap mode, issue 4; security on vs off, issue 3);
# see tests/bench_tap.py and docs/PERFORMANCE.md.  Needs root and iperf3.
cd "$(dirname "$0")/.." || exit 1
if [ "$(id -u)" -ne 0 ]; then
    echo "bench_tap: skipped (needs root: network namespaces, tap devices)"
    exit 0
fi
if ! command -v iperf3 >/dev/null 2>&1; then
    echo "bench_tap: iperf3 missing, installing it"
    DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >/dev/null ||
        { echo "bench_tap: could not install iperf3"; exit 1; }
fi
exec python3 tests/bench_tap.py "$@"
