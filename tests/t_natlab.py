#!/usr/bin/env python3
"""The NAT lab: every pair of site types, the paper's firewalled sites, and a
NAT mapping that changes.  Needs root (network namespaces, nftables, tap).

Every namespace this test makes is named "tl-*" (veths "tl*"); leftovers
are removed at start, and everything is removed on exit, failure, SIGTERM or
SIGINT.  The root namespace is not touched.

A "public internet" (203.0.113.0/24, a bridge in tl-net) holds the public
node tl-pub (203.0.113.10) and the sites.  Five site types, two sites each
(x = a, b), so that a pair of one type crosses two separate NATs:

  F  full cone: explicit mapping rules (snat to the router's address with the
     port kept, dnat of the UDP port range back to the host)   router tl-rfx
  P  port-restricted cone: masquerade                          router tl-rpx
  S  symmetric: masquerade random,fully-random                 router tl-rsx
  T  outbound TCP only: masquerade, UDP from the LAN dropped   router tl-rtx
  W  no NAT, a stateful firewall on the host that admits only replies to its
     own connections (public address, no router)

Every NAT router also drops unsolicited packets to itself (ct state new on
its WAN), as home routers do (t_nat step 2b shows why that matters).  Hosts
tl-h<site>.

 1. Matrix.  For each of the 15 unordered pairs of types, a network of its
    own (its own key, public node on port 5000+k, virtual net 10.(100+k).0/24,
    hosts in tap mode on port 4000+k): within 30 s the two hosts link, and
    the link is direct where the NAT pair allows it (F with anything but T,
    P-P, P-W, W-W) and relayed through the public node elsewhere.  Then,
    over the tap devices: ping, and a 20 MB file (IPOP_NATLAB_MB) sent with
    socat from x to y arrives with the same sha256.
    Prints the matrix and a table (time to link, path, RTT, throughput).
 2. The paper's case: three firewalled sites (P a, P b, W a), no inbound
    traffic allowed anywhere except to the public node; all three form one
    virtual LAN (ping and ssh each to each over tap); the public node is
    killed; after it, every pair still pings and ssh still works.
 3. A mapping that changes: the conntrack tables of the two routers of the
    S-F pair are flushed (conntrack -F); the link recovers (tap ping works
    again) within 30 s.
 4. Upgrade under a live session: the P-P pair's direct path is blocked
    (nftables on one router) until the pair relays; a TCP session starts
    (a line every 50 ms for 20 s, socat over the tap devices); the block is
    lifted; the relayed link must turn direct within 45 s, and every line
    must arrive, in order, on the one connection.

Exit status non-zero if any check failed.  Node logs of a failed run are kept
in build/test-logs/t_natlab-nodes (or $IPOP_TEST_LOGDIR).
Env: IPOP_NATLAB_MB (file size, default 20), IPOP_NATLAB_PAIRS (e.g. "PS,TT":
run only these), IPOP_NATLAB_STEPS (e.g. "1,3"), IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE.
"""
import concurrent.futures
import hashlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (sh, nsx, Proc, check, log, ipop_bin, Lab, NsNode, ns_add, bridge_add,  # noqa: E402
                 veth_to_bridge, up_link, conn_summary, kernel_ping, ssh_keys, sshd_config,
                 sshd_bin, SSH_OPTS, nat_rules)

PREFIX = "tl"
NET, BR = "tl-net", "tlbr0"
PUB_NS, PUB_IP = "tl-pub", "203.0.113.10"
KINDS = "FPSTW"
KIND_NAMES = {"F": "full cone", "P": "port-restricted cone", "S": "symmetric",
              "T": "outbound TCP only", "W": "firewall, no NAT"}
FILE_MB = int(os.environ.get("IPOP_NATLAB_MB", "20"))
MARKER = "ipop-natlab-ssh-ok"


def expected_path(x, y):
    """Where a direct link is possible for NAT types x and y."""
    s = {x, y}
    if "T" in s:
        return "relayed"        # no UDP out; nobody but the public node takes TCP in
    if "S" in s:
        return "direct" if s == {"S", "F"} else "relayed"  # only a full cone takes any port
    return "direct"             # F, P, W: endpoints are kept, so punching works


