#!/usr/bin/env python3
"""Hostile peers against the DHT (issue 18, items 2 and 7), played by the
kit (tests/kit_peer.c, a real member built from ipop.c).  Loopback only.

Certificate network: V (10.78.0.1), B, kit member M (10.78.0.3, CN m).
B's virtual IP and name are picked so that M is the node nearest to the
keys "ip:B" and "name:B": V's lookups of them are delivered to M, and M
answers them (dht-forge).
 1. M answers every GET with OK, a value and no certificate.  V's traffic
    for B's virtual IP (a TCP connection through V's -L forward to B's -R
    forward) still reaches B, not the forged address.
 2. The same forged reply to V's `ipop resolve NAME` lookup: V does not
    take the forged address.
 3. M answers with a genuine record of its own, signed ("name:m" -> a
    forged address), with the token of V's lookup of B's name: V does not
    take an answer for another key.
Secret network: V, kit member K, R; then V, K and B.
 4. A REPLICA that reaches V through R (not straight from its sender, K)
    is not stored: V's record count does not grow by the 200 sent.
 5. K floods V, its only neighbour, with 70,000 REPLICA records (more
    than a node's 65,536) as itself; then B joins with a name whose
    nearest holder is V: V resolves B's name.  V holds K's records only up
    to the per-owner quota.
Every check prints PASS or FAIL; exit status non-zero if any failed.
"""
import hashlib
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import Net, free_port, log, run_cli, sha1_ip, main_wrapper, TestFailure  # noqa: E402
from lib import soft_result as result, wait_value as wait_for, linked, cli_ok, soft_finish  # noqa: E402

RING_BITS = 160
OWNER_RECORDS_MAX = 8 + (16 << 8)       # DHT_OWNER_RECORDS_MAX in ipop.c


def n_linked(node):
    st = node.status() or {}
    return sum(1 for c in st.get("connections", []) if c.get("state") == "up")


def dist(a, b):
    d = (a - b) % (1 << RING_BITS)
    return min(d, (1 << RING_BITS) - d)


def nearest(key, addrs):
    """The name (of addrs: name -> hex ring address) nearest SHA-1(key)."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return min(addrs, key=lambda k: dist(int(addrs[k], 16), h))


def records(node):
    return (node.status() or {}).get("dht_records", -1)


def resolve(node, name, timeout=15):
    rc, out, err = run_cli(["resolve", "--control", node.ctl, name], timeout=timeout)
    return rc, (out + err).strip()


class Greeter:
    """A local TCP server that says who it is to every connection."""

    def __init__(self, word):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.word = word
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.sendall(self.word)
            c.close()


def fetch(port, timeout=15):
    """What a connection to 127.0.0.1:port reads, retried until deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                data = s.recv(64)
                if data:
                    return data
        except OSError:
            pass
        time.sleep(0.3)
    return b""


def cert_cases():
    v_ip, m_ip = "10.78.0.1", "10.78.0.3"
    addrs = {"v": sha1_ip(v_ip), "m": sha1_ip(m_ip)}
    b_ip = next("10.78.0.%d" % i for i in range(4, 250)
                if nearest("ip:10.78.0.%d" % i, dict(addrs, b=sha1_ip("10.78.0.%d" % i))) == "m")
    addrs["b"] = sha1_ip(b_ip)
    b_name = next("b%d" % i for i in range(1000) if nearest("name:b%d" % i, addrs) == "m")
    log("B is %s, named %s: M is nearest to ip:%s and name:%s" % (b_ip, b_name, b_ip, b_name))
    with Net("hd-dht-cert") as net:
        ca = os.path.join(net.dir, "ca")
        cli_ok(["ca", "init", "--out", ca])
        dirs = {}
        for name, ip, cn in (("v", v_ip, "v"), ("b", b_ip, b_name), ("m", m_ip, "m")):
            dirs[name] = os.path.join(net.dir, name)
            cli_ok(["cert", "issue", "--ca", ca, "--ip", ip, "--name", cn, "--out", dirs[name]])
        greeter = Greeter(b"b-here\n")
        fwd = free_port()
        b = net.add(udp=free_port(), creds=["--cert-dir", dirs["b"]],
                    extra=["--mode", "user", "--socks", "127.0.0.1:%d" % free_port(),
                           "--name", b_name, "-R", "7000:127.0.0.1:%d" % greeter.port])
        b.start()
        net.wait_ready([b])
        m = net.add(kit=True, udp=free_port(), creds=["--cert-dir", dirs["m"]], bootstrap=[b.udp_uri]).start()
        v = net.add(udp=free_port(), creds=["--cert-dir", dirs["v"]], bootstrap=[b.udp_uri],
                    extra=["--mode", "user", "--socks", "127.0.0.1:%d" % free_port(),
                           "-L", "127.0.0.1:%d:%s:7000" % (fwd, b_ip)])
        v.start()
        if not wait_for(lambda: linked(v, b_ip) and linked(v, m_ip) and linked(b, m_ip), 15):
            raise TestFailure("V, B and M did not link")
        # B's name record is stored before M starts lying.
        if not wait_for(lambda: resolve(v, b_name, 5)[0] == 0, 15):
            raise TestFailure("V cannot resolve %s before the attack: %s" % (b_name, resolve(v, b_name)))
        m.cmd("dht-forge AAAAAAAAAAAAAAAAAAAA")     # 20 bytes: a ring address for ip:, off the ring
        # 1. V's first packet to B's virtual IP looks up ip:B.
        got = fetch(fwd, timeout=20)
        forged = [l for l in m.expect(("forged",), timeout=1) if l.startswith("forged")] \
            if got != b"b-here\n" else []
        log("case 1: V's connection to %s:7000 read %r" % (b_ip, got))
        result(got == b"b-here\n", "case 1: a forged ip:%s reply without certificate does not redirect V's "
               "traffic: V still reaches B (%s)" % (b_ip, forged or "read %r" % got))
        # 2. the same forgery for a name: a 4-byte value (65.65.65.65).
        m.cmd("dht-forge AAAA")
        rc, out = resolve(v, b_name)
        log("case 2: ipop resolve %s: rc=%d %s" % (b_name, rc, out))
        result("65.65.65.65" not in out and (rc != 0 or b_ip in out),
               "case 2: a forged name:%s reply without certificate is refused (%s)" % (b_name, out))
        # 3. M's own signed record, for another key, with the right token.
        m.cmd("dht-forge BBBB name:m")
        rc, out = resolve(v, b_name)
        log("case 3: ipop resolve %s: rc=%d %s" % (b_name, rc, out))
        result("66.66.66.66" not in out and (rc != 0 or b_ip in out),
               "case 3: a signed record for name:m answering V's lookup of name:%s is refused (%s)"
               % (b_name, out))
        m.cmd("dht-forge off")
        result(wait_for(lambda: b_ip in resolve(v, b_name, 5)[1], 10),
               "cases 2, 3: without the forgery V resolves %s to %s" % (b_name, b_ip))
        drops = (v.status() or {}).get("drops", {}).get("auth_failed", 0)
        log("V's auth_failed drops: %s" % drops)


