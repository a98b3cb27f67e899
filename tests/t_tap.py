#!/usr/bin/env python3
"""Privileged-mode (tap) integration test; needs root (network namespaces).

Every namespace, bridge and veth this test makes is named "tt*"; leftovers
with that prefix are removed at start, and everything (namespaces, ipop,
sshd, iperf3, socat) is removed on exit, failure, SIGTERM or SIGINT.

Layout: namespace tt-sw holds bridge ttbr0; each host namespace tt-hN / tt-rN
gets a veth (tt-eth in the host, ttp-NAME on the bridge) with
192.168.90.N/24.  The root namespace is not touched.

 1. h1..h4 run `ipop up --mode tap --ip 10.128.0.N/16` (h2-h4 bootstrap from
    h1); ring forms; kernel ping over all 12 ordered pairs of virtual IPs;
    ping 10.128.0.99 gets "Destination Host Unreachable" and fails.
 2. iperf3 TCP 5 s h1->h2 and h2->h1 (-R) over the virtual IPs.
 3. ssh from h1 to an sshd on 10.128.0.2 (throwaway keys) runs a command.
 4. a 200 MB random file copied h1 -> h3 with socat; sha256 must match.
 5. 20 router-only nodes join; nftables drops h1<->h4 underlay traffic; h1's
    link to h4 dies; kernel ping h1->h4 still works, overlay ping hops >= 2.
 6. a node in tt-h5 with --ip 10.128.0.2 (h2's) is refused by h2's
    neighbours and warns within 15 s naming 10.128.0.2 (a claim proves
    nothing in a secret network: issue 18); h2 keeps working.
 7. as user nobody: --mode tap exits non-zero within 5 s mentioning the
    privilege; --mode auto keeps running in user mode and says so.
 8. a "VM" namespace tt-vm with 10.128.7.5/32 sits behind h1 on a veth
    (h1 forwards; `ipop route add` on h1's running node): kernel ping
    h2 -> 10.128.7.5 works, `ipop dht get ip:10.128.7.5` on h2 exits 0, and
    the VM pings 10.128.0.2.
 9. mobility: h2 pings 10.128.7.5 every 0.2 s for 15 s and streams 20 MB
    over TCP to the VM (1 MB chunks, 0.5 s apart, ~10 s); 2 s in the VM
    moves to h3 (`route del` on h1, new veth to h3, `route add` on h3).
    Replies must resume within 5 s of the move and the transfer must
    complete with a matching sha256.

Steps after 1 are independent checks: a failure is recorded and the test
goes on; the exit status is non-zero if any failed.  Node logs of a failed
run are kept in build/test-logs/t_tap-nodes (or $IPOP_TEST_LOGDIR).
Env: IPOP_TAP_ROUTERS (default 20), IPOP_TAP_FILE_MB (default 200),
     IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE (nodes run with -v).
"""
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (list_netns, TestFailure, sh, nsx, Proc, check, log, ipop_bin, up_conns,  # noqa: E402
                 near_up, true_neighbors, Lab, NsNode, ns_add, bridge_add, veth_to_bridge, wait_listen,
                 sha256_file, kernel_ping, SSH_OPTS)

PREFIX = "tt"
SW = "tt-sw"
BR = "ttbr0"
UNDERLAY = "192.168.90.%d"
VNET = "10.128.0.%d"
PORT = 4000
N_ROUTERS = int(os.environ.get("IPOP_TAP_ROUTERS", "20"))
FILE_MB = int(os.environ.get("IPOP_TAP_FILE_MB", "200"))
MARKER = "hello-over-ipop"
VM_NS = "tt-vm"
VM_IP = "10.128.7.5"
VM_PEER = "tt-tovm"        # the host's end of the VM's veth


class Node(NsNode):
    def __init__(self, t, name, ns, uip, port=PORT, vip=None, bootstrap=None, extra=()):
        NsNode.__init__(self, t, name, ns, vip)
        self.uip, self.port, self.bootstrap, self.extra = uip, port, bootstrap, list(extra)

    @property
    def uri(self):
        return "udp://%s:%d" % (self.uip, self.port)

    def command(self):
        a = [ipop_bin(), "up", "--listen", self.uri, "--secret-file", self.lab.key, "--control", self.ctl]
        if self.vip:
            a += ["--ip", self.vip + "/16", "--mode", "tap"]
        if self.bootstrap:
            a += ["--bootstrap", self.bootstrap]
        if os.environ.get("IPOP_TEST_VERBOSE"):
            a.append("-v")
        return a + self.extra


# --------------------------------------------------------------------------
# the test