class Site:
    def __init__(self, kind, x, n):
        self.kind, self.x, self.n = kind, x, n
        self.name = "%s%s" % (kind.lower(), x)              # e.g. "pa"
        self.wan = "203.0.113.%d" % (20 + n)
        self.router = None if kind == "W" else "tl-r%s" % self.name
        self.host = "tl-h%s" % self.name
        self.ip = self.wan if kind == "W" else "10.%d.0.2" % n
        self.lan = None if kind == "W" else "10.%d.0" % n


def sites():
    out, n = {}, 1
    for k in KINDS:
        for x in "ab":
            s = Site(k, x, n)
            out[s.name] = s
            n += 1
    return out






class Node(NsNode):
    """One ipop process: a public node (mode none) or a host (tap)."""
    status_timeout = 8

    def __init__(self, t, name, ns, ip, port, key, vip=None, boot_port=None, dev=None):
        NsNode.__init__(self, t, name, ns, vip)
        self.ip, self.port, self.key, self.boot_port, self.dev = ip, port, key, boot_port, dev

    def command(self):
        a = [ipop_bin(), "up", "--listen", "udp://%s:%d" % (self.ip, self.port),
             "--listen", "tcp://%s:%d" % (self.ip, self.port),
             "--secret-file", self.key, "--control", self.ctl]
        if self.vip:
            a += ["--mode", "tap", "--dev", self.dev, "--ip", self.vip + "/24"]
        else:
            a += ["--mode", "none"]
        if self.boot_port:
            a += ["--bootstrap", "udp://%s:%d" % (PUB_IP, self.boot_port),
                  "--bootstrap", "tcp://%s:%d" % (PUB_IP, self.boot_port)]
        return a + (["-v"] if os.environ.get("IPOP_TEST_VERBOSE") else ["--log-level", "info"])


def ping(ns, ip, count=3, wait=2):
    """(ok, avg_ms, output) of a kernel ping over the tap devices."""
    ok, out = kernel_ping(ns, ip, count, wait, interval=0.2, quiet=True, timeout=count * wait + 10)
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return ok, float(m.group(1)) if m else None, out


class Pair:
    def __init__(self, k, x, y):
        self.k, self.x, self.y = k, x, y            # x, y: Site
        self.label = "%s-%s" % (x.kind, y.kind)
        self.expect = expected_path(x.kind, y.kind)
        self.net = "10.%d.0" % (100 + k)
        self.nodes = {}
        self.path = None
        self.link_s = None
        self.uri = None
        self.rtt = None
        self.mbps = None
        self.notes = []


