#!/usr/bin/env python3
"""Hostile peers (issue 18): members and outsiders that send well-formed
lies, played by the kit (tests/kit_peer.c, a real node built from ipop.c).
Loopback only, no root; nodes run with --mode none.

Secret network V (victim, 10.77.0.1), B (10.77.0.2); the kit is a member.
 1. address claim: the kit joins with V's --ip and start time 1 -> V keeps
    running and keeps its address; B still reaches V.
 2. BYE reason 7 ("conflict") from a linked member -> V keeps running.
 3. an unasked CONNECT-TO-ME reply listing V's address, start time 1 -> V
    keeps running.
 4. a forged DHT reply: the kit answers V's lookup of B's virtual IP with
    its own ring address -> in a secret network members are trusted with
    the DHT: recorded, not asserted (docs/SECURITY.md).
Certificate network V (10.78.0.1), B (10.78.0.2), member M (10.78.0.3):
 5. M's kit claims V's ring address with start time 1; V dials it -> V
    refuses it (the certificate decides) and keeps running.
 6. outsiders (their own CA, a certificate for V's IP) claim V's address;
    V dials them: one with only the public ca.crt gets no handshake
    (not_member), one with a leaked network.key is refused; V keeps running.
 7. a forged DHT reply without certificate redirects nothing: V's ping to
    B's virtual IP name ("ip:" lookup) resolves to B, not to the kit.
 8. a real duplicate (the same certificate directory run twice): B, which
    links V, refuses the later node, which warns and retries only every
    10 s; V keeps its links.
Every check prints PASS or FAIL; exit status non-zero if any failed.
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import Net, free_port, log, run_cli, sha1_ip, main_wrapper, TestFailure  # noqa: E402
from lib import soft_result as result, wait_value as wait_for, linked, node_drops as drops, cli_ok, soft_finish  # noqa: E402


def survives(node, what, hold=2.0):
    """node is alive now and hold seconds later, answering status."""
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and node.alive():
        time.sleep(0.1)
    ok = node.alive() and node.status() is not None
    if not ok:
        print(node.log_tail(15), flush=True)
    result(ok, "%s: %s still running (rc=%s)" % (what, node.name, node.returncode()))
    return ok


def secret_cases():
    with Net("hostile-secret") as net:
        v = net.add(udp=free_port(), ip="10.77.0.1")
        v.start()
        net.wait_ready([v])
        b = net.add(udp=free_port(), ip="10.77.0.2", bootstrap=[v.udp_uri])
        b.start()
        if not wait_for(lambda: linked(v, "10.77.0.2"), 10):
            raise TestFailure("V and B did not link")
        # 1. the kit joins with V's address, claiming to be older.
        k = net.add(kit=True, udp=free_port(), ip="10.77.0.1", bootstrap=[b.udp_uri],
                    claims=["--claim-started", "1"]).start()
        told = wait_for(lambda: drops(k).get("address_claim", 0), 10)
        result(bool(told), "case 1: the kit was refused as the newcomer (its address_claim drops: %s)" % told)
        survives(v, "case 1 (a member claims V's address, start time 1)")
        st = v.status() or {}
        result(st.get("address") == sha1_ip("10.77.0.1"), "case 1: V keeps its ring address")
        result(linked(b, "10.77.0.1") and linked(v, "10.77.0.2"), "case 1: B keeps its link to V")
        k.cmd("quit")
        k.wait(5)
        # 2, 3: a member with its own address lies about V's.
        k2 = net.add(kit=True, udp=free_port(), ip="10.77.0.3", bootstrap=[v.udp_uri]).start()
        if not wait_for(lambda: linked(v, "10.77.0.3"), 10):
            raise TestFailure("kit member 10.77.0.3 did not link V")
        k2.cmd("ctm-reply 10.77.0.1 10.77.0.1 1")
        wait_for(lambda: not v.alive(), 2)
        survives(v, "case 3 (an unasked connect-to-me reply claims V's address)")
        n = k2.cmd("bye 7")[-1]
        log("case 2: %s" % n)
        wait_for(lambda: not v.alive(), 2)
        survives(v, "case 2 (BYE reason 7 from a linked member)")
        result(drops(v).get("address_claim", 0) >= 2, "case 2, 3: V counted the claims (%s)"
               % drops(v).get("address_claim"))


def cert_network(d):
    ca = os.path.join(d, "ca")
    cli_ok(["ca", "init", "--out", ca])
    dirs = {}
    for i, name in ((1, "v"), (2, "b"), (3, "m")):
        out = os.path.join(d, name)
        cli_ok(["cert", "issue", "--ca", ca, "--ip", "10.78.0.%d" % i, "--name", name, "--out", out])
        dirs[name] = out
    return ca, dirs


def cert_cases():
    """The attackers are up first and V dials them: V checks what they
    claim in their handshake answer (the responder's identity)."""
    with Net("hostile-cert") as net:
        ca, dirs = cert_network(net.dir)
        b = net.add(udp=free_port(), creds=["--cert-dir", dirs["b"]])
        b.start()
        net.wait_ready([b])
        # 5. member M's kit claims V's ring address; 6. outsiders (their own
        # CA, a certificate for V's IP): one with only the public ca.crt,
        # one with a leaked network.key as well.
        k = net.add(kit=True, udp=free_port(), creds=["--cert-dir", dirs["m"]],
                    claims=["--claim-addr", "10.78.0.1", "--claim-started", "1"]).start()
        evil = os.path.join(net.dir, "evil-ca")
        cli_ok(["ca", "init", "--out", evil])
        xd = os.path.join(net.dir, "x")
        cli_ok(["cert", "issue", "--ca", evil, "--ip", "10.78.0.1", "--name", "v", "--out", xd])
        public, leaked = os.path.join(net.dir, "public"), os.path.join(net.dir, "leaked")
        for d, files in ((public, ["ca.crt"]), (leaked, ["ca.crt", "network.key"])):
            os.makedirs(d)
            for f in files:
                shutil.copy(os.path.join(dirs["v"], f), d)
        xs = [net.add(kit=True, udp=free_port(), creds=["--cert-dir", xd],
                      claims=["--claim-started", "1", "--mac-ca", d]).start() for d in (public, leaked)]
        v = net.add(udp=free_port(), creds=["--cert-dir", dirs["v"]],
                    bootstrap=[k.udp_uri] + [x.udp_uri for x in xs] + [b.udp_uri])
        v.start()
        wait_for(lambda: not v.alive() or (drops(v).get("refused", 0) >= 2 and drops(xs[0]).get("not_member", 0)), 10)
        survives(v, "cases 5, 6 (member M with its own certificate, and outsiders, claim V's address)")
        d = drops(v)
        result(d.get("refused", 0) >= 2, "cases 5, 6: V refused M's and the leaked-key outsider's claims (refused %s)"
               % d.get("refused"))
        result(drops(xs[0]).get("not_member", 0) >= 1 and not xs[0].links(),
               "case 6: the ca.crt-only outsider cannot even read V's handshake (its not_member: %s, links: %s)"
               % (drops(xs[0]).get("not_member"), xs[0].links()))
        result(wait_for(lambda: linked(v, "10.78.0.2"), 10), "cases 5, 6: V joined through B")
        for kk in [k] + xs:
            kk.cmd("quit")
            kk.wait(5)
        # 8. a real duplicate: V's own certificate directory, started later.
        dup = net.add(udp=free_port(), creds=["--cert-dir", dirs["v"]], bootstrap=[b.udp_uri])
        dup.start()
        told = wait_for(lambda: (dup.status() or {}).get("drops", {}).get("address_claim", 0), 10)
        result(bool(told), "case 8: a second node with V's certificate is refused by B")
        survives(v, "case 8: the first holder", hold=3.0)
        ups = open(dup.logpath, errors="replace").read().count("info link: up:")
        result(ups <= 2, "case 8: the refused node does not churn (%d links in ~3 s)" % ups)
        result(linked(b, "10.78.0.1") and linked(v, "10.78.0.2"), "case 8: B keeps its link to V")


def main():
    secret_cases()
    cert_cases()
    soft_finish()


if __name__ == "__main__":
    main_wrapper(main)
