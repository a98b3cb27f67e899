#!/usr/bin/env bash
# Ring overlay benchmark (issue 2); see tests/bench_ring.py and docs/PERFORMANCE.md.
cd "$(dirname "$0")/.." || exit 1
exec python3 tests/bench_ring.py "$@"