class NatLab(Lab):
    name, prefix = "t_natlab", PREFIX + "-"
    tools = ("ip", "ping", "nft", "sysctl", "socat", "conntrack", "sshd", "ssh", "ssh-keygen")

    def __init__(self):
        Lab.__init__(self)
        self.sites = sites()
        self.pairs = []

    def body(self):
        log("t_natlab: dir %s, file %d MB" % (self.dir, FILE_MB))
        self.setup_lab()
        log("lab up: %d sites" % len(self.sites))
        steps = os.environ.get("IPOP_NATLAB_STEPS", "1,3,4,2").split(",")
        for name, fn in (("1 matrix", self.step_matrix), ("3 flush", self.step_flush),
                         ("4 upgrade", self.step_upgrade),
                         ("2 paper", lambda: (self.stop_pairs(), self.step_paper()))):
            if name.split()[0] in steps:
                self.step(name, fn)

    # ---- the lab
    def nft(self, ns, script):
        nsx(ns, ["nft", "-f", "-"], input=script)

    def nat_rules(self, s):
        return nat_rules(s.kind, s.lan + ".0/24", s.wan, "tlwan", "tllan", [("4000-4999", s.ip)])

    def setup_lab(self):
        names = [NET, PUB_NS] + [s.host for s in self.sites.values()] + \
                [s.router for s in self.sites.values() if s.router]
        ns_add(*names)
        bridge_add(NET, BR)
        veth_to_bridge(NET, BR, PUB_NS, "tl-eth", "tlp-pub", PUB_IP + "/24")
        for s in self.sites.values():
            if s.kind == "W":
                veth_to_bridge(NET, BR, s.host, "tl-eth", "tlp-%s" % s.name, s.wan + "/24")
                # the site's perimeter: the uplink only (the virtual LAN is inside)
                self.nft(s.host, "add table inet fw\n"
                         "add chain inet fw in { type filter hook input priority 0; policy accept; }\n"
                         "add rule inet fw in iifname \"tl-eth\" ct state established,related accept\n"
                         "add rule inet fw in iifname \"tl-eth\" drop\n")
                continue
            veth_to_bridge(NET, BR, s.router, "tlwan", "tlp-%s" % s.name, s.wan + "/24")
            sh(["ip", "-n", s.router, "link", "add", "tllan", "type", "veth", "peer", "name",
                "tl-eth", "netns", s.host])
            sh(["ip", "-n", s.router, "addr", "add", s.lan + ".1/24", "dev", "tllan"])
            sh(["ip", "-n", s.router, "link", "set", "tllan", "up"])
            sh(["ip", "-n", s.host, "addr", "add", s.ip + "/24", "dev", "tl-eth"])
            sh(["ip", "-n", s.host, "link", "set", "tl-eth", "up"])
            sh(["ip", "-n", s.host, "route", "add", "default", "via", s.lan + ".1"])
            nsx(s.router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self.nft(s.router, self.nat_rules(s))
        for s in self.sites.values():
            rc, out, err = nsx(s.host, ["ping", "-n", "-c", "1", "-W", "3", PUB_IP], check_rc=False,
                               timeout=15)
            check(rc == 0, "lab: %s cannot ping %s: %s" % (s.host, PUB_IP, (out + err).strip()[-200:]))

    def new_key(self, name):
        path = os.path.join(self.dir, name + ".key")
        sh([ipop_bin(), "genkey", "--out", path])
        os.chmod(path, 0o600)
        return path

    # ---- 1. the matrix
    def make_pairs(self):
        only = [p.strip().upper() for p in os.environ.get("IPOP_NATLAB_PAIRS", "").split(",") if p.strip()]
        k = 0
        for a, b in itertools.combinations_with_replacement(KINDS, 2):
            if only and a + b not in only and b + a not in only:
                continue
            p = Pair(k, self.sites[a.lower() + "a"], self.sites[b.lower() + "b"])
            self.pairs.append(p)
            k += 1

    def start_pair(self, p):
        key = self.new_key("pair%d" % p.k)
        p.nodes["pub"] = Node(self, "pub%d" % p.k, PUB_NS, PUB_IP, 5000 + p.k, key)
        for i, s in enumerate((p.x, p.y)):
            nd = Node(self, "p%d-%s" % (p.k, s.name), s.host, s.ip, 4000 + p.k, key,
                      vip="%s.%d" % (p.net, i + 1), boot_port=5000 + p.k, dev="tlt%d" % p.k)
            p.nodes["xy"[i]] = nd

    def wait_link(self, p, timeout=30):
        """Wait for the x-y link; for an expected direct one, give a relayed
        link time to upgrade.  Sets p.path, p.link_s, p.uri."""
        x, y = p.nodes["x"], p.nodes["y"]
        t0 = time.monotonic()
        first = None
        while time.monotonic() - t0 < timeout:
            c = up_link(x.status(), y.address)
            if c:
                first = first or time.monotonic() - t0
                p.path, p.uri = c.get("path"), c.get("uri")
                if c.get("path") == "direct":
                    p.link_s = time.monotonic() - t0
                    return
                if p.expect == "relayed" and time.monotonic() - t0 > 12:
                    break       # past the first upgrade try (5 s after the relay came up)
                p.link_s = first
            time.sleep(0.4)

    def check_pair(self, p, src_file, digest):
        """Ping and a file from x to y over the tap devices."""
        x, y = p.nodes["x"], p.nodes["y"]
        ok, avg, out = False, None, ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ok, avg, out = ping(p.x.host, y.vip, count=5)
            if ok:
                break
            time.sleep(1)
        p.rtt = avg
        if not ok:
            p.notes.append("ping %s -> %s failed: %s" % (x.vip, y.vip, out.strip()[-200:]))
            return
        dst = os.path.join(self.dir, "recv%d" % p.k)
        port = 9000 + p.k
        srv = subprocess.Popen(["ip", "netns", "exec", p.y.host, "socat", "-u",
                                "TCP-LISTEN:%d,bind=%s,reuseaddr" % (port, y.vip),
                                "CREATE:%s" % dst], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(0.5)
            t = time.monotonic()
            rc, _, err = nsx(p.x.host, ["socat", "-u", "OPEN:%s" % src_file,
                                        "TCP:%s:%d,connect-timeout=10" % (y.vip, port)],
                             check_rc=False, timeout=120)
            srv.wait(timeout=60)
            el = time.monotonic() - t
        except subprocess.TimeoutExpired:
            srv.kill()
            p.notes.append("file transfer timed out")
            return
        got = hashlib.sha256(open(dst, "rb").read()).hexdigest() if os.path.exists(dst) else None
        if rc != 0 or got != digest:
            p.notes.append("file transfer rc=%s, sha256 %s (expected %s): %s"
                           % (rc, (got or "none")[:16], digest[:16], (err or "").strip()[-200:]))
            return
        p.mbps = FILE_MB * 8 / el
        os.unlink(dst)

    def step_matrix(self):
        self.make_pairs()
        src = os.path.join(self.dir, "file.src")
        with open(src, "wb") as f:
            f.write(os.urandom(FILE_MB * 1024 * 1024))
        digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
        for p in self.pairs:
            self.start_pair(p)
            p.nodes["pub"].start()
        time.sleep(0.5)                 # the public nodes listen before the hosts dial
        for p in self.pairs:
            for name in "xy":
                p.nodes[name].start()
        with concurrent.futures.ThreadPoolExecutor(len(self.pairs)) as ex:
            list(ex.map(self.wait_link, self.pairs))
        # transfers a few at a time: 2 cores, and each is a measurement
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            list(ex.map(lambda p: self.check_pair(p, src, digest), self.pairs))
        self.report_matrix()
        for p in self.pairs:
            if p.path is None:
                self.fail("%s: no link between %s and %s within 30 s\n  x: %s\n  y: %s"
                          % (p.label, p.x.name, p.y.name, conn_summary(p.nodes["x"].status()),
                             conn_summary(p.nodes["y"].status())))
                self.dump(p)
            elif p.path != p.expect:
                self.fail("%s: %s link (%s), expected %s" % (p.label, p.path, p.uri, p.expect))
                self.dump(p)
            for note in p.notes:
                self.fail("%s: %s" % (p.label, note))

    def report_matrix(self):
        cell = {}
        for p in self.pairs:
            cell[(p.x.kind, p.y.kind)] = cell[(p.y.kind, p.x.kind)] = p
        lines = ["matrix (D direct, R relayed, - no link; * = not as expected):",
                 "        " + "".join("%-4s" % k for k in KINDS)]
        for a in KINDS:
            row = "     %s  " % a
            for b in KINDS:
                p = cell.get((a, b))
                if not p:
                    row += "    "
                    continue
                c = {"direct": "D", "relayed": "R"}.get(p.path, "-")
                row += "%-4s" % (c + ("*" if p.path != p.expect else ""))
            lines.append(row)
        lines.append("types: " + ", ".join("%s %s" % (k, v) for k, v in KIND_NAMES.items()))
        lines.append("%-6s %-8s %-8s %-28s %9s %9s %11s" % ("pair", "expect", "path", "uri",
                                                            "link s", "rtt ms", "Mbit/s"))
        for p in self.pairs:
            lines.append("%-6s %-8s %-8s %-28s %9s %9s %11s" % (
                p.label, p.expect, p.path or "-", p.uri or "-",
                "%.1f" % p.link_s if p.link_s is not None else "-",
                "%.3f" % p.rtt if p.rtt is not None else "-",
                "%.0f" % p.mbps if p.mbps is not None else "-"))
        for ln in lines:
            self.note(ln)

    def dump(self, p, n=25):
        for nd in p.nodes.values():
            if nd.proc:
                print("  log tail of %s (alive=%s):\n%s" % (nd.name, nd.alive(), nd.proc.log_tail(n)),
                      flush=True)

    def stop_pairs(self, keep=()):
        for p in self.pairs:
            if p.label in keep:
                continue
            for nd in p.nodes.values():
                if nd.proc:
                    nd.proc.stop(3)

    # ---- 2. the paper's case
    def paper_sshd(self, ns, vip, d, hk, ak):
        cfg = sshd_config(os.path.join(d, "sshd_%s" % vip), vip, hk, ak, os.path.join(d, "sshd_%s.pid" % vip))
        return Proc("sshd-%s" % vip, ["ip", "netns", "exec", ns, sshd_bin(), "-f", cfg, "-D", "-e"],
                    os.path.join(self.dir, "sshd_%s.log" % vip))

    def ssh(self, ns, ck, vip):
        rc, out, err = nsx(ns, ["ssh"] + SSH_OPTS + ["-i", ck, "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                                                     "root@%s" % vip, "echo", MARKER],
                           timeout=40, check_rc=False)
        return rc == 0 and MARKER in (out or ""), (err or out or "").strip()[-200:]

    def all_pairs_talk(self, hosts, ck, when):
        ok = True
        for (sa, na), (sb, nb) in itertools.permutations(hosts, 2):
            good, avg, out = False, None, ""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not good:
                good, avg, out = ping(sa.host, nb.vip, count=3)
                if not good:
                    time.sleep(1)
            sok, serr = self.ssh(sa.host, ck, nb.vip) if good else (False, "no ping")
            self.ok("paper %s: %s -> %s: ping %s (avg %s ms), ssh %s"
                        % (when, sa.name, sb.name, "ok" if good else "FAILED", avg,
                           "ok" if sok else "FAILED"))
            if not good or not sok:
                ok = False
                self.fail("%s: %s -> %s (%s): ping %s, ssh: %s"
                          % (when, sa.name, sb.name, nb.vip, out.strip()[-200:] if not good else "ok", serr))
        return ok

    def step_paper(self):
        key = self.new_key("paper")
        pub = Node(self, "paper-pub", PUB_NS, PUB_IP, 6000, key).start()
        chosen = [self.sites["pa"], self.sites["pb"], self.sites["wa"]]
        nodes = []
        for i, s in enumerate(chosen):
            nodes.append((s, Node(self, "paper-%s" % s.name, s.host, s.ip, 6001, key,
                                  vip="10.99.0.%d" % (i + 1), boot_port=6000, dev="tlpp")))
        time.sleep(0.3)
        for _, nd in nodes:
            nd.start()
        hk, ck, ak = ssh_keys(os.path.join(self.dir, "ssh"), "host", "client")
        d = os.path.dirname(hk)
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", 0o755)
        # all three linked to each other (a 4-node ring: everyone is a near neighbour)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            missing = [(a.name, b.name) for (a, na), (b, nb) in itertools.permutations(nodes, 2)
                       if not up_link(na.status(), nb.address)]
            if not missing:
                break
            time.sleep(0.5)
        links = []
        for (a, na), (b, nb) in itertools.combinations(nodes, 2):
            c = up_link(na.status(), nb.address)
            links.append("%s-%s %s" % (a.name, b.name, c.get("path") if c else "none"))
        self.ok("paper: links after %.1f s: %s" % (time.monotonic() - t0, ", ".join(links)))
        srvs = []
        for s, nd in nodes:
            srvs.append(self.paper_sshd(s.host, nd.vip, d, hk, ak))
        time.sleep(1)
        try:
            self.all_pairs_talk([(s, nd) for s, nd in nodes], ck, "with the public node")
            pub.proc.kill(signal.SIGKILL)
            t = time.monotonic()
            self.ok("paper: public node killed (SIGKILL)")
            time.sleep(6)       # past the 4 s dead-link timeout: the ring forgets it
            self.all_pairs_talk([(s, nd) for s, nd in nodes], ck, "without it")
            self.ok("paper: sites still talk %.1f s after the public node died"
                        % (time.monotonic() - t))
        finally:
            for srv in srvs:
                srv.stop()
            for _, nd in nodes:
                nd.proc.stop(3)

    # ---- 3. a mapping that changes
    def step_flush(self):
        p = next((p for p in self.pairs if {p.x.kind, p.y.kind} == {"S", "F"}), None)
        if p is None:
            return
        x, y = p.nodes["x"], p.nodes["y"]
        ok, _, out = ping(p.x.host, y.vip, count=2)
        check(ok, "S-F pair does not ping before the flush: %s" % out.strip()[-200:])
        for s in (p.x, p.y):
            nsx(s.router, ["conntrack", "-F"], check_rc=False)
        t0 = time.monotonic()
        back = None
        while time.monotonic() - t0 < 30:
            ok, _, _ = ping(p.x.host, y.vip, count=1, wait=1)
            ok2, _, _ = ping(p.y.host, x.vip, count=1, wait=1) if ok else (False, 0, "")
            if ok and ok2:
                back = time.monotonic() - t0
                break
            time.sleep(0.5)
        c = up_link(x.status(), y.address)
        if back is None:
            self.fail("S-F pair not pinging 30 s after both routers' conntrack flush; "
                      "x: %s" % conn_summary(x.status()))
            self.dump(p)
        else:
            self.ok("flush: S-F pair pings both ways %.1f s after both routers' conntrack "
                        "tables were flushed; link now %s %s" % (back, c and c.get("path"),
                                                                  c and c.get("uri")))

    # ---- 4. a relayed link turns direct under a live TCP session
    def block(self, site, other, on):
        """Drop (or stop dropping) what site's router forwards to or from the
        other site's public address: a path that is briefly unusable."""
        r = self.sites[site].router
        nsx(r, ["nft", "delete", "table", "ip", "tlblock"], check_rc=False)
        if on:
            wan = self.sites[other].wan
            self.nft(r, "add table ip tlblock\n"
                     "add chain ip tlblock forwarding { type filter hook forward priority -10; }\n"
                     "add rule ip tlblock forwarding ip daddr %s drop\n"
                     "add rule ip tlblock forwarding ip saddr %s drop\n" % (wan, wan))

    def wait_path(self, x, y, path, timeout):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            c = up_link(x.status(), y.address)
            if c and c.get("path") == path:
                return time.monotonic() - t0
            time.sleep(0.3)
        return None

    def step_upgrade(self):
        p = next((p for p in self.pairs if p.x.kind == p.y.kind == "P"), None)
        if p is None:
            return
        x, y = p.nodes["x"], p.nodes["y"]
        self.block(p.x.name, p.y.name, True)
        try:
            el = self.wait_path(x, y, "relayed", 40)
            check(el is not None, "P-P pair not relayed 40 s after its direct path was blocked: %s"
                  % conn_summary(x.status()))
            self.ok("upgrade: direct path blocked; P-P pair relayed after %.1f s" % el)
            svg = os.path.join(self.dir, "relayed.svg")
            rc, _, err = sh([ipop_bin(), "map", "--svg", svg, "--control", x.ctl], check_rc=False)
            text = open(svg).read() if rc == 0 and os.path.exists(svg) else ""
            check('data-kind="relayed" data-peer="%s' % y.address[:8] in text or
                  ('data-kind="relayed"' in text and y.vip in text),
                  "ipop map does not draw the relayed link (rc=%s %s)" % (rc, err.strip()[-200:]))
            self.ok("upgrade: ipop map draws the link as relayed")
            out = os.path.join(self.dir, "session.out")
            port = 9500
            srv = subprocess.Popen(["ip", "netns", "exec", p.y.host, "socat", "-u",
                                    "TCP-LISTEN:%d,bind=%s,reuseaddr" % (port, y.vip),
                                    "CREATE:%s" % out], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            lines = 400     # one line every 50 ms: 20 s of a live session
            cli = subprocess.Popen(["ip", "netns", "exec", p.x.host, "bash", "-c",
                                    "for i in $(seq 0 %d); do echo line-$i; sleep 0.05; done | "
                                    "socat -u STDIN TCP:%s:%d,connect-timeout=10" % (lines - 1, y.vip, port)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
            time.sleep(3)
            c = up_link(x.status(), y.address)
            check(c and c.get("path") == "relayed", "session did not start on the relayed link")
            self.block(p.x.name, p.y.name, False)
            el = self.wait_path(x, y, "direct", 45)
            if el is None:
                self.fail("relayed link did not turn direct within 45 s of the path "
                          "opening: %s" % conn_summary(x.status()))
            else:
                self.ok("upgrade: direct path open again; the link turned direct %.1f s later" % el)
            try:
                crc = cli.wait(timeout=60)
                srv.wait(timeout=20)
            except subprocess.TimeoutExpired:
                cli.kill()
                srv.kill()
                crc = None
            got = open(out).read().split() if os.path.exists(out) else []
            want = ["line-%d" % i for i in range(lines)]
            if crc != 0 or got != want:
                self.fail("the TCP session across the upgrade: client rc=%s, %d of %d "
                          "lines, in order: %s; %s" % (crc, len(got), lines, got == want[:len(got)],
                                                       (cli.stderr.read() or b"").decode()[-200:]))
            else:
                self.ok("upgrade: a TCP session (%d lines over 20 s) ran across the switch from "
                            "relayed to direct with every line in order" % lines)
        finally:
            self.block(p.x.name, p.y.name, False)


if __name__ == "__main__":
    NatLab.main()
