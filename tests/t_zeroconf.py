#!/usr/bin/env python3
"""Zero-configuration features (issue 10).  Loopback parts need no root; the
tap/DNS part needs root and network namespaces, all named "tz*" (leftovers
removed at start, everything removed on exit, failure or signal).

 1. lease: 20 nodes `--ip auto --net 10.128.0.0/16 --mode none`, started at
    once (one seed, 19 bootstrapping from it, each with its own
    --state-file): all lease an address within 30 s; the 20 are distinct,
    inside the net, not the network/broadcast/gateway address, and still
    distinct after the early renewals (15 s later).
 2. restart: one node stopped (SIGTERM) and started again with the same
    state file gets the same address back, within 10 s.
 3. conflict: two nodes started at once with copies of one state file (one
    address, one ring address) both stay up and end with distinct addresses.
 4. bad values: --ip auto without --net exits 2 with one line naming --net.
Every check prints PASS or FAIL; the exit status is non-zero if any failed.
"""
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (Net, free_port, log, run_cli, ipop_bin, TestFailure)  # noqa: E402

NET = ipaddress.ip_network("10.128.0.0/16")
GATEWAY = "10.128.255.254"
N_LEASE = int(os.environ.get("IPOP_ZC_NODES", "20"))

results = []


def result(ok, what):
    results.append((ok, what))
    log("%s %s" % ("PASS" if ok else "FAIL", what))
    return ok


def auto_flags(state):
    return ["--ip", "auto", "--net", str(NET), "--state-file", state]


def leased_ip(node):
    st = node.status(timeout=3)
    return st.get("ip") if st else None


def wait_ips(nodes, timeout):
    """{node: ip} once every node has one, or what there is at the timeout."""
    t0 = time.monotonic()
    while True:
        ips = dict(zip(nodes, nodes[0].net.pool.map(leased_ip, nodes)))
        if all(ips.values()) or time.monotonic() - t0 > timeout:
            return ips, time.monotonic() - t0
        time.sleep(0.5)


def good_addr(ip):
    a = ipaddress.ip_address(ip)
    return a in NET and a not in (NET.network_address, NET.broadcast_address,
                                  ipaddress.ip_address(GATEWAY))


# --------------------------------------------------------------------------
# 1-4: leases on loopback


def part_lease(net):
    seed_port = free_port()
    nodes = []
    for i in range(N_LEASE):
        st = os.path.join(net.dir, "lease%02d" % i)
        boot = [] if i == 0 else ["udp://127.0.0.1:%d" % seed_port]
        nodes.append(net.add(udp=seed_port if i == 0 else free_port(), bootstrap=boot,
                             extra=auto_flags(st)))
    for n in nodes:
        n.start()
    net.wait_ready(nodes, timeout=20)
    ips, took = wait_ips(nodes, 30)
    got = [ip for ip in ips.values() if ip]
    log("lease: %d/%d nodes leased an address in %.1f s" % (len(got), len(nodes), took))
    result(len(got) == len(nodes), "lease: all %d nodes leased an address (%d in %.1f s)"
           % (len(nodes), len(got), took))
    result(len(set(got)) == len(got), "lease: %d distinct addresses" % len(set(got)))
    result(all(good_addr(ip) for ip in got), "lease: all inside %s, none reserved" % NET)
    time.sleep(15)
    ips2, _ = wait_ips(nodes, 5)
    got2 = [ip for ip in ips2.values() if ip]
    changed = sum(1 for n in nodes if ips[n] != ips2[n])
    log("lease: after renewals %d distinct of %d, %d changed" % (len(set(got2)), len(got2), changed))
    result(len(got2) == len(nodes) and len(set(got2)) == len(got2),
           "lease: still %d distinct after 15 s of renewals (%d changed)" % (len(set(got2)), changed))
    for n in nodes:
        if not n.alive():
            result(False, "lease: %s exited rc=%s\n%s" % (n.name, n.returncode(), n.log_tail()))
    return nodes, ips2


def part_restart(net, nodes, ips):
    n = nodes[5]
    before = ips[n]
    n.send(signal.SIGTERM)
    n.wait(5)
    state = open(n.extra[n.extra.index("--state-file") + 1]).read()
    result(("ip %s\n" % before) in state, "restart: state file holds %s" % before)
    n.killed = False
    n.start()
    t0 = time.monotonic()
    after = None
    while time.monotonic() - t0 < 10:
        after = leased_ip(n)
        if after:
            break
        time.sleep(0.3)
    took = time.monotonic() - t0
    log("restart: %s had %s, has %s after %.1f s" % (n.name, before, after, took))
    result(after == before, "restart: same address %s back in %.1f s (got %s)" % (before, took, after))


def part_conflict(net, seed):
    src = os.path.join(net.dir, "seeded")
    with open(src, "w") as f:
        f.write("net %s\nip 10.128.200.200\naddr %s\n" % (NET, "ab" * 20))
    pair = []
    for k in range(2):
        st = os.path.join(net.dir, "seeded%d" % k)
        shutil.copy(src, st)
        pair.append(net.add(udp=free_port(), bootstrap=[seed.udp_uri], extra=auto_flags(st)))
    for n in pair:
        n.start()
    net.wait_ready(pair, timeout=10)
    t0 = time.monotonic()
    a = b = None
    while time.monotonic() - t0 < 40:
        a, b = leased_ip(pair[0]), leased_ip(pair[1])
        if a and b and a != b:
            break
        time.sleep(0.5)
    took = time.monotonic() - t0
    log("conflict: addresses %s and %s after %.1f s" % (a, b, took))
    result(all(n.alive() for n in pair), "conflict: both nodes still running")
    result(bool(a and b and a != b), "conflict: distinct addresses %s, %s in %.1f s" % (a, b, took))
    st = [p.status() or {} for p in pair]
    result(st[0].get("address") != st[1].get("address"), "conflict: distinct ring addresses")


def part_bad_values(net):
    rc, out, err = run_cli(["up", "--ip", "auto", "--insecure", "--control",
                            os.path.join(net.dir, "bad.sock")], timeout=5)
    result(rc == 2 and "--net" in err and len(err.strip().splitlines()) == 1,
           "bad values: --ip auto without --net: exit %s, %r" % (rc, err.strip()))
    rc, out, err = run_cli(["up", "--ip", "auto", "--net", "10.128.0.0/33", "--insecure"], timeout=5)
    result(rc == 2 and "--net" in err, "bad values: --net /33: exit %s, %r" % (rc, err.strip()))


def main():
    ipop_bin()
    try:
        with Net("t_zeroconf") as net:
            nodes, ips = part_lease(net)
            part_restart(net, nodes, ips)
            part_conflict(net, nodes[0])
            part_bad_values(net)
            if not all(ok for ok, _ in results):
                net.failed = True
    except TestFailure as e:
        result(False, "setup: %s" % e)
    fails = [w for ok, w in results if not ok]
    print("\n==== t_zeroconf: %d passed, %d failed" % (len(results) - len(fails), len(fails)), flush=True)
    for w in fails:
        print("  FAIL " + w, flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
