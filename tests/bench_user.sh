#!/usr/bin/env bash
# User-mode benchmark (issue 5): ipop SOCKS5 and -L (unprivileged node) vs
# ssh -L and plain veth; see tests/bench_user.py and docs/PERFORMANCE.md.
# Needs root (network namespaces, a tap device); the user-mode node runs as nobody.
cd "$(dirname "$0")/.." || exit 1
if [ "$(id -u)" -ne 0 ]; then
    echo "bench_user: skipped (needs root: network namespaces, tap devices)"
    exit 0
fi
for t in curl sshd ssh ssh-keygen setpriv; do
    command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] ||
        { echo "bench_user: missing $t"; exit 1; }
done
exec python3 tests/bench_user.py "$@"
