#!/usr/bin/env python3
"""Endpoints that follow the machine, and rejoining without the bootstrap
(issue 17, items 2 and 5).

 1. remembered peers (loopback, no root): A is the bootstrap, B and C join
    through it.  B leaves (SIGTERM), A is killed, B starts again with only
    A as --bootstrap: it must rejoin through the peer it remembers (C) and
    reach it with an overlay ping.  Without the peers file it stays alone.
 2. interface changes (root, a namespace "tj-*"): a node with the default
    --listen (wildcard) advertises an address added to an interface after
    it started, within 3 s, and stops advertising it when it is removed;
    its tap address (--mode tap) is never among its endpoints.
 4. split rings merge (root, namespace tj-m): four public nodes on one
    loopback, split {A, B} | {C, D} by nftables until each half is a ring
    of its own, then joined again: one ring of four within 30 s.
 3. bootstrap names looked up again (root): B's --bootstrap is a host
    name (the namespace's own /etc/hosts, /etc/netns/NS/hosts); the
    bootstrap moves to another address and the name with it, and B, which
    lost every link, finds it at the new address.

Every wait polls a condition with a deadline.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (Net, Proc, TestFailure, check, free_port, ipop_bin, log,  # noqa: E402
                 main_wrapper, nsx, remove_netns, sh)

PREFIX = "tj-"


def wait_for(what, fn, timeout, poll=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return time.monotonic() - t0
        time.sleep(poll)
    raise TestFailure("%s: not within %.0f s" % (what, timeout))


def status(ctl, ns=None):
    argv = [ipop_bin(), "status", "--control", ctl, "--json"]
    if ns:
        argv = ["ip", "netns", "exec", ns] + argv
    p = subprocess.run(argv, capture_output=True, text=True, timeout=8, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None


def up_peers(st):
    return {(c.get("address") or "")[:12] for c in (st or {}).get("connections", []) if c.get("state") == "up"}


def step_remembered(state):
    os.environ["XDG_STATE_HOME"] = state
    with Net("t_rejoin") as net:
        a = net.add(udp=free_port(), ip="10.128.0.1", extra=["--mode", "none"])
        a.start()
        b = net.add(udp=free_port(), ip="10.128.0.2", bootstrap=[a.udp_uri], extra=["--mode", "none"])
        c = net.add(udp=free_port(), ip="10.128.0.3", bootstrap=[a.udp_uri], extra=["--mode", "none"])
        b.start()
        c.start()
        net.wait_ready()
        caddr = c.status()["address"][:12]
        wait_for("B links C", lambda: caddr in up_peers(b.status()), 15)
        b.send(signal.SIGTERM)              # a graceful stop writes the peers file
        check(b.wait(10) == 0, "B did not leave cleanly")
        files = [f for f in os.listdir(os.path.join(state, "ipop")) if f.startswith("peers-")]
        text = "".join(open(os.path.join(state, "ipop", f)).read() for f in files)
        log("peers files: %s" % files)
        check(c.udp_uri in text, "B's peers file does not list C (%s): %r" % (c.udp_uri, text))
        a.kill()
        # B comes back on another port, so C's memory of B cannot bring
        # them together: only B's own peers file can.
        b2 = net.add(udp=free_port(), ip="10.128.0.2", bootstrap=[a.udp_uri], extra=["--mode", "none"])
        b2.start()
        t = wait_for("B rejoins through C", lambda: caddr in up_peers(b2.status()), 20)
        log("B rejoined through its remembered peer C %.1f s after its restart, A dead" % t)
        rc = subprocess.run([ipop_bin(), "ping", "--control", b2.ctl, "10.128.0.3", "-c", "2", "-W", "3"],
                            capture_output=True, text=True, timeout=20).returncode
        check(rc == 0, "B cannot ping C after rejoining")
        # The control: with no peers file, B (on yet another port) stays alone.
        b2.send(signal.SIGTERM)
        b2.wait(10)
        for f in os.listdir(os.path.join(state, "ipop")):
            if f.endswith("-10.128.0.2"):
                os.unlink(os.path.join(state, "ipop", f))
        b3 = net.add(udp=free_port(), ip="10.128.0.2", bootstrap=[a.udp_uri], extra=["--mode", "none"])
        b3.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            check(caddr not in up_peers(b3.status()), "B found C with no peers file: the test proves nothing")
            time.sleep(0.5)
        log("control: without the peers file B stays alone")


class NsLab:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def setup(self):
        remove_netns(PREFIX, quiet=True)
        for ns in ("tj-a", "tj-b"):
            sh(["ip", "netns", "add", ns])
            nsx(ns, ["ip", "link", "set", "lo", "up"])
        sh(["ip", "link", "add", "tjva", "netns", "tj-a", "type", "veth", "peer", "name", "tjvb", "netns", "tj-b"])
        nsx("tj-a", ["ip", "addr", "add", "192.168.97.1/24", "dev", "tjva"])
        nsx("tj-b", ["ip", "addr", "add", "192.168.97.2/24", "dev", "tjvb"])
        nsx("tj-a", ["ip", "link", "set", "tjva", "up"])
        nsx("tj-b", ["ip", "link", "set", "tjvb", "up"])

    def start(self, ns, vip, extra):
        ctl = os.path.join(self.tmp, "%s.sock" % ns)
        if os.path.exists(ctl):
            os.unlink(ctl)
        argv = ["ip", "netns", "exec", ns, "env", "XDG_STATE_HOME=" + os.path.join(self.tmp, ns),
                ipop_bin(), "up", "--secret-file", self.key, "--ip", vip + "/16", "--control", ctl,
                "--log-level", "info"] + extra
        p = Proc(ns, argv, os.path.join(self.tmp, "%s.log" % ns))
        self.procs.append(p)
        wait_for("%s answers status" % ns, lambda: status(ctl, ns) is not None, 10)
        return p, ctl

    def close(self):
        for p in self.procs:
            p.stop()
        remove_netns(PREFIX, quiet=True)
        shutil.rmtree("/etc/netns/tj-b", ignore_errors=True)


def step_interfaces(lab):
    pa, ctla = lab.start("tj-a", "10.128.0.1", ["--mode", "tap", "--dev", "ipop0"])
    pb, ctlb = lab.start("tj-b", "10.128.0.2", ["--mode", "tap", "--dev", "ipop0",
                                                "--bootstrap", "udp://192.168.97.1:4000"])
    wait_for("A and B link", lambda: up_peers(status(ctlb, "tj-b")), 10)
    eps = status(ctla, "tj-a")["endpoints"]
    log("A advertises %s" % eps)
    check(not any("10.128." in e for e in eps), "A advertises its tap address: %s" % eps)
    nsx("tj-a", ["ip", "addr", "add", "192.168.98.7/24", "dev", "tjva"])
    t = wait_for("A advertises an added address", lambda: "udp://192.168.98.7:4000" in
                 (status(ctla, "tj-a") or {}).get("endpoints", []), 3, poll=0.1)
    log("added address advertised after %.2f s" % t)
    nsx("tj-a", ["ip", "addr", "del", "192.168.98.7/24", "dev", "tjva"])
    t = wait_for("A stops advertising a removed address", lambda: "udp://192.168.98.7:4000" not in
                 (status(ctla, "tj-a") or {}).get("endpoints", []), 3, poll=0.1)
    log("removed address withdrawn after %.2f s" % t)
    for p in (pa, pb):
        p.stop()


def step_boot_name(lab):
    os.makedirs("/etc/netns/tj-b", exist_ok=True)
    with open("/etc/netns/tj-b/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n192.168.97.1 boot.example\n")
    shutil.rmtree(os.path.join(lab.tmp, "tj-b"), ignore_errors=True)   # no remembered peers
    pa, ctla = lab.start("tj-a", "10.128.0.1", ["--mode", "none"])
    pb, ctlb = lab.start("tj-b", "10.128.0.2", ["--mode", "none", "--bootstrap", "udp://boot.example:4000"])
    wait_for("B links A by name", lambda: up_peers(status(ctlb, "tj-b")), 10)
    pa.kill()
    nsx("tj-a", ["ip", "addr", "flush", "dev", "tjva"])
    nsx("tj-a", ["ip", "addr", "add", "192.168.96.1/24", "dev", "tjva"])
    nsx("tj-b", ["ip", "addr", "add", "192.168.96.2/24", "dev", "tjvb"])
    with open("/etc/netns/tj-b/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n192.168.96.1 boot.example\n")
    shutil.rmtree(os.path.join(lab.tmp, "tj-b"), ignore_errors=True)
    wait_for("B notices the bootstrap is gone", lambda: not up_peers(status(ctlb, "tj-b")), 10)
    pa, ctla = lab.start("tj-a", "10.128.0.1", ["--mode", "none"])
    t = wait_for("B finds the moved bootstrap", lambda: any(
        c.get("state") == "up" and "192.168.96.1" in c.get("uri", "")
        for c in (status(ctlb, "tj-b") or {}).get("connections", [])), 45, poll=0.5)
    log("B relinked to the bootstrap at its new address %.1f s after it came back" % t)


def step_merge(lab):
    """Four public nodes on one host's loopback: a firewall splits them into
    {A, B} and {C, D} until each half is a ring of its own, then goes.  The
    halves hold links, so only the merge probes (a joined node now and then
    dials a bootstrap it has no link to) bring them together again."""
    ns = "tj-m"
    sh(["ip", "netns", "add", ns])
    nsx(ns, ["ip", "link", "set", "lo", "up"])
    ports = [7101, 7102, 7103, 7104]
    nodes = []
    for i, port in enumerate(ports):
        ctl = os.path.join(lab.tmp, "m%d.sock" % i)
        argv = ["ip", "netns", "exec", ns, "env", "XDG_STATE_HOME=" + os.path.join(lab.tmp, "m%d" % i),
                ipop_bin(), "up", "--secret-file", lab.key, "--mode", "none", "--control", ctl,
                "--listen", "udp://127.0.0.1:%d" % port, "--log-level", "info"]
        if i:
            argv += ["--bootstrap", "udp://127.0.0.1:%d" % ports[0]]
        lab.procs.append(Proc("m%d" % i, argv, os.path.join(lab.tmp, "m%d.log" % i)))
        wait_for("m%d answers status" % i, lambda: status(ctl, ns) is not None, 10)
        nodes.append(ctl)
    addr = [status(c, ns)["address"][:12] for c in nodes]

    def linked(groups):
        for g in groups:
            for i in g:
                want = {addr[j] for j in g if j != i}
                if up_peers(status(nodes[i], ns)) != want:
                    return False
        return True

    wait_for("a ring of four", lambda: linked([[0, 1, 2, 3]]), 20)
    rules = ("table inet tjm {\n chain out {\n  type filter hook output priority 0;\n"
             "  udp sport { 7101, 7102 } udp dport { 7103, 7104 } drop\n"
             "  udp sport { 7103, 7104 } udp dport { 7101, 7102 } drop\n }\n}\n")
    nsx(ns, ["nft", "-f", "-"], input=rules)
    t = wait_for("two rings of two", lambda: linked([[0, 1], [2, 3]]), 20)
    log("split: two rings of two %.1f s after the firewall went up" % t)
    nsx(ns, ["nft", "delete", "table", "inet", "tjm"])
    t = wait_for("one ring of four after the heal", lambda: linked([[0, 1, 2, 3]]), 30, poll=0.5)
    log("healed: one ring of four %.1f s after the firewall went away" % t)


def main():
    tmp = tempfile.mkdtemp(prefix="ipop-t_rejoin-")
    try:
        step_remembered(os.path.join(tmp, "state"))
        if os.geteuid() != 0:
            log("SKIP steps 2-3: need root (network namespaces)")
            return
        lab = NsLab(tmp)
        lab.key = os.path.join(tmp, "ns.key")
        subprocess.run([ipop_bin(), "genkey", "--out", lab.key], check=True)
        try:
            lab.setup()
            step_interfaces(lab)
            step_boot_name(lab)
            step_merge(lab)
        except TestFailure:
            for p in lab.procs:
                print("---- %s\n%s" % (p.name, p.log_tail(15)), flush=True)
            raise
        finally:
            lab.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main_wrapper(main)
