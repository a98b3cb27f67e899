#!/usr/bin/env python3
"""Relayed paths that hold and fail over fast (issue 17 item 3).  Needs root
(network namespaces, nftables, tap).

Every namespace this test makes is named "tr-*" (veths "tr*"; t_readme's
tr-sw and tr-h1..3 are other names); leftovers of its own are removed at
start, and everything is removed on exit, failure, SIGTERM or SIGINT.  The
root namespace is not touched.

The field report's lab.  A "public internet" (203.0.113.0/24, a bridge in
tr-net) holds two public nodes, both listening on UDP and TCP port 4000:

  BOOT  tr-boot 203.0.113.10   the bootstrap every host names
  PUB2  tr-pub2 203.0.113.11   a node without an interface (bootstraps from BOOT)

BOOT and PUB2 get --ip values (--mode none: no interface) chosen so that
PUB2 sits opposite LSU on the ring of six, the one pair the ring gives no
role: LSU's spare link to PUB2 then lives only by the relay role.

and three NAT'd sites, each a router tr-r<site> (WAN 203.0.113.2x) with
hosts behind it:

  UF    masquerade, input and forward firewalls: nothing new comes in.
        Two hosts, tr-huf1 and tr-huf2 (10.1.0.2, 10.1.0.3)
  VIMS  symmetric NAT (masquerade random,fully-random), nothing new comes
        in.  Host tr-hvims (10.2.0.2)
  LSU   masquerade, nothing new comes in, and a forward firewall that lets
        UDP out only to BOOT's address (TCP out anywhere).  Host tr-hlsu
        (10.3.0.2)

Hosts run `ipop up --ip 10.128.0.N/16 --mode tap --dev ipop0 --listen
udp://LANIP:4000 --bootstrap udp://BOOT:4000 --bootstrap tcp://BOOT:4000`.
No two sites link directly: UF-LSU, VIMS-LSU and UF-VIMS relay (through
BOOT or PUB2; LSU reaches PUB2 only over TCP).

Per round (a fresh network each, IPOP_RELAY_ROUNDS, default 2): BOOT and
PUB2 start, then UF1, UF2 and VIMS, until each links every other (relayed
where it must); then LSU joins, as in the report (public nodes and other
sites running long before).
 a. Once LSU says it joined, `ping -i 0.05` runs UF1->LSU, VIMS->LSU and
    UF1->VIMS.  Each pair answers within 1.5 s of the join, and from its
    first answer to 10 s after the join no echo goes unanswered and none
    comes back "Destination Host Unreachable" ("No route to host" to ssh).
    (Before the fix: the first answer only once LSU's relayed links were
    up, 3.3 s, with "No route to host" meanwhile; starting every node at
    once, LSU's pairs lost 40-60 % of their pings for 3 s after the first
    answer.)
 b. BOOT's ipop is SIGKILLed while the pings run.  Each pair's longest gap
    between two replies, from 1 s before the kill to 12 s after, must be
    at most 1.0 s (before: 4.2-4.4 s, until the relays moved to PUB2).
    IPOP_RELAY_FAIL=cut drops every packet to and from BOOT instead (a
    silent death: no ICMP tells its peers), with the same limit.
    Before the kill, polled every 0.3 s: LSU links both public nodes
    directly, and neither link, once up, goes away (before the relay
    role: PUB2 closed the spare 5 s after it came up, 2 of 2 runs).

Prints a table of the gaps per round.  Exit status non-zero if a check
failed.  Node logs of a failed run are kept in build/test-logs/t_relay-nodes
(or $IPOP_TEST_LOGDIR).
Env: IPOP_RELAY_ROUNDS, IPOP_RELAY_FAIL, IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE
(nodes run with -v).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (list_netns, remove_netns, TestFailure, sh, nsx, Proc, check, log, ipop_bin, sha1_ip,  # noqa: E402
                 lab_start, keep_lab_logs)

PREFIX = "tr"
NET, BR = "tr-net", "trbr0"
BOOT_IP, PUB2_IP = "203.0.113.10", "203.0.113.11"
PORT = 4000
PING_INTERVAL_S = 0.05
JOIN_WINDOW_S = 10.0            # (a): from the join, this long
KILL_BEFORE_S, KILL_AFTER_S = 1.0, 12.0     # (b): the window around the kill
MAX_FAILOVER_GAP_S = 1.0
# The first answer comes once the ring knows the new node: its first
# connect-to-me requests leave at the ring tick after it links BOOT (500 ms
# at most); before the fix, only once its relayed links were up (3.3 s).
MAX_FIRST_ANSWER_S = 1.5
# How BOOT dies: "kill" (SIGKILL: its host answers with ICMP port
# unreachable) or "cut" (its host drops everything: a silent death).
FAIL = os.environ.get("IPOP_RELAY_FAIL", "kill")
# (a) allows no lost echo; a reply later than this after the one before
# counts as a gap too (a 2-core machine shared with other tests delays a
# turn now and then, but not by this much).
MAX_JOIN_GAP_S = 0.5

# name: (router ns, wan ip, lan prefix, [(host ns, lan ip, vip), ...])
SITES = {
    "uf": ("tr-ruf", "203.0.113.21", "10.1.0",
           [("tr-huf1", "10.1.0.2", "10.128.0.1"), ("tr-huf2", "10.1.0.3", "10.128.0.2")]),
    "vims": ("tr-rvims", "203.0.113.22", "10.2.0", [("tr-hvims", "10.2.0.2", "10.128.0.3")]),
    "lsu": ("tr-rlsu", "203.0.113.23", "10.3.0", [("tr-hlsu", "10.3.0.2", "10.128.0.4")]),
}
# (from host ns, to vip, label)
PAIRS = [("tr-huf1", "10.128.0.4", "UF->LSU"), ("tr-hvims", "10.128.0.4", "VIMS->LSU"),
         ("tr-huf1", "10.128.0.3", "UF->VIMS")]

REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=(\d+)")
UNREACH = re.compile(r"^\[(\d+\.\d+)\] From [\d.]+ icmp_seq=(\d+) Destination Host Unreachable")
SENT = re.compile(r"^\[(\d+\.\d+)\] no answer yet for icmp_seq=(\d+)")


def lab_netns():
    """This test's namespaces, by name (the "tr" prefix is shared with t_readme)."""
    names = [NET, "tr-boot", "tr-pub2"]
    for router, _, _, hosts in SITES.values():
        names += [router] + [h for h, _, _ in hosts]
    return names