class TapTest(Lab):
    name, prefix = "t_tap", PREFIX
    tools = ("ip", "ping", "iperf3", "sshd", "ssh", "ssh-keygen", "nft", "socat", "ss", "setpriv")

    def __init__(self):
        Lab.__init__(self)
        self.hosts = []
        self.unpriv_dir = None

    def body(self):
        log("t_tap: dir %s, %d routers, %d MB file" % (self.dir, N_ROUTERS, FILE_MB))
        self.setup_underlay()
        self.step("1 ring+ping", self.step_ring, fatal=True)
        for name, fn in (("2 iperf3", self.step_iperf), ("3 ssh", self.step_ssh),
                         ("4 file copy", self.step_file), ("5 multi-hop", self.step_multihop),
                         ("6 duplicate-ip", self.step_duplicate), ("7 unprivileged", self.step_unpriv),
                         ("8 vm behind h1", self.step_vm), ("9 mobility", self.step_mobility)):
            self.step(name, fn)

    # ---- underlay
    def add_ns(self, ns, uip):
        ns_add(ns)
        port = "ttp%d" % len(self._ports)
        self._ports.append(port)
        veth_to_bridge(SW, BR, ns, "tt-eth", port, uip + "/24")

    def setup_underlay(self):
        self._ports = []
        ns_add(SW)
        bridge_add(SW, BR)
        for i in range(1, 6):
            self.add_ns("tt-h%d" % i, UNDERLAY % i)

    # ---- step 1
    def step_ring(self):
        sh([ipop_bin(), "genkey", "--out", self.key])
        os.chmod(self.key, 0o600)
        h = []
        for i in range(1, 5):
            n = Node(self, "h%d" % i, "tt-h%d" % i, UNDERLAY % i, vip=VNET % i,
                     bootstrap=None if i == 1 else "udp://%s:%d" % (UNDERLAY % 1, PORT))
            self.nodes[n.name] = n
            h.append(n)
        self.hosts = h
        t0 = time.monotonic()
        h[0].start()
        self.wait_status([h[0]], 10)
        for n in h[1:]:
            n.start()
        self.wait_status(h, 10)
        # interfaces
        for n in h:
            st = n.status()
            iface = (st or {}).get("interface")
            check(isinstance(iface, dict) and iface.get("name"),
                  "%s: status shows no interface: %r" % (n.name, iface))
            rc, out, _ = nsx(n.ns, ["ip", "-o", "-4", "addr", "show", "dev", iface["name"]],
                             check_rc=False)
            check(rc == 0 and (n.vip + "/16") in out,
                  "%s: %s does not carry %s/16: %s" % (n.name, iface["name"], n.vip, out.strip()))
            rc, out, _ = nsx(n.ns, ["ip", "-o", "link", "show", "dev", iface["name"]], check_rc=False)
            check("mtu 1360" in out and ",UP" in out,
                  "%s: %s not up with mtu 1360: %s" % (n.name, iface["name"], out.strip()))
        log("4 tap nodes up (interface %s, mtu 1360)" % iface["name"])
        # ring: every host has up links to the other 3
        deadline = time.monotonic() + 30
        while True:
            self.check_alive(h)
            sts = {n: n.status() for n in h}
            missing = {n.name: sorted(m.name for m in h if m is not n and
                                      m.address not in up_conns(sts[n]))
                       for n in h}
            missing = {k: v for k, v in missing.items() if v}
            if not missing:
                break
            if time.monotonic() > deadline:
                self.dump_logs([n.name for n in h], 15)
                raise TestFailure("ring not formed within 30 s; missing up links: %r" % missing)
            time.sleep(0.2)
        t_ring = time.monotonic() - t0
        self.ok("ring of 4 tap nodes: all up links in %.2f s after first start" % t_ring)

        # all-pairs kernel ping, in parallel
        pairs = [(a, b) for a in h for b in h if a is not b]
        res = {}

        def one(a, b):
            t = time.monotonic()
            ok, out = kernel_ping(a.ns, b.vip, count=3, wait=2)
            res[(a.name, b.name)] = (ok, out, time.monotonic() - t)
        ths = [threading.Thread(target=one, args=p, daemon=True) for p in pairs]
        for th in ths:
            th.start()
        for th in ths:
            th.join(30)
        bad = [(k, v) for k, v in res.items() if not v[0]]
        rtts = []
        for ok, out, _ in res.values():
            m = re.search(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/", out)
            if m:
                rtts.append(float(m.group(1)))
        for (a, b), (ok, out, s) in bad:
            print("  kernel ping %s -> %s failed (%.1fs):\n    %s"
                  % (a, b, s, out.replace("\n", "\n    ")), flush=True)
        check(len(res) == 12 and not bad, "%d/12 kernel pings failed" % (12 - len(res) + len(bad)))
        self.ok("kernel ping all 12 ordered pairs ok (ping -c 3 -W 2); avg rtt mean %.3f ms max %.3f ms"
                    % (sum(rtts) / max(1, len(rtts)), max(rtts or [0])))

        # unreachable virtual IP
        ok, out = kernel_ping(h[0].ns, VNET % 99, count=2, wait=3)
        print("    " + out.replace("\n", "\n    "), flush=True)
        check(not ok, "ping to %s succeeded?" % (VNET % 99))
        check("Destination Host Unreachable" in out,
              "ping to %s did not report Destination Host Unreachable" % (VNET % 99))
        self.ok("ping %s: fails with Destination Host Unreachable" % (VNET % 99))
        st = h[0].status() or {}
        self.ok("h1 ip_traffic=%s drops=%s" % (json.dumps(st.get("ip_traffic")),
                                                  json.dumps(st.get("drops"))[:300]))

        # A member sending with another member's source IP: dropped and counted.
        # h1's kernel gets h3's address as a second one on ipop0 and pings h2
        # from it; h1's ipop must refuse the packets (spoofed_source).
        spoof = h[2].vip
        before = ((h[0].status() or {}).get("drops") or {}).get("spoofed_source", 0)
        rx2 = ((h[1].status() or {}).get("ip_traffic") or {}).get("rx_packets", 0)
        nsx(h[0].ns, ["ip", "addr", "add", spoof + "/32", "dev", "ipop0"], check_rc=False)
        try:
            rc, out, err = nsx(h[0].ns, ["ping", "-n", "-c", "3", "-W", "1", "-I", spoof, h[1].vip],
                               timeout=15, check_rc=False)
        finally:
            nsx(h[0].ns, ["ip", "addr", "del", spoof + "/32", "dev", "ipop0"], check_rc=False)
        after = ((h[0].status() or {}).get("drops") or {}).get("spoofed_source", 0)
        rx2b = ((h[1].status() or {}).get("ip_traffic") or {}).get("rx_packets", 0)
        check(rc != 0, "a ping from h1 with h3's source IP got replies")
        check(after >= before + 3, "spoofed_source on h1 rose %d -> %d (want +3)" % (before, after))
        self.ok("h1 pinging %s from h3's IP %s: no reply, h1 spoofed_source %d -> %d, h2 rx %d -> %d"
                    % (h[1].vip, spoof, before, after, rx2, rx2b))

    # ---- step 2
    def step_iperf(self):
        h1, h2 = self.hosts[0], self.hosts[1]
        rates = []
        for label, extra in (("h1->h2", []), ("h2->h1 (-R)", ["-R"])):
            srv = Proc("iperf3-s", ["ip", "netns", "exec", h2.ns, "iperf3", "-s", "-1",
                                    "-B", h2.vip, "-p", "5201"],
                       os.path.join(self.dir, "iperf3-server.log"))
            try:
                check(wait_listen(h2.ns, "%s:5201" % h2.vip, 10, srv),
                      "iperf3 server not listening: %s" % srv.log_tail(5))
                rc, out, err = nsx(h1.ns, ["iperf3", "-c", h2.vip, "-p", "5201", "-t", "5",
                                           "-J", "--connect-timeout", "5000"] + extra,
                                   timeout=30, check_rc=False)
                try:
                    j = json.loads(out)
                except ValueError:
                    j = {}
                check(rc == 0 and "error" not in j,
                      "iperf3 %s rc=%s error=%r %s" % (label, rc, j.get("error"),
                                                      (err or out)[-300:]))
                end = j.get("end", {})
                rcv = end.get("sum_received", {})
                snt = end.get("sum_sent", {})
                byt = rcv.get("bytes", 0)
                bps = rcv.get("bits_per_second", 0)
                check(byt > 0, "iperf3 %s received 0 bytes" % label)
                rates.append(bps)
                self.ok("iperf3 TCP 5 s %s: %.3f Gbit/s (%.1f MB received, %s retransmits)"
                            % (label, bps / 1e9, byt / 1e6, snt.get("retransmits")))
                srv.wait(5)
            finally:
                srv.stop()

    # ---- step 3
    def step_ssh(self):
        h1, h2 = self.hosts[0], self.hosts[1]
        srv, ck = self.sshd(h2.ns, h2.vip, ["LogLevel VERBOSE"])
        try:
            check(wait_listen(h2.ns, "%s:22" % h2.vip, 10, srv),
                  "sshd not listening on %s:22: %s" % (h2.vip, srv.log_tail(10)))
            t = time.monotonic()
            rc, out, err = nsx(h1.ns, ["ssh"] + SSH_OPTS + ["-i", ck, "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                                       "root@%s" % h2.vip, "echo", MARKER], timeout=30, check_rc=False)
            el = time.monotonic() - t
            if not (rc == 0 and MARKER in out):
                print("  sshd log:\n%s" % srv.log_tail(20), flush=True)
            check(rc == 0 and MARKER in out,
                  "ssh over overlay: rc=%s out=%r err=%r" % (rc, out[-200:], err[-300:]))
            self.ok("ssh root@%s echo: printed %r in %.2f s" % (h2.vip, out.strip(), el))
        finally:
            srv.stop()

    # ---- step 4
    def step_file(self):
        h1, h3 = self.hosts[0], self.hosts[2]
        src = os.path.join(self.dir, "file.src")
        dst = os.path.join(self.dir, "file.dst")
        n = FILE_MB * 1024 * 1024
        sh(["sh", "-c", "head -c %d /dev/urandom > '%s'" % (n, src)], timeout=60)
        check(os.path.getsize(src) == n, "source file has the wrong size")
        want = sha256_file(src)
        port = 5555
        lst = Proc("socat-listen", ["ip", "netns", "exec", h3.ns, "socat", "-u",
                                    "TCP-LISTEN:%d,bind=%s,reuseaddr" % (port, h3.vip),
                                    "OPEN:%s,creat,trunc,wronly" % dst],
                   os.path.join(self.dir, "socat-listen.log"))
        try:
            check(wait_listen(h3.ns, "%s:%d" % (h3.vip, port), 10, lst),
                  "socat listener not up: %s" % lst.log_tail(5))
            t = time.monotonic()
            rc, out, err = nsx(h1.ns, ["socat", "-u", "OPEN:%s,rdonly" % src,
                                       "TCP:%s:%d,connect-timeout=5" % (h3.vip, port)],
                               timeout=90, check_rc=False)
            lrc = lst.wait(30)
            el = time.monotonic() - t
            check(rc == 0, "socat sender rc=%s: %s" % (rc, (err or out).strip()[-300:]))
            check(lrc == 0, "socat listener rc=%s: %s" % (lrc, lst.log_tail(5)))
            got = os.path.getsize(dst) if os.path.exists(dst) else -1
            have = sha256_file(dst) if got >= 0 else ""
            check(got == n and have == want,
                  "file copy mismatch: size %d/%d sha256 %s vs %s" % (got, n, have[:16], want[:16]))
            self.ok("%d MB file h1->h3 via socat: %.2f s, %.1f MB/s, sha256 %s... matches"
                        % (FILE_MB, el, n / 1e6 / el, want[:16]))
        finally:
            lst.stop()
            for p in (src, dst):
                try:
                    os.unlink(p)
                except OSError:
                    pass

    # ---- step 5
    def step_multihop(self):
        h1, h4 = self.hosts[0], self.hosts[3]
        routers = []
        t0 = time.monotonic()
        for i in range(1, N_ROUTERS + 1):
            ns = "tt-r%d" % i
            uip = UNDERLAY % (100 + i)
            self.add_ns(ns, uip)
            boot = "udp://%s:%d" % (UNDERLAY % (1 + (i - 1) % 4), PORT)
            r = Node(self, "r%d" % i, ns, uip, bootstrap=boot)
            self.nodes[r.name] = r
            routers.append(r)
        for r in routers:
            r.start()
        self.wait_status(routers, 15)
        allnodes = self.hosts + routers
        # wait until the 24-node ring is consistent: every node has up near
        # links to its 2 true successors and 2 true predecessors
        deadline = time.monotonic() + 20
        truth = true_neighbors([n.address for n in allnodes])
        while True:
            self.check_alive(allnodes)
            sts = [n.status() for n in allnodes]
            bad = [(n.name, len(truth[n.address] - near_up(s)))
                   for n, s in zip(allnodes, sts) if truth[n.address] - near_up(s)]
            if not bad:
                break
            if time.monotonic() > deadline:
                raise TestFailure("ring of %d not consistent 20 s after routers started; "
                                  "nodes missing near links: %r" % (len(allnodes), bad))
            time.sleep(0.3)
        nconn = [len(up_conns(s)) for s in sts]
        self.ok("%d router-only nodes joined, ring of %d consistent in %.2f s; up links per node mean %.1f min %d max %d"
                    % (N_ROUTERS, len(allnodes), time.monotonic() - t0, sum(nconn) / len(nconn), min(nconn), max(nconn)))
        # where h1 and h4 sit on the ring: if no node lies between them they
        # are each other's immediate neighbours, the hard case for rerouting
        ring = sorted(n.address for n in allnodes)
        i1, i4 = ring.index(h1.address), ring.index(h4.address)
        between = min((i4 - i1) % len(ring), (i1 - i4) % len(ring)) - 1
        s1 = h1.status()
        linked = h4.address in up_conns(s1)
        where = ("h1 %s and h4 %s have %d node(s) between them on the ring of %d%s; "
                 "h1-h4 direct link up before blocking: %s"
                 % (h1.address[:10], h4.address[:10], between, len(ring),
                    " (immediate ring neighbours)" if between == 0 else "", linked))
        log(where)
        # block the underlay between h1 and h4, both directions, both sides
        for me, other in ((h1, h4), (h4, h1)):
            for cmd in (["add", "table", "inet", "tt"],
                        ["add", "chain", "inet", "tt", "out", "{ type filter hook output priority 0; }"],
                        ["add", "chain", "inet", "tt", "in", "{ type filter hook input priority 0; }"],
                        ["add", "rule", "inet", "tt", "out", "ip", "daddr", other.uip, "drop"],
                        ["add", "rule", "inet", "tt", "in", "ip", "saddr", other.uip, "drop"]):
                nsx(me.ns, ["nft"] + cmd)
        rc, out, _ = nsx(h1.ns, ["ping", "-n", "-c", "1", "-W", "1", h4.uip], check_rc=False)
        check(rc != 0, "underlay ping h1->h4 still works after the nft rules")
        t_block = time.monotonic()
        log("nftables: h1 <-> h4 underlay traffic dropped")
        deadline = t_block + 20
        while True:
            self.check_alive(allnodes)
            s1, s4 = h1.status(), h4.status()
            if s1 is not None and h4.address not in up_conns(s1) and \
                    s4 is not None and h1.address not in up_conns(s4):
                break
            if time.monotonic() > deadline:
                raise TestFailure("h1<->h4 link still up 20 s after blocking")
            time.sleep(0.2)
        t_dead = time.monotonic() - t_block
        self.ok("direct h1<->h4 link gone %.2f s after blocking" % t_dead)
        # kernel ping and overlay hops, polled up to 20 s
        deadline = time.monotonic() + 20
        kok = False
        best_hops = []
        tries = 0
        while True:
            tries += 1
            ok, out = kernel_ping(h1.ns, h4.vip, count=3, wait=2)
            kok = kok or ok
            ook, hops, oout = h1.oping(h4.vip, count=3, wait=2)
            if hops:
                best_hops = hops
            if kok and any(x >= 2 for x in hops):
                break
            if time.monotonic() > deadline:
                print("  last kernel ping:\n    %s\n  last overlay ping:\n    %s"
                      % (out.replace("\n", "\n    "), oout.replace("\n", "\n    ")), flush=True)
                self.dump_logs(["h1", "h4"], 15)
                st = h1.status() or {}
                names = {n.address: n.name for n in allnodes}
                print("  h1 up links: %s" % ", ".join(sorted(names.get(a, a[:8]) for a in up_conns(st))),
                      flush=True)
                print("  h1 drops: %s" % {k: v for k, v in (st.get("drops") or {}).items() if v},
                      flush=True)
                raise TestFailure("after blocking h1<->h4 underlay: kernel ping h1->h4 ok=%s, overlay "
                                  "hops %r (want >= 2) for 20 s; %s" % (kok, best_hops, where))
            time.sleep(0.5)
        self.ok("after blocking h1<->h4: kernel ping h1->%s ok; overlay ping hops %r "
                    "(%.1f s after link death, %d tries); %s"
                    % (h4.vip, hops, time.monotonic() - t_block - t_dead, tries, where))
        _ = ook

    # ---- step 6
    def step_duplicate(self):
        """A second node with h2's --ip: a claim on an address proves nothing
        in a secret network (any member could make it, issue 18), so the
        newcomer is refused by the holder's neighbours and warns, naming the
        address; h2 keeps its address and its traffic."""
        h1, h2 = self.hosts[0], self.hosts[1]
        dup = Node(self, "h5-dup", "tt-h5", UNDERLAY % 5, vip=h2.vip,
                   bootstrap="udp://%s:%d" % (h1.uip, PORT))
        self.nodes[dup.name] = dup
        dup.start()
        t0 = time.monotonic()

        def warned():
            return [line for line in dup.proc.log_text().splitlines()
                    if h2.vip in line and re.match(r"ipop\[\d+\]: (warn|error) ", line)]
        while not warned() and dup.proc.alive() and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        naming = warned()
        try:
            check(naming, "duplicate --ip %s: no warning naming it within 15 s (alive: %s):\n%s"
                  % (h2.vip, dup.proc.alive(), dup.proc.log_tail(10)))
            self.ok("duplicate --ip %s: refused, warned after %.2f s: %r"
                    % (h2.vip, time.monotonic() - t0, naming[0].strip()))
        finally:
            ok, out = kernel_ping(h1.ns, h2.vip, count=3, wait=2)
            if not ok:
                self.fail("h2 no longer reachable from h1 after the duplicate:\n    "
                          + out.replace("\n", "\n    "))
                self.dump_logs(["h1", "h2"], 10)
            else:
                self.ok("after the duplicate: kernel ping h1->h2 ok")
            dup.proc.stop()
            self.check_alive([h2])

    # ---- step 7
    def step_unpriv(self):
        pw = None
        for user in ("ttipop", "nobody"):
            try:
                pw = pwd.getpwnam(user)
                break
            except KeyError:
                continue
        check(pw is not None, "no unprivileged user (ttipop or nobody)")
        uid, gid = pw.pw_uid, pw.pw_gid
        sh(["ip", "netns", "add", "tt-u"])
        sh(["ip", "-n", "tt-u", "link", "set", "lo", "up"])
        d = tempfile.mkdtemp(prefix="ipop-t_tap-unpriv-", dir="/tmp")
        self.unpriv_dir = d
        binp = os.path.join(d, "ipop")
        shutil.copy(ipop_bin(), binp)
        os.chmod(binp, 0o755)
        kc = os.path.join(d, "net.key")
        shutil.copy(self.key, kc)
        os.chown(kc, uid, gid)
        os.chmod(kc, 0o600)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)
        pre = ["ip", "netns", "exec", "tt-u", "setpriv", "--reuid=%d" % uid, "--regid=%d" % gid,
               "--clear-groups", "--inh-caps=-all", "--"]
        for mode, port in (("tap", 14001), ("auto", 14002)):
            argv = pre + [binp, "up", "--mode", mode, "--ip", VNET % 50 + "/16",
                          "--listen", "udp://127.0.0.1:%d" % port, "--secret-file", kc,
                          "--control", os.path.join(d, "ctl-%s.sock" % mode)]
            p = Proc("unpriv-" + mode, argv, os.path.join(self.dir, "unpriv-%s.log" % mode))
            if mode == "tap":
                rc = p.wait(5)
                el = time.monotonic() - p.t0
                text = p.log_text()
                lines = [line for line in text.splitlines() if line.strip()]
                priv = [line for line in lines if re.search(r"CAP_NET_ADMIN|root", line)]
                print("  --mode tap as %s: rc=%s after %.2f s; output:\n%s"
                      % (pw.pw_name, rc, el, p.log_tail(10)), flush=True)
                if rc is None:
                    p.stop()
                check(rc is not None and rc != 0,
                      "--mode tap without privilege: rc=%s after %.1f s (want non-zero within 5 s)"
                      % (rc, el))
                check(priv, "--mode tap without privilege: no line mentions CAP_NET_ADMIN or root")
                self.ok("unprivileged --mode tap: rc=%d in %.2f s, %d output line(s): %r"
                            % (rc, el, len(lines), priv[0].strip()))
            else:
                time.sleep(2)
                alive = p.alive()
                p.stop()
                text = p.log_text()
                # Without the privilege, auto mode says so and falls back to user mode (lwIP).
                warn = [line for line in text.splitlines() if re.search(r"user mode", line, re.I)]
                print("  --mode auto as %s: alive after 2 s=%s; output:\n%s"
                      % (pw.pw_name, alive, p.log_tail(10)), flush=True)
                check(alive, "--mode auto without privilege exited (rc=%s)" % p.rc())
                check(warn, "--mode auto without privilege did not say it falls back to user mode")
                self.ok("unprivileged --mode auto: kept running 2 s, warned: %r" % warn[0].strip())

    # ---- steps 8, 9: a VM behind a host, then moved to another host
    def ctl(self, node, args, timeout=10):
        """ipop CLI against node's control socket; (rc, output)."""
        rc, out, err = node.cli(args, timeout)
        return rc, (out + err).strip()

    def attach_vm(self, host, vm_if):
        """veth vm_if (in VM_NS, with VM_IP) <-> VM_PEER (in host); the host
        forwards; the VM's default route points at the host's virtual IP."""
        sh(["ip", "link", "add", vm_if, "netns", VM_NS, "type", "veth",
            "peer", "name", VM_PEER, "netns", host.ns])
        sh(["ip", "-n", VM_NS, "addr", "add", VM_IP + "/32", "dev", vm_if])
        sh(["ip", "-n", VM_NS, "link", "set", vm_if, "up"])
        sh(["ip", "-n", VM_NS, "route", "add", host.vip, "dev", vm_if])
        sh(["ip", "-n", VM_NS, "route", "replace", "default", "via", host.vip, "dev", vm_if,
            "onlink"])
        sh(["ip", "-n", host.ns, "link", "set", VM_PEER, "up"])
        sh(["ip", "-n", host.ns, "route", "add", VM_IP + "/32", "dev", VM_PEER])
        nsx(host.ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        nsx(host.ns, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])

    def dht_get(self, node, key):
        """(rc, value bytes, stderr bytes) of `ipop dht get KEY` on node."""
        try:
            p = subprocess.run([ipop_bin(), "dht", "get", key, "--control", node.ctl],
                               capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None, b"", b"timeout"
        return p.returncode, p.stdout, p.stderr

    def describe_holder(self, val):
        """Length of a DHT value and which host's ring address it is."""
        v = val[:-1] if len(val) == 21 and val.endswith(b"\n") else val
        who = [n.name for n in self.hosts if n.address and bytes.fromhex(n.address) == v]
        return "%d-byte value%s" % (len(val), " = ring address of " + who[0] if who else
                                    " (no host's ring address: %s)" % v.hex()[:48])

    def step_vm(self):
        h1, h2 = self.hosts[0], self.hosts[1]
        sh(["ip", "netns", "add", VM_NS])
        sh(["ip", "-n", VM_NS, "link", "set", "lo", "up"])
        self.attach_vm(h1, "tt-vmeth")
        t0 = time.monotonic()
        rc, out = self.ctl(h1, ["route", "add", VM_IP + "/32"])
        check(rc == 0, "ipop route add %s/32 on h1: rc=%s %r" % (VM_IP, rc, out[-300:]))
        log("h1: ipop route add %s/32: %r" % (VM_IP, out[-200:]))
        # kernel ping h2 -> VM, polled up to 15 s (the DHT record may lag)
        deadline = t0 + 15
        tries = 0
        while True:
            tries += 1
            ok, out = kernel_ping(h2.ns, VM_IP, count=2, wait=2)
            if ok:
                break
            if time.monotonic() > deadline:
                print("  last kernel ping h2 -> %s:\n    %s" % (VM_IP, out.replace("\n", "\n    ")),
                      flush=True)
                self.dump_logs(["h1", "h2"], 15)
                raise TestFailure("kernel ping h2 -> %s (VM behind h1) failed for 15 s after "
                                  "route add" % VM_IP)
            time.sleep(0.5)
        el = time.monotonic() - t0
        m = re.search(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/", out)
        self.ok("VM %s behind h1: kernel ping from h2 ok %.2f s after route add (%d tries, avg rtt %s ms)"
                    % (VM_IP, el, tries, m.group(1) if m else "?"))
        # the DHT record
        rc, val, err = self.dht_get(h2, "ip:" + VM_IP)
        check(rc == 0, "ipop dht get ip:%s on h2: rc=%s %r" % (VM_IP, rc, (val + err)[-300:]))
        self.ok("ipop dht get ip:%s on h2: rc=0, %s" % (VM_IP, self.describe_holder(val)))
        # VM -> h2
        ok, out = kernel_ping(VM_NS, h2.vip)
        if not ok:
            print("  VM ping %s:\n    %s" % (h2.vip, out.replace("\n", "\n    ")), flush=True)
            self.dump_logs(["h1", "h2"], 15)
        check(ok, "kernel ping from the VM to %s failed" % h2.vip)
        self.ok("VM -> %s kernel ping ok" % h2.vip)

    def step_mobility(self):
        h1, h2, h3 = self.hosts[0], self.hosts[1], self.hosts[2]
        check(VM_NS in list_netns(PREFIX), "no VM namespace (step 8 failed early)")
        nbytes = 20 * 1024 * 1024
        src = os.path.join(self.dir, "vm.src")
        dst = os.path.join(self.dir, "vm.dst")
        sh(["sh", "-c", "head -c %d /dev/urandom > '%s'" % (nbytes, src)], timeout=30)
        want = sha256_file(src)
        port = 5001
        lst = Proc("socat-vm", ["ip", "netns", "exec", VM_NS, "socat", "-u",
                                "TCP-LISTEN:%d,reuseaddr" % port,
                                "OPEN:%s,creat,trunc,wronly" % dst],
                   os.path.join(self.dir, "socat-vm.log"))
        # throttled sender: 1 MB chunks, 0.5 s apart (~10 s); after EOF wait
        # for the listener to close so every byte is known to be delivered
        client = (
            "import socket,sys,time\n"
            "f=open(sys.argv[1],'rb'); s=socket.create_connection((sys.argv[2],int(sys.argv[3])),10)\n"
            "s.settimeout(60); t0=time.monotonic(); n=0\n"
            "while True:\n"
            "    b=f.read(1<<20)\n"
            "    if not b: break\n"
            "    s.sendall(b); n+=len(b)\n"
            "    print('%.2f sent %d' % (time.monotonic()-t0, n), flush=True)\n"
            "    time.sleep(0.5)\n"
            "s.shutdown(socket.SHUT_WR)\n"
            "while s.recv(4096): pass\n"
            "print('%.2f done %d' % (time.monotonic()-t0, n), flush=True)\n")
        pingp = sender = None
        try:
            check(wait_listen(VM_NS, ":%d" % port, 10, lst),
                  "socat listener in the VM not up: %s" % lst.log_tail(5))
            pinglog = os.path.join(self.dir, "mobility-ping.log")
            pingp = Proc("ping-vm", ["ip", "netns", "exec", h2.ns, "ping", "-n", "-D", "-i", "0.2",
                                     "-w", "15", "-W", "1", VM_IP], pinglog)
            sender = Proc("sender-vm", ["ip", "netns", "exec", h2.ns, sys.executable, "-c", client,
                                        src, VM_IP, str(port)],
                          os.path.join(self.dir, "sender-vm.log"))
            t_start = time.time()
            time.sleep(2)
            # the move: h1 stops routing, the VM's link moves to h3, h3 starts
            t_move = time.time()
            rc, out = self.ctl(h1, ["route", "del", VM_IP + "/32"])
            check(rc == 0, "ipop route del on h1: rc=%s %r" % (rc, out[-300:]))
            sh(["ip", "-n", h1.ns, "link", "del", VM_PEER])
            self.attach_vm(h3, "tt-vmeth2")
            rc, out = self.ctl(h3, ["route", "add", VM_IP + "/32"])
            check(rc == 0, "ipop route add on h3: rc=%s %r" % (rc, out[-300:]))
            t_moved = time.time()
            log("VM moved h1 -> h3 in %.2f s (started %.2f s after ping/transfer)"
                % (t_moved - t_move, t_move - t_start))
            prc = pingp.wait(25)
            src_rc = sender.wait(60)
            lrc = lst.wait(20)
            # ping analysis: replies (seq, wall time)
            text = pingp.log_text()
            replies = [(int(m.group(2)), float(m.group(1))) for m in
                       re.finditer(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+) ttl", text, re.M)]
            seqs = sorted(set(q for q, _ in replies))
            m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
            sent_n, recv_n = (int(m.group(1)), int(m.group(2))) if m else (-1, len(seqs))
            gap, gap_at = 0, None
            for a, b in zip(seqs, seqs[1:]):
                if b - a - 1 > gap:
                    gap, gap_at = b - a - 1, (a, b)
            after = [t for _, t in replies if t >= t_moved]
            first_after = (after[0] - t_moved) if after else None
            before = [t for _, t in replies if t < t_move]
            last_before = (t_move - before[-1]) if before else None
            # longest silence between consecutive replies around the move
            ts = sorted(t for _, t in replies)
            silence = max([b - a for a, b in zip(ts, ts[1:])] or [0])
            detail = ("ping: %d sent, %d received; longest icmp_seq gap %d missing (%.1f s) %s; "
                      "longest silence between replies %.2f s; last reply before the move %s s "
                      "before it, first %s s after the move completed"
                      % (sent_n, recv_n, gap, gap * 0.2, "between seq %d and %d" % gap_at if gap_at else "",
                         silence, "%.2f" % last_before if last_before is not None else "none",
                         "%.2f" % first_after if first_after is not None else "none"))
            log(detail)
            ok_ping = first_after is not None and first_after <= 5.0 and gap * 0.2 <= 5.0
            if not ok_ping:
                print("  ping log tail:\n%s" % pingp.log_tail(30), flush=True)
                self.dump_logs(["h1", "h2", "h3"], 15)
                self.fail("ping replies did not resume within 5 s of the move: " + detail)
            else:
                self.ok("VM moved h1 -> h3 (%.2f s of commands): %s" % (t_moved - t_move, detail))
            _ = prc
            # the transfer
            got = os.path.getsize(dst) if os.path.exists(dst) else -1
            have = sha256_file(dst) if got >= 0 else ""
            slog = sender.log_text().strip().splitlines()
            if not (src_rc == 0 and lrc == 0 and got == nbytes and have == want):
                print("  sender log:\n%s\n  listener log:\n%s"
                      % (sender.log_tail(30), lst.log_tail(10)), flush=True)
                rc_, ss, _ = nsx(h2.ns, ["ss", "-tni", "dst", VM_IP], check_rc=False)
                print("  ss in h2:\n    " + ss.replace("\n", "\n    "), flush=True)
            check(src_rc == 0, "TCP sender across the move: rc=%s (None = still running after 60 s)"
                  % src_rc)
            check(lrc == 0, "socat listener in the VM: rc=%s" % lrc)
            check(got == nbytes and have == want,
                  "TCP transfer across the move: got %d/%d bytes, sha256 %s vs %s"
                  % (got, nbytes, have[:16], want[:16]))
            self.ok("20 MB TCP h2 -> VM across the move: complete, sha256 %s... matches (%s)"
                        % (want[:16], slog[-1] if slog else ""))
            rc, val, err = self.dht_get(h2, "ip:" + VM_IP)
            self.ok("after the move: ipop dht get ip:%s on h2: rc=%s, %s"
                        % (VM_IP, rc, self.describe_holder(val) if rc == 0 else err[-200:]))
        finally:
            for p in (sender, pingp, lst):
                if p is not None:
                    p.stop()
            for f in (src, dst):
                try:
                    os.unlink(f)
                except OSError:
                    pass

    # ---- cleanup
    def close_more(self):
        if self.unpriv_dir:
            shutil.rmtree(self.unpriv_dir, ignore_errors=True)


if __name__ == "__main__":
    TapTest.main()
