#!/usr/bin/env python3
"""NAT traversal integration test; needs root (network namespaces, nftables).

Every namespace this test makes is named "tn-*" ($IPOP_T_NAT_PREFIX-* when
set, so that two checkouts can run it at once); leftovers with that prefix
are removed at start, and everything (namespaces, ipop) is removed on exit,
failure, SIGTERM or SIGINT.  The root namespace is not touched.

Lab ("public internet" 203.0.113.0/24 exists only inside tn-net):

    tn-pub 203.0.113.10 (bootstrap, --mode none)
       |
    tn-net bridge tnbr0 -- tn-ca .1 | .17 -- tn-ra tnwan 203.0.113.18 | tnlan 10.1.1.1 ------ tn-a 10.1.1.2
                       \\-- tn-cb .2 | .33 -- tn-rb tnwan 203.0.113.34 | tnlan 10.2.0.1 --
                                                tn-lb 10.2.0.2 | 10.2.2.1 -- tn-b 10.2.2.2

Between each site router and the bridge sits a plain forwarding router
(tn-ca, tn-cb: an ISP's), so that two routers lie between the NATs, as
between sites on the internet: a datagram whose TTL runs out past its own
NAT does not reach the other one (t_nat once put both NATs on the bridge).
Host b sits one router (tn-lb) deeper inside its site than host a.
The routers forward and masquerade out of "tnwan" (nftables); hosts run
`ipop up --mode none --ip 10.128.0.N/16 --listen udp://10.x.x.2:4000
--bootstrap udp://203.0.113.10:4000`.

 1. both hosts learn a public endpoint (status "endpoints" holds
    udp://203.0.113.x:PORT) within 10 s and "nat" is not "unknown".
 2. cone NAT on both sides (bare masquerade, no input firewall, a common
    site gateway): the direct link must form within 20 s and ping A->B must
    take hops=1.  A peer's punch that reaches a router before the host's own
    punch leaves a conntrack entry to the router itself; the host's mapping
    then clashes with it and masquerade picks another port, so neither
    side's punches ever match (printed as WHY lines from the conntrack
    tables on failure, with node logs).  ipop's first punches have a TTL
    that opens its own NAT but dies before the peer's (section 09 nat_):
    host b must have learned that it needs TTL 3 (its log says so).
 2b. the same with a typical home-router input firewall on both routers
    (iifname tnwan ct state new drop; hosts restarted on port 4001), which
    drops such early punches: the direct link must form, hops=1.
 3. symmetric NAT on tn-rb (masquerade random,fully-random), B restarted on port 4002:
    A and B must link through a relay (the public node) within 20 s, not
    directly; pings A<->B take one overlay hop (the relayed link).

Exit status non-zero if any check failed.  Node logs of a failed run are kept
in build/test-logs/t_nat-nodes (or $IPOP_TEST_LOGDIR).
Env: IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE (nodes run with -v).
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (TestFailure, sh, nsx, check, log, ipop_bin, Lab, NsNode, ns_add, bridge_add,  # noqa: E402
                 veth_to_bridge, veth_pair, up_link, conn_summary)

PREFIX = os.environ.get("IPOP_T_NAT_PREFIX") or "tn"
NET = PREFIX + "-net"
BR = "tnbr0"                    # interface names live inside the namespaces
PUB_NS, PUB_IP = PREFIX + "-pub", "203.0.113.10"
PORT = 4000
SITES = {
    # name: (router ns, host ns, router wan ip, lan prefix, vip)
    "a": (PREFIX + "-ra", PREFIX + "-a", "203.0.113.18", "10.1.1", "10.128.0.1"),
    "b": (PREFIX + "-rb", PREFIX + "-b", "203.0.113.34", "10.2.2", "10.128.0.2"),
}
# the ISP router of each site: (ns, address on the bridge, its /28 towards the site router)
CORES = {"a": (PREFIX + "-ca", "203.0.113.1", "203.0.113.16"),
         "b": (PREFIX + "-cb", "203.0.113.2", "203.0.113.32")}
# a router inside the site, between host and NAT: (ns, /24 prefix between it and the NAT)
INNER = {"b": (PREFIX + "-lb", "10.2.0")}
PUBLIC_EP = re.compile(r"^udp://203\.0\.113\.\d+:\d+$")


class Node(NsNode):
    status_timeout = 8

    def __init__(self, t, name, ns, uip, vip=None, bootstrap=None):
        NsNode.__init__(self, t, name, ns, vip)
        self.uip, self.bootstrap, self.port = uip, bootstrap, PORT

    def command(self):
        a = [ipop_bin(), "up", "--mode", "none", "--listen", "udp://%s:%d" % (self.uip, self.port),
             "--secret-file", self.lab.key, "--control", self.ctl]
        if self.vip:
            a += ["--ip", self.vip + "/16"]
        if self.bootstrap:
            a += ["--bootstrap", self.bootstrap]
        return a + (["-v"] if os.environ.get("IPOP_TEST_VERBOSE") else ["--log-level", "info"])


def direct_link(st, addr):
    return up_link(st, addr, "direct")


class NatTest(Lab):
    name, prefix, tools = "t_nat", PREFIX + "-", ("ip", "ping", "nft", "sysctl")

    def body(self):
        log("t_nat: dir %s" % self.dir)
        self.setup_lab()
        self.start_nodes()
        log("lab up; public node and hosts a, b running")
        for name, fn in (("1 public endpoint", self.step_public), ("2 cone", self.step_cone),
                         ("2b cone+firewall", self.step_cone_fw), ("3 symmetric", self.step_symmetric)):
            self.step(name, fn)

    # ---- lab
    def setup_lab(self):
        ns_add(NET, PUB_NS, *(tuple(x for s in SITES.values() for x in s[:2]) +
                              tuple(c[0] for c in CORES.values()) + tuple(i[0] for i in INNER.values())))
        bridge_add(NET, BR)
        veth_to_bridge(NET, BR, PUB_NS, "tn-eth", "tnp-pub", PUB_IP + "/28")
        for name, (rns, hns, wan, lan, _vip) in SITES.items():
            cns, cip, cnet = CORES[name]
            veth_to_bridge(NET, BR, cns, "tnup", "tnp-%s" % name, cip + "/28")
            core_side = cnet[:cnet.rindex(".") + 1] + str(int(cnet.rsplit(".", 1)[1]) + 1)
            veth_pair(cns, "tndown", core_side, rns, "tnwan", wan, 28)
            if name in INNER:
                ins, inet = INNER[name]
                veth_pair(rns, "tnlan", inet + ".1", ins, "tnup", inet + ".2", 24)
                veth_pair(ins, "tnlan", lan + ".1", hns, "tn-eth", lan + ".2", 24)
                sh(["ip", "-n", ins, "route", "add", "default", "via", inet + ".1"])
                sh(["ip", "-n", rns, "route", "add", lan + ".0/24", "via", inet + ".2"])
                nsx(ins, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            else:
                veth_pair(rns, "tnlan", lan + ".1", hns, "tn-eth", lan + ".2", 24)
            sh(["ip", "-n", hns, "route", "add", "default", "via", lan + ".1"])
            sh(["ip", "-n", rns, "route", "add", "default", "via", core_side])
            sh(["ip", "-n", PUB_NS, "route", "add", cnet + "/28", "via", cip])
            for other, (_ons, oip, onet) in CORES.items():
                if other != name:       # the other site's transit net, via its ISP router
                    sh(["ip", "-n", cns, "route", "add", onet + "/28", "via", oip])
            for ns in (cns, rns):
                nsx(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self.set_nat(name, "masquerade")
        # sanity: each host reaches the public node through its NAT
        for name, (rns, hns, *_r) in SITES.items():
            rc, out, err = nsx(hns, ["ping", "-n", "-c", "1", "-W", "3", PUB_IP], check_rc=False,
                               timeout=15)
            check(rc == 0, "lab: %s cannot ping %s: %s" % (hns, PUB_IP, (out + err).strip()[-200:]))
        # and the other site's router three hops away (ISP, ISP, router)
        rc, out, err = nsx(SITES["a"][1], ["ping", "-n", "-c", "1", "-W", "3", SITES["b"][2]],
                           check_rc=False, timeout=15)
        check(rc == 0, "lab: host a cannot ping %s: %s" % (SITES["b"][2], (out + err).strip()[-200:]))

    def set_nat(self, site, action):
        rns = SITES[site][0]
        nsx(rns, ["nft", "delete", "table", "ip", "nat"], check_rc=False)
        script = ("add table ip nat\n"
                  "add chain ip nat post { type nat hook postrouting priority 100; }\n"
                  "add rule ip nat post oifname \"tnwan\" %s\n" % action)
        nsx(rns, ["nft", "-f", "-"], input=script)
        self.flush_conntrack(site)

    def flush_conntrack(self, site):
        # without the conntrack tool: a rule change does not drop existing
        # entries, but the restarted node's new flows are new entries anyway
        pass

    def conntrack(self, site):
        rns = SITES[site][0]
        rc, out, _ = nsx(rns, ["cat", "/proc/net/nf_conntrack"], check_rc=False, timeout=10)
        if rc != 0:
            return "(no /proc/net/nf_conntrack)"
        lines = [ln for ln in out.splitlines() if "udp" in ln]
        return "\n".join("    " + re.sub(r"\s+", " ", ln) for ln in lines) or "    (no udp entries)"

    def nft_counters(self, site):
        rc, out, _ = nsx(SITES[site][0], ["nft", "list", "ruleset"], check_rc=False)
        return out

    def diagnose(self, a, b):
        for nd in (a, b, self.nodes["pub"]):
            st = nd.status()
            print("  %s: nat=%r endpoints=%s\n    connections: %s"
                  % (nd.name, (st or {}).get("nat"), (st or {}).get("endpoints"), conn_summary(st)),
                  flush=True)
        for site in SITES:
            print("  conntrack in %s:\n%s" % (SITES[site][0], self.conntrack(site)), flush=True)
        self.dump_logs(["a", "b", "pub"], 40)

    # ---- steps
    def start_nodes(self):
        sh([ipop_bin(), "genkey", "--out", self.key])
        os.chmod(self.key, 0o600)
        boot = "udp://%s:%d" % (PUB_IP, PORT)
        pub = Node(self, "pub", PUB_NS, PUB_IP)
        self.nodes["pub"] = pub
        pub.start()
        self.wait_status([pub], 15)
        for name, (rns, hns, wan, lan, vip) in SITES.items():
            self.nodes[name] = Node(self, name, hns, lan + ".2", vip=vip, bootstrap=boot)
            self.nodes[name].start()
        self.wait_status([self.nodes["a"], self.nodes["b"]], 15)

    def wait_public(self, nodes, timeout):
        """Wait for public endpoints; returns {name: (endpoint, nat, ...)} or raises."""
        t0 = time.monotonic()
        got = {}
        while True:
            for n in nodes:
                if n.name in got:
                    continue
                st = n.status()
                eps = [e for e in (st or {}).get("endpoints", []) if PUBLIC_EP.match(str(e))]
                nat = (st or {}).get("nat")
                # The NAT kind needs reports from two peers; with only the public
                # node linked it honestly says "unknown".
                if eps and nat:
                    got[n.name] = (eps[0], nat, time.monotonic() - t0, st.get("endpoints"))
            if len(got) == len(nodes):
                return got
            if time.monotonic() - t0 > timeout:
                for n in nodes:
                    if n.name not in got:
                        st = n.status()
                        print("  %s: nat=%r endpoints=%s" % (n.name, (st or {}).get("nat"),
                                                           (st or {}).get("endpoints")), flush=True)
                self.dump_logs([n.name for n in nodes if n.name not in got], 20)
                raise TestFailure("no public endpoint / NAT kind within %d s on %s"
                                  % (timeout, ", ".join(n.name for n in nodes if n.name not in got)))
            time.sleep(0.3)

    def step_public(self):
        a, b = self.nodes["a"], self.nodes["b"]
        got = self.wait_public([a, b], 10)
        for nm in ("a", "b"):
            ep, nat, el, eps = got[nm]
            wan = SITES[nm][2]
            check(ep.startswith("udp://%s:" % wan),
                  "%s learned public endpoint %s, expected its router's %s" % (nm, ep, wan))
            self.ok("host %s: public endpoint %s after %.1f s, NAT: %s (advertises %s)"
                        % (nm, ep, el, nat, eps))
            lg = self.nodes[nm].proc.log_text()
            m = re.search(r"nat: public endpoint .*", lg)
            if m:
                log("  %s log: %s" % (nm, m.group(0).strip()))

    def wait_direct(self, a, b, timeout, path="direct"):
        """(link, elapsed) once a has an up link to b's ring address; (None, timeout)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            c = up_link(a.status(), b.address, path)
            if c:
                return c, time.monotonic() - t0
            time.sleep(0.3)
        return None, timeout

    def ping_both(self, a, b):
        res = {}
        for src, dst in ((a, b), (b, a)):
            ok, hops, out = False, [], ""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ok, hops, out = src.oping(dst.vip, count=3, wait=3, interval=0.3)
                if ok:
                    break
                time.sleep(1)
            res[(src.name, dst.name)] = (ok, hops, out)
            if not ok:
                self.fail("ipop ping %s -> %s (%s) failed:\n    %s"
                          % (src.name, dst.name, dst.vip, out.replace("\n", "\n    ")[-600:]))
        return res

    def restart_hosts(self, names, port):
        """Stop the hosts, then start them on a new listen port: new flows, so
        no conntrack entry of the old run (it outlives a rule change) applies."""
        a = self.nodes["a"]
        for nm in names:
            self.nodes[nm].proc.stop(5)
        for nm in names:
            self.nodes[nm].port = port
            self.nodes[nm].start()
        self.wait_status([self.nodes[nm] for nm in names], 15)
        _ = a

    def mapping_clash(self, site):
        """Conntrack entries whose masquerade changed the host's source port,
        and unreplied inbound entries to the router itself that caused it."""
        rns, hns, wan, lan, _vip = SITES[site]
        host = lan + ".2"
        rc, out, _ = nsx(rns, ["cat", "/proc/net/nf_conntrack"], check_rc=False, timeout=10)
        notes = []
        for ln in (out or "").splitlines():
            m = re.search(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) .*?src=(\S+) dst=(\S+) "
                          r"sport=(\d+) dport=(\d+)", ln)
            if not m or "udp" not in ln:
                continue
            osrc, odst, osp, odp, rsrc, rdst, rsp, rdp = m.groups()
            if osrc == host and rdst == wan and rdp != osp:
                notes.append("%s: %s:%s -> %s:%s was mapped to %s:%s (port NOT preserved)"
                             % (rns, osrc, osp, odst, odp, wan, rdp))
            if odst == wan and rdst == osrc and "UNREPLIED" in ln and osrc.startswith("203.0.113."):
                notes.append("%s: unreplied inbound %s:%s -> %s:%s terminated at the router "
                             "(arrived before the host's own punch, not forwarded)"
                             % (rns, osrc, osp, odst, odp))
        return notes

    def step_direct(self, label, timeout=20):
        a, b = self.nodes["a"], self.nodes["b"]
        c, el = self.wait_direct(a, b, timeout)
        if c:
            self.ok("%s: A has a direct up link to B after %.1f s: uri %s direction %s "
                        "(hole punched)" % (label, el, c.get("uri"), c.get("direction")))
            cb = direct_link(b.status(), a.address)
            log("  B's side: %s" % (("uri %s direction %s" % (cb.get("uri"), cb.get("direction")))
                                    if cb else "no up link to A (!)"))
        else:
            log("%s: no direct A-B link within %d s; diagnosing" % (label, timeout))
            self.diagnose(a, b)
            why = self.mapping_clash("a") + self.mapping_clash("b")
            for w in why:
                log("  WHY: " + w)
        res = self.ping_both(a, b)
        ok, hops, out = res[("a", "b")]
        if ok:
            self.ok("%s: ipop ping A -> B ok, hops=%s" % (label, hops))
        okb, hopsb, _ = res[("b", "a")]
        if okb:
            self.ok("%s: ipop ping B -> A ok, hops=%s" % (label, hopsb))
        if not c:
            self.fail("no direct A<->B link through two port-restricted cone NATs within "
                      "%d s (pings went %s hops)%s" % (timeout, hops, "".join(
                          "\n  " + w for w in why)))
        elif ok and hops and max(hops) != 1:
            self.fail("direct link up but ping A -> B took hops=%s (expected 1)" % hops)

    def step_cone(self):
        # Routers without an input firewall accept a peer's early punch for
        # themselves; then masquerade must pick another port and the punch
        # deadlocks, unless each host's first punches die between the NATs.
        self.step_direct("cone/cone (masquerade only)")
        for nm, want in (("a", None), ("b", 3)):
            m = re.findall(r"punches leave with TTL (\d+)", self.nodes[nm].proc.log_text())
            self.ok("host %s: punch TTL %s" % (nm, m[-1] if m else "2 (no router inside its site)"))
            if want and (not m or int(m[-1]) != want):
                self.fail("host %s, %d router(s) behind its NAT, did not learn punch TTL %d"
                          % (nm, want - 1, want))

    def step_cone_fw(self):
        """The routers as typical home routers: unsolicited inbound packets to
        the router itself are dropped (ct state new), which keeps a peer's early
        punch from claiming the conntrack tuple that the host's mapping needs."""
        for site in SITES:
            nsx(SITES[site][0], ["nft", "-f", "-"], input=(
                "add table ip filter\n"
                "add chain ip filter input { type filter hook input priority 0; policy accept; }\n"
                "add rule ip filter input iifname \"tnwan\" ct state new drop\n"))
        self.restart_hosts(["a", "b"], PORT + 1)
        self.wait_public([self.nodes["a"], self.nodes["b"]], 10)
        self.step_direct("cone/cone + router input firewall")

    def step_symmetric(self):
        a, b = self.nodes["a"], self.nodes["b"]
        b.proc.stop(5)
        self.set_nat("b", "masquerade random,fully-random")
        # wait until A's link to the old B is gone, so a new direct link is visible
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and direct_link(a.status(), b.address):
            time.sleep(0.5)
        gone = direct_link(a.status(), b.address) is None
        log("B stopped; NAT on tn-rb now symmetric; A's old link to B %s after %.1f s"
            % ("gone" if gone else "STILL UP", time.monotonic() - t0))
        b.port = PORT + 2       # a new flow: the old mapping's conntrack entry does not apply
        b.start()
        self.wait_status([b], 15)
        got = self.wait_public([b], 10)
        ep, nat, el, eps = got["b"]
        self.ok("symmetric: host b public endpoint %s, NAT: %s (advertises %s)" % (ep, nat, eps))
        c, el = self.wait_direct(a, b, 20, None)
        st_b = b.status()
        self.ok("symmetric: B's NAT classification after %.1f s more: %r, endpoints %s"
                    % (el, (st_b or {}).get("nat"), (st_b or {}).get("endpoints")))
        pub_addr = self.nodes["pub"].address or (self.nodes["pub"].status() or {}).get("address")
        if c and c.get("path") == "relayed":
            self.ok("symmetric: A links B through a relay after %.1f s: %s via %s"
                        % (el, c.get("uri"), c.get("relay_via_name")))
            if str(c.get("relay_via")).lower() != str(pub_addr).lower():
                self.fail("relay is %s, expected the public node %s"
                          % (c.get("relay_via"), pub_addr))
        elif c:
            self.fail("A has a direct link to B through a symmetric and a cone NAT "
                      "(port-restricted cone cannot open to an unpredictable port): uri %s"
                      % c.get("uri"))
        else:
            self.fail("no A-B link (direct or relayed) within 20 s")
            log("  A connections: %s" % conn_summary(a.status()))
            log("  B connections: %s" % conn_summary(st_b))
        # how tn-rb mapped B's listening port per destination (symmetric: differs)
        rc, out, _ = nsx(SITES["b"][0], ["cat", "/proc/net/nf_conntrack"], check_rc=False, timeout=10)
        maps = sorted(set("%s:%s->%s" % (m.group(1), m.group(2), m.group(3)) for m in re.finditer(
            r"src=10\.2\.2\.2 dst=(\S+) sport=%d dport=(\d+) .*?dst=%s sport=\d+ dport=(\d+)"
            % (b.port, re.escape(SITES["b"][2])), out or "")))
        self.ok("symmetric: %s mappings of B's :%d per destination: %s"
                    % (SITES["b"][0], b.port, ", ".join(maps) or "(none)"))
        nat = (st_b or {}).get("nat", "")
        if "symmetric" not in str(nat):
            self.ok("NOTE (ipop): B behind a symmetric NAT classifies it as %r: it has "
                        "observations from %s only" % (nat, "one peer (the public node)" if not c
                                                      else "its peers"))
        res = self.ping_both(a, b)
        for (s, d), (ok, hops, out) in res.items():
            if not ok:
                continue
            self.ok("symmetric: ipop ping %s -> %s ok, hops=%s" % (s.upper(), d.upper(), hops))
            if c and hops and max(hops) != 1:
                self.fail("%s -> %s took hops=%s over a relayed link (expected 1: "
                          "a relayed link is one overlay hop)" % (s, d, hops))


if __name__ == "__main__":
    NatTest.main()