def remove_lab_netns(quiet=False):
    """Kill what runs in this test's namespaces and delete them; the names removed."""
    mine = set(lab_netns())
    gone = []
    for nm in list_netns(PREFIX + "-"):
        if nm in mine:
            gone += remove_netns(nm, quiet)
    return gone


def public_ids():
    """Ring addresses for BOOT and PUB2 (their --ip; they have no interface)
    that put PUB2 opposite LSU on the ring of six: with two near peers a
    side, that is the one pair the ring gives no role, so LSU's spare link
    to PUB2 lives only by the relay role (a random layout made it near in
    most runs, and the spare's bug showed only under load)."""
    hosts = [vip for _, (_, _, _, hs) in SITES.items() for _, _, vip in hs]
    lsu = hosts[-1]
    for b in range(10, 60):
        for p in range(b + 1, 60):
            ips = hosts + ["10.128.0.%d" % b, "10.128.0.%d" % p]
            order = sorted(ips, key=sha1_ip)
            if abs(order.index(lsu) - order.index(ips[-1])) == 3:
                return "10.128.0.%d" % b, "10.128.0.%d" % p
    raise TestFailure("no ring layout puts PUB2 opposite LSU")


class Node:
    def __init__(self, t, name, ns, ip, key, vip=None, rid=None):
        self.t, self.name, self.ns, self.ip, self.key, self.vip = t, name, ns, ip, key, vip
        self.rid = rid
        self.ctl = os.path.join(t.dir, "%s.sock" % name)
        self.logpath = os.path.join(t.dir, "%s.log" % name)
        self.proc = None

    def start(self):
        a = ["ip", "netns", "exec", self.ns, ipop_bin(), "up",
             "--listen", "udp://%s:%d" % (self.ip, PORT), "--secret-file", self.key,
             "--control", self.ctl]
        if self.vip:
            a += ["--mode", "tap", "--dev", "ipop0", "--ip", self.vip + "/16",
                  "--bootstrap", "udp://%s:%d" % (BOOT_IP, PORT),
                  "--bootstrap", "tcp://%s:%d" % (BOOT_IP, PORT)]
        else:
            a += ["--listen", "tcp://%s:%d" % (self.ip, PORT), "--mode", "none", "--ip", self.rid + "/16"]
            if self.ip != BOOT_IP:
                a += ["--bootstrap", "udp://%s:%d" % (BOOT_IP, PORT),
                      "--bootstrap", "tcp://%s:%d" % (BOOT_IP, PORT)]
        a += ["-v"] if os.environ.get("IPOP_TEST_VERBOSE") else ["--log-level", "info"]
        self.proc = Proc(self.name, a, self.logpath)
        return self

    def status(self, timeout=8):
        try:
            p = subprocess.run([ipop_bin(), "status", "--control", self.ctl, "--json"],
                               capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, errors="replace")
        except subprocess.TimeoutExpired:
            return None
        try:
            d = json.loads(p.stdout) if p.returncode == 0 else None
        except ValueError:
            return None
        return d if isinstance(d, dict) else None