def secret_cases():
    with Net("hd-dht-secret") as net:
        v = net.add(udp=free_port(), ip="10.77.0.1")
        v.start()
        net.wait_ready([v])
        k = net.add(kit=True, udp=free_port(), ip="10.77.0.3", bootstrap=[v.udp_uri]).start()
        r = net.add(udp=free_port(), ip="10.77.0.4", bootstrap=[v.udp_uri])
        r.start()
        if not wait_for(lambda: linked(v, "10.77.0.3") and linked(v, "10.77.0.4") and linked(r, "10.77.0.3"), 15):
            raise TestFailure("V, K and R did not link")
        # 4. REPLICAs routed to V through R.
        before = records(v)
        k.cmd("dht-flood replica 200 via-r- %s %s" % (sha1_ip("10.77.0.1"), sha1_ip("10.77.0.4")))
        k.expect(("flooded",), timeout=10)
        wait_for(lambda: records(v) >= before + 200, 3)
        after = records(v)
        log("case 4: V held %d records, %d after 200 REPLICAs through R" % (before, after))
        result(after < before + 100, "case 4: REPLICAs not straight from their sender are not stored "
               "(V: %d -> %d records)" % (before, after))
        r.kill(signal.SIGTERM)
        r.wait(5)
        if not wait_for(lambda: not linked(v, "10.77.0.4"), 10):
            raise TestFailure("R did not leave")
        # 5. the flood, straight from K to V, its only neighbour.
        t0 = time.monotonic()
        k.cmd("dht-flood replica 70000 flood-")
        k.expect(("flooded",), timeout=400)     # a node without quotas stores 65,536 (minutes)
        last = [None, time.monotonic()]

        def settled():
            now = records(v)
            if now != last[0]:
                last[0], last[1] = now, time.monotonic()
            return time.monotonic() - last[1] > 3 or now >= 65536

        wait_for(settled, 400, every=0.5)
        rv = records(v)
        log("case 5: after %.0f s V holds %d records" % (time.monotonic() - t0, rv))
        # B joins and publishes its name; V is the key's nearest holder (with
        # three nodes and three copies, nobody hands records away).
        b_ip = "10.77.0.2"
        addrs = {"v": sha1_ip("10.77.0.1"), "k": sha1_ip("10.77.0.3"), "b": sha1_ip(b_ip)}
        b_name = next("b%d" % i for i in range(1000) if nearest("name:b%d" % i, addrs) == "v")
        b = net.add(udp=free_port(), ip=b_ip, bootstrap=[v.udp_uri], extra=["--name", b_name])
        b.start()
        ok = wait_for(lambda: resolve(v, b_name, 5)[0] == 0, 40, every=1)
        rc, out = resolve(v, b_name, 5)
        result(ok and b_ip in out, "case 5: after K's flood, B publishes name:%s and V resolves it (%s)"
               % (b_name, out))
        result(rv <= OWNER_RECORDS_MAX, "case 5: V holds K's records within the per-owner quota %d (%d)"
               % (OWNER_RECORDS_MAX, rv))


def main():
    cert_cases()
    secret_cases()
    soft_finish()


if __name__ == "__main__":
    main_wrapper(main)
