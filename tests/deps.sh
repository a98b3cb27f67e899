#!/usr/bin/env bash
# What `make test` drives, as Debian packages: the one list that tests/run.sh
# (make test) and .ci/run install from.  The build's own tools are build.sh's.
#   tests/deps.sh          as root: install what is missing (apt-get);
#                          otherwise: name what is missing and how to get it
#   tests/deps.sh --check  only name what is missing (exit 1 if anything is)
#   tests/deps.sh demo     the same for what `make demo` runs (python3, curl)
set -uo pipefail
PKGS=(musl-tools make gcc autoconf automake libtool clang libclang-rt-dev xz-utils bzip2 curl
      iputils-ping iproute2 iperf3 openssh-server openssh-client nftables socat jq python3 procps
      psmisc file netcat-openbsd ca-certificates conntrack openmpi-bin libopenmpi-dev)
if [ "${1:-}" = demo ]; then
    PKGS=(python3 curl ca-certificates)
    shift
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "${1:-}" = --check ] || [ "$(id -u)" -ne 0 ]; then
    echo "tests: missing packages: ${missing[*]}" >&2
    echo "tests: install them with: sudo apt-get install ${missing[*]}" >&2
    echo "tests: (make test and make demo install them themselves when run as root)" >&2
    exit 1
fi
echo "tests: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2 &&
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null >&2