def conn_summary(st):
    return "; ".join("%s %s %s %s" % (c.get("state"), c.get("uri"), c.get("ip") or str(c.get("address"))[:10],
                                      c.get("type"))
                     for c in (st or {}).get("connections", [])) or "(none)"


class Pinger:
    """A continuous `ping -D -O -i 0.05` whose output is parsed afterwards."""

    def __init__(self, t, ns, vip, label, tag):
        self.label = label
        self.path = os.path.join(t.dir, "ping-%s-%s.out" % (tag, label.replace(">", "").replace("-", "")))
        self.proc = Proc("ping-" + label, ["ip", "netns", "exec", ns, "ping", "-n", "-D", "-O",
                                           "-i", str(PING_INTERVAL_S), vip], self.path)

    def parse(self):
        """(reply times, {seq: reply time}, [(time, seq) unreachable], highest seq sent)."""
        times, by_seq, unreach, top = [], {}, [], -1
        try:
            text = open(self.path, errors="replace").read()
        except OSError:
            text = ""
        for ln in text.splitlines():
            m = REPLY.match(ln)
            if m:
                t, s = float(m.group(1)), int(m.group(2))
                if s not in by_seq:
                    times.append(t)
                    by_seq[s] = t
                top = max(top, s)
                continue
            m = UNREACH.match(ln) or SENT.match(ln)
            if m:
                top = max(top, int(m.group(2)))
                if UNREACH.match(ln):
                    unreach.append((float(m.group(1)), int(m.group(2))))
        times.sort()
        return times, by_seq, unreach, top


def longest_gap(times, t0, t1):
    """The longest stretch of [t0, t1] with no reply, from the replies' times."""
    pts = [t0] + [t for t in times if t0 < t < t1] + [t1]
    return max(b - a for a, b in zip(pts, pts[1:]))


