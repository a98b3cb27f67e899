#!/usr/bin/env bash
# make demo: a three-node ipop network on this machine, no root needed.
# Node alice serves a web page on her virtual IP (-R); carol fetches it
# through her SOCKS proxy by name; everyone pings across; then all stop.
set -euo pipefail
cd "$(dirname "$0")/.."
IPOP=${IPOP:-./ipop}
[ -x "$IPOP" ] || { echo "demo: build first: make" >&2; exit 1; }
DIR=$(mktemp -d /tmp/ipop-demo-XXXXXX)
export XDG_STATE_HOME=$DIR/state       # the demo's nodes remember peers there, not in ~
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a network secret (ipop genkey)"
"$IPOP" genkey --out "$DIR/net.key"
ls -l "$DIR/net.key"

echo '<h1>Hello from alice, over ipop</h1>' > "$DIR/index.html"
WEB=$(free_port)
python3 -m http.server "$WEB" --bind 127.0.0.1 --directory "$DIR" >/dev/null 2>&1 &
PIDS+=($!)

declare -A PORT SOCKS
for n in alice bob carol; do PORT[$n]=$(free_port); SOCKS[$n]=$(free_port); done
up() { # name ip extra...
	local n=$1 ip=$2; shift 2
	"$IPOP" up --mode user --ip "$ip/16" --name "$n" --secret-file "$DIR/net.key" \
		--listen "udp://127.0.0.1:${PORT[$n]}" --socks "127.0.0.1:${SOCKS[$n]}" \
		--control "$DIR/$n.sock" "$@" 2>"$DIR/$n.log" &
	PIDS+=($!)
}
step "three user-mode nodes on loopback"
up alice 10.128.0.1 -R "80:127.0.0.1:$WEB"
sleep 0.3
up bob 10.128.0.2 --bootstrap "udp://127.0.0.1:${PORT[alice]}"
up carol 10.128.0.3 --bootstrap "udp://127.0.0.1:${PORT[alice]}"
for i in $(seq 50); do
	"$IPOP" ping --control "$DIR/carol.sock" -c 1 -W 1 10.128.0.1 >/dev/null 2>&1 && break
	sleep 0.2
done
"$IPOP" status --control "$DIR/alice.sock"

for i in $(seq 50); do   # the name record is published once alice has joined
	"$IPOP" dht get --control "$DIR/carol.sock" name:alice >/dev/null 2>&1 && break
	sleep 0.2
done

step "carol fetches alice's page through her SOCKS proxy, by name"
if command -v curl >/dev/null; then
	curl -s --max-time 10 --socks5-hostname "127.0.0.1:${SOCKS[carol]}" http://alice.ipop/ || { for f in "$DIR"/*.log; do echo "## $f"; tail -n 6 "$f"; done; "$IPOP" status --control "$DIR/carol.sock" --json; exit 1; }
else
	printf 'GET / HTTP/1.0\r\nHost: alice\r\n\r\n' |
		"$IPOP" nc --socks "127.0.0.1:${SOCKS[carol]}" 10.128.0.1 80 | tail -1
fi

step "names: ipop resolve"
"$IPOP" resolve --control "$DIR/bob.sock" alice.ipop

step "overlay pings"
"$IPOP" ping --control "$DIR/bob.sock" -c 3 -i 0.2 10.128.0.1
"$IPOP" ping --control "$DIR/carol.sock" -c 3 -i 0.2 10.128.0.2

step "done: stopping the nodes"
