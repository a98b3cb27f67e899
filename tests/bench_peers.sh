#!/usr/bin/env bash
# ipop vs plain veth vs the peers (issue 7; `make bench`): see tests/bench_peers.py
# and docs/PERFORMANCE.md.  Needs root.  Missing tools are installed with apt-get
# (Debian packages: iperf3 tinc nebula wireguard-go wireguard-tools yggdrasil n2n);
# a peer that still cannot run is skipped and reported.
cd "$(dirname "$0")/.." || exit 1
if [ "$(id -u)" -ne 0 ]; then
    echo "bench_peers: skipped (needs root: network namespaces, tun/tap devices)"
    exit 0
fi
want=()
for t in iperf3:iperf3 tincd:tinc nebula:nebula wireguard-go:wireguard-go wg:wireguard-tools \
         yggdrasil:yggdrasil edge:n2n; do
    command -v "${t%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${t%%:*}" ] || want+=("${t#*:}")
done
if [ ${#want[@]} -gt 0 ] && [ "${IPOP_BENCH_NO_APT:-0}" != 1 ]; then
    echo "bench_peers: installing ${want[*]} (apt-get)"
    for pkg in "${want[@]}"; do   # one at a time: an unavailable one does not block the rest
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >/dev/null 2>&1 ||
            echo "bench_peers: could not install $pkg (that peer will be skipped)"
    done
fi
command -v iperf3 >/dev/null 2>&1 || { echo "bench_peers: iperf3 missing"; exit 1; }
exec python3 tests/bench_peers.py "$@"