class Lab:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ipop-t_relay-", dir="/tmp")
        self.failures, self.rows = [], []
        self.nodes = []
        self._closed = False

    def fail(self, msg):
        self.failures.append(msg)
        log("FAIL " + msg)

    # ---- the lab
    def veth_to_bridge(self, ns, ifname, port, ip):
        sh(["ip", "-n", NET, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns])
        sh(["ip", "-n", NET, "link", "set", port, "master", BR, "up"])
        sh(["ip", "-n", ns, "addr", "add", ip + "/24", "dev", ifname])
        sh(["ip", "-n", ns, "link", "set", ifname, "up"])

    def nft(self, ns, script):
        nsx(ns, ["nft", "-f", "-"], input=script)

    def router_rules(self, site):
        post = "masquerade random,fully-random" if site == "vims" else "masquerade"
        script = ("add table ip nat\n"
                  "add chain ip nat post { type nat hook postrouting priority 100; }\n"
                  "add rule ip nat post oifname \"trwan\" %s\n"
                  "add table ip filter\n"
                  "add chain ip filter input { type filter hook input priority 0; policy accept; }\n"
                  "add rule ip filter input iifname \"trwan\" ct state new drop\n"
                  "add chain ip filter forwarding { type filter hook forward priority 0; policy accept; }\n"
                  "add rule ip filter forwarding iifname \"trwan\" ct state new drop\n" % post)
        if site == "lsu":
            script += ("add rule ip filter forwarding iifname \"trlan\" meta l4proto udp ip daddr != %s drop\n"
                       % BOOT_IP)
        return script

    def setup(self):
        for ns in lab_netns():
            sh(["ip", "netns", "add", ns])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", NET, "link", "add", BR, "type", "bridge"])
        sh(["ip", "-n", NET, "link", "set", BR, "up"])
        self.veth_to_bridge("tr-boot", "tr-eth", "trp-boot", BOOT_IP)
        self.veth_to_bridge("tr-pub2", "tr-eth", "trp-pub2", PUB2_IP)
        for site, (router, wan, lan, hosts) in SITES.items():
            self.veth_to_bridge(router, "trwan", "trp-" + site, wan)
            sh(["ip", "-n", router, "link", "add", "trlan", "type", "bridge"])
            sh(["ip", "-n", router, "addr", "add", lan + ".1/24", "dev", "trlan"])
            sh(["ip", "-n", router, "link", "set", "trlan", "up"])
            for i, (h, ip, _) in enumerate(hosts):
                port = "trl%d" % i
                sh(["ip", "-n", router, "link", "add", port, "type", "veth", "peer", "name", "tr-eth",
                    "netns", h])
                sh(["ip", "-n", router, "link", "set", port, "master", "trlan", "up"])
                sh(["ip", "-n", h, "addr", "add", ip + "/24", "dev", "tr-eth"])
                sh(["ip", "-n", h, "link", "set", "tr-eth", "up"])
                sh(["ip", "-n", h, "route", "add", "default", "via", lan + ".1"])
            nsx(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self.nft(router, self.router_rules(site))
        for site, (_, _, _, hosts) in SITES.items():
            for h, _, _ in hosts:
                rc, out, err = nsx(h, ["ping", "-n", "-c", "1", "-W", "3", BOOT_IP], check_rc=False, timeout=15)
                check(rc == 0, "lab: %s cannot ping %s: %s" % (h, BOOT_IP, (out + err).strip()[-200:]))

    def key(self, name):
        path = os.path.join(self.dir, name + ".key")
        sh([ipop_bin(), "genkey", "--out", path])
        os.chmod(path, 0o600)
        return path

    # ---- one round
    def wait_joined(self, nodes, timeout=60):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = [nd.status() for nd in nodes]
            if all(s and s.get("joined") for s in st):
                return time.monotonic() - t0
            for nd in nodes:
                check(nd.proc.alive(), "%s exited:\n%s" % (nd.name, nd.proc.log_tail()))
            time.sleep(0.2)
        raise TestFailure("not every node joined within %d s: %s" % (
            timeout, ", ".join("%s %s" % (nd.name, bool(s and s.get("joined"))) for nd, s in zip(nodes, st))))

    def wait_linked(self, nodes, timeout=30):
        """Until every node holds an up link (direct or relayed) to every other."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = [nd.status() for nd in nodes]
            addrs = [s and s.get("address") for s in st]
            if all(addrs) and all(
                    {a for i, a in enumerate(addrs) if i != j} <=
                    {c.get("address") for c in s.get("connections", []) if c.get("state") == "up"}
                    for j, s in enumerate(st)):
                return time.monotonic() - t0
            for nd in nodes:
                check(nd.proc.alive(), "%s exited:\n%s" % (nd.name, nd.proc.log_tail()))
            time.sleep(0.2)
        raise TestFailure("not every node linked to every other within %d s: %s" % (
            timeout, "; ".join("%s: %s" % (nd.name, conn_summary(s)) for nd, s in zip(nodes, st))))

    def round(self, r):
        key = self.key("round%d" % r)
        boot_id, pub2_id = public_ids()
        boot = Node(self, "r%d-boot" % r, "tr-boot", BOOT_IP, key, rid=boot_id).start()
        pub2 = Node(self, "r%d-pub2" % r, "tr-pub2", PUB2_IP, key, rid=pub2_id)
        hosts = []
        for site, (_, _, _, hs) in SITES.items():
            for h, ip, vip in hs:
                hosts.append(Node(self, "r%d-%s" % (r, h[4:]), h, ip, key, vip))
        nodes = [boot, pub2] + hosts
        self.nodes = nodes
        lsu = hosts[-1]
        deadline = time.monotonic() + 10
        while not os.path.exists(boot.ctl) and time.monotonic() < deadline:
            time.sleep(0.05)            # BOOT listens before anyone dials it
        pub2.start()
        self.wait_joined([boot, pub2])
        for nd in hosts[:-1]:
            nd.start()
        el = self.wait_linked([boot, pub2] + hosts[:-1])
        log("round %d: BOOT, PUB2, UF1, UF2 and VIMS all linked after %.1f s; LSU joins" % (r, el))
        lsu.start()
        el = self.wait_joined(nodes)
        t_join = time.time()
        log("round %d: every node joined, LSU after %.1f s" % (r, el))
        pingers = [Pinger(self, ns, vip, label, "r%d" % r) for ns, vip, label in PAIRS]
        try:
            self.watch_legs(r, lsu, [boot, pub2], t_join + JOIN_WINDOW_S)
            for nd in hosts:
                st = nd.status()
                log("round %d: %s links: %s" % (r, nd.name, conn_summary(st)))
            t_kill = time.time()
            if FAIL == "cut":
                self.nft("tr-boot", "add table inet cut\n"
                         "add chain inet cut in { type filter hook input priority -10; policy drop; }\n"
                         "add chain inet cut out { type filter hook output priority -10; policy drop; }\n")
                log("round %d: BOOT cut off (every packet to or from it dropped)" % r)
            else:
                boot.proc.kill(signal.SIGKILL)
                log("round %d: BOOT killed" % r)
            time.sleep(KILL_AFTER_S + 0.5)
            for nd in hosts:
                log("round %d: %s links after: %s" % (r, nd.name, conn_summary(nd.status())))
        finally:
            for p in pingers:
                p.proc.kill(signal.SIGINT)
            for p in pingers:
                p.proc.wait(5)
        for p in pingers:
            self.judge(r, p, t_join, t_kill)
        for nd in nodes:
            nd.proc.stop(3)
        nsx("tr-boot", ["nft", "delete", "table", "inet", "cut"], check_rc=False)

    def watch_legs(self, r, lsu, publics, until):
        """Until `until`, while the pings run: LSU relays everything, so it
        must stand on both public nodes, its relay and a warm spare, and a
        direct link to either, once up, must stay (the public node, with no
        role of its own for the spare, closed it 5 s after it came up, and
        the relays had nowhere to go when BOOT died)."""
        want = {(nd.status() or {}).get("address") for nd in publics}
        seen, lost = set(), {}
        t0 = time.time()
        while time.time() < until:
            st = lsu.status() or {}
            have = {c.get("address") for c in st.get("connections", [])
                    if c.get("state") == "up" and not str(c.get("uri")).startswith("relay://")}
            for a in (seen - have) - set(lost):
                lost[a] = (time.time() - t0, conn_summary(st))
            seen |= have & want
            time.sleep(0.3)
        for a, (t, summary) in lost.items():
            self.fail("round %d: LSU's direct link to public node %s went away %.1f s after the join "
                      "(a relay's spare must stay): %s" % (r, str(a)[:12], t, summary))
        if not want <= seen:
            self.fail("round %d: LSU linked %d of the 2 public nodes directly within %.0f s of the join"
                      % (r, len(want & seen), JOIN_WINDOW_S))

    def judge(self, r, p, t_join, t_kill):
        times, by_seq, unreach, top = p.parse()
        label = "round %d %s" % (r, p.label)
        join_end = t_join + JOIN_WINDOW_S
        first = next((t for t in times if t < join_end), None)
        row = {"round": r, "pair": p.label}
        if first is None:
            self.fail("%s: no answer within %.0f s of the join" % (label, JOIN_WINDOW_S))
            row.update(first="-", lost="-", join_gap="-")
        else:
            seqs = sorted(s for s, t in by_seq.items() if t >= first and t < join_end)
            s0 = min(s for s, t in by_seq.items() if t == first)
            s1 = max(seqs)
            lost = [s for s in range(s0, s1 + 1) if s not in by_seq]
            un = [s for t, s in unreach if t >= first and t < join_end]
            gap = longest_gap(times, first, join_end)
            row.update(first="%.2f" % (first - t_join), lost=len(lost), join_gap="%.2f" % gap,
                       unreach=len([1 for t, s in unreach if t < join_end]))
            if first - t_join > MAX_FIRST_ANSWER_S:
                self.fail("%s: first answer %.2f s after LSU joined (at most %.1f s)"
                          % (label, first - t_join, MAX_FIRST_ANSWER_S))
            if lost or un or gap > MAX_JOIN_GAP_S:
                self.fail("%s: after its first answer (%.2f s after the join): %d echoes lost "
                          "(seq %s), %d unreachable, longest gap %.2f s"
                          % (label, first - t_join, len(lost), lost[:12], len(un), gap))
        gap = longest_gap(times, t_kill - KILL_BEFORE_S, t_kill + KILL_AFTER_S)
        row["kill_gap"] = "%.2f" % gap
        if gap > MAX_FAILOVER_GAP_S:
            self.fail("%s: longest gap after BOOT's death %.2f s (at most %.1f s)"
                      % (label, gap, MAX_FAILOVER_GAP_S))
        self.rows.append(row)

    def report(self):
        log("%-5s %-10s %8s %6s %6s %9s %9s" % ("round", "pair", "first s", "lost", "unrch",
                                                 "join gap", "kill gap"))
        for w in self.rows:
            log("%-5s %-10s %8s %6s %6s %9s %9s" % (w["round"], w["pair"], w.get("first"), w.get("lost"),
                                                     w.get("unreach", "-"), w.get("join_gap"),
                                                     w.get("kill_gap")))

    def close(self, failed):
        if self._closed:
            return
        self._closed = True
        for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sg, signal.SIG_IGN)
        for p in reversed(Proc.all):
            p.kill(signal.SIGKILL)
        for p in Proc.all:
            p.wait(5)
        remove_lab_netns()
        left = [nm for nm in list_netns(PREFIX + "-") if nm in lab_netns()]
        if left:
            print("  cleanup: namespaces left: %s" % left, flush=True)
        keep_lab_logs("t_relay", self.dir, failed, (".log", ".out"))
        shutil.rmtree(self.dir, ignore_errors=True)


_lab = None


def _cleanup():
    if _lab is not None:
        _lab.close(failed=True)


def main():
    global _lab
    lab_start("t_relay", _cleanup, ("ip", "ping", "nft", "sysctl"), lambda: remove_lab_netns(quiet=True))
    lab = _lab = Lab()
    rounds = int(os.environ.get("IPOP_RELAY_ROUNDS", "2"))
    log("t_relay: dir %s, %d rounds" % (lab.dir, rounds))
    try:
        lab.setup()
        log("lab up")
        for r in range(rounds):
            try:
                lab.round(r)
            except TestFailure as e:
                lab.fail("round %d: %s" % (r, e))
                for nd in lab.nodes:
                    if nd.proc:
                        nd.proc.stop(3)
    except TestFailure as e:
        lab.fail("setup: %s" % e)
    lab.report()
    failed = bool(lab.failures)
    _lab = None
    lab.close(failed=failed)
    if failed:
        log("FAIL: %d check(s) failed" % len(lab.failures))
        sys.exit(1)
    log("PASS")
    sys.exit(0)


if __name__ == "__main__":
    main()
