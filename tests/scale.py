#!/usr/bin/env python3
"""Scale test (issue 8): N ipop processes on loopback, joining, routing,
idle cost, churn and DHT survival.  `make scale` runs it with 1000 nodes;
tests/t_scale.py runs a small version as part of `make test`.

Phases (each prints what it measured; a results table and a verdict close
the run; exit status 1 when a target is missed):

 1. join     the seed, then N-1 nodes started evenly over --join-seconds,
             each bootstrapping from two random nodes started before it
             (UDP, security on: the shared --secret-file of lib.Node);
             a fraction --ip-fraction has --ip (publishes ip:X), --names
             of those also --name (publishes name:N), the rest are
             router-only.
 2. ring     time from the last start until every node's up near links hold
             its 2 true successors and 2 true predecessors (lib's rule).
             Above --full-sweep-max nodes each poll round checks a random
             sample of --sample nodes; once a sample passes, full sweeps
             decide.  A full sweep queries every node's status over its
             control socket, --pool at a time.
 3. idle     after --settle s, a --idle-seconds window with no traffic from
             the harness: VmRSS/VmHWM, CPU (utime+stime), control packets
             and bytes sent (sum of the links' tx counters) per node.
 4. routing  --pairs random (source, destination) pairs, one control-socket
             ping each (3 s timeout); success rate, mean hops, histogram
             against log2 N.
 5. dht      --dht-keys records put with a 1 h lease from random nodes
             (their owners may die later: only replication keeps them).
 6. churn    for --churn-minutes, --churn-rate of the nodes replaced per
             minute (victims alternate SIGKILL / SIGTERM; a replacement
             starts at once with new port and address).  Meanwhile pings
             run continuously between nodes that have been up at least
             --member-age s and are still alive when the ping ends (a ping
             whose end point was killed while it ran is not counted).  Every
             --dht-check-every s and at the end: every put record, the
             ip: record of a sample of live --ip nodes (owner must be that
             node) and the name: record of live named nodes (through
             `ipop resolve`), each read through a random live node, one
             retry after 2 s.
 7. after    ring consistency again, and --pairs-after pings.

Everything runs through tests/lib.py's Net, which SIGKILLs every node it
started on any exit (nodes also have PR_SET_PDEATHSIG).  Ports come from
--port-base upwards (bind-probed), away from lib.free_port's 12000-32000.
"""
import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (pct, Net, TestFailure, log, sha1_ip, true_neighbors, near_up,  # noqa: E402
                 run_cli, ipop_bin, main_wrapper, short, REPO)

CLK_TCK = os.sysconf("SC_CLK_TCK")
SETPRIV = shutil.which("setpriv")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------
# small helpers


def ctl_ask(path, line, timeout=5.0):
    """One control-socket question (the CLI's protocol: a line in, the
    answer until EOF).  Returns the answer text or None."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return None
    finally:
        s.close()


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def proc_sample(pid):
    """(monotonic time, VmRSS kB, VmHWM kB, utime+stime ticks) or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            st = f.read()
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", st).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", st).group(1))
    return time.monotonic(), rss, hwm, int(fields[11]) + int(fields[12])


def tx_map(st):
    return {(c.get("address"), c.get("uri")): (int(c.get("tx_packets", 0)), int(c.get("tx_bytes", 0)))
            for c in (st or {}).get("connections", [])}


def tx_delta(m0, m1):
    """(packets, bytes) sent between two snapshots; links that appeared count
    from 0, links that vanished are lost (rare when idle)."""
    p = b = 0
    for k, (pk, by) in m1.items():
        p0, b0 = m0.get(k, (0, 0))
        p += pk - p0 if pk >= p0 else pk
        b += by - b0 if by >= b0 else by
    return p, b


def port_free(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()


# --------------------------------------------------------------------------
# the network


class Scale:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.net = Net("scale")
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.pool)
        # DHT checks sleep between retries: their own pool, so pings never
        # wait behind them
        self.dht_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.next_port = args.port_base
        self.next_ip = 0
        self.lock = threading.Lock()
        self.results = {}        # name -> value, for the table and JSON
        self.verdicts = []       # (target, measured, ok)
        self.killed_at = {}      # node -> monotonic time of the kill
        self.unexpected = []     # nodes that exited without being killed
        self.named = 0

    # ---- nodes

    def port(self):
        while True:
            p = self.next_port
            self.next_port += 1
            if self.next_port > 60000:
                raise TestFailure("ran out of ports")
            if port_free(p):
                return p

    def add_node(self, bootstrap, with_ip=None, name=None):
        if with_ip is None:
            with_ip = self.rng.random() < self.a.ip_fraction
        ip = route = None
        if with_ip:
            # 10.200.x.y is the node's own IP; it routes for 10.220.x.y too,
            # which gives an ip: record in the DHT (its own IP needs none:
            # its ring address is SHA-1 of it)
            k = self.next_ip
            self.next_ip += 1
            ip = "10.%d.%d.%d" % (200 + k // 62500, (k // 250) % 250, 1 + k % 250)
            route = "10.%d.%d.%d" % (220 + k // 62500, (k // 250) % 250, 1 + k % 250)
        extra = ["--name", name] if (name and ip) else []
        extra += ["--route-for", route + "/32"] if route else []
        n = self.net.add(udp=self.port(), ip=ip, bootstrap=[b.udp_uri for b in bootstrap], extra=extra)
        n.vname = name if (name and ip) else None
        n.route = route
        n.t_start = float("inf")    # other threads may see it before start()
        if ip:
            n.address = sha1_ip(ip)
        return n

    def start(self, n):
        """lib's Node.start, but without preexec_fn when setpriv exists:
        CPython then starts the child with vfork instead of copying the
        harness, which is what keeps a thousand starts near schedule while
        the nodes already running load both cores.  setpriv sets the same
        PR_SET_PDEATHSIG (tied to this main thread) before it execs ipop.

        Each node then gets --node-nice: the harness stands for operators
        on other machines, so a thousand nodes on two cores must not make
        it late.  At nice 0 it started 1000 nodes in 120 s instead of 60
        and replaced 4.5 % of them per minute instead of 10 %; the nodes'
        order among themselves, and their CPU time, do not change."""
        t = time.monotonic()
        if not SETPRIV:
            n.start()
        else:
            lf = open(n.logpath, "ab")
            n.proc = subprocess.Popen([SETPRIV, "--pdeathsig", "KILL", "--"] + n.argv(),
                                      stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                      start_new_session=True)
            lf.close()
            n.started_at = t
        if self.a.node_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, n.proc.pid, self.a.node_nice)
            except OSError:
                pass
        n.t_start = t
        return n

    def kill(self, n, sig):
        self.killed_at[n] = time.monotonic()
        n.kill(sig)

    def live(self):
        return [n for n in self.net.nodes if n not in self.killed_at and n.proc is not None]

    def members(self, min_age):
        """Live nodes up at least min_age s whose address is known."""
        now = time.monotonic()
        return [n for n in self.live() if n.address and now - n.t_start >= min_age]

    def check_exits(self):
        """Note nodes that exited without being told to."""
        for n in self.live():
            if not n.alive() and n not in self.unexpected:
                self.unexpected.append(n)
                log("UNEXPECTED EXIT %s rc=%s; log tail:\n%s" % (n.desc(), n.returncode(), n.log_tail(8)))
        return self.unexpected

    # ---- status

    def status(self, n, timeout=5.0):
        out = ctl_ask(n.ctl, "status json", timeout)
        if not out:
            return None
        try:
            d = json.loads(out)
        except ValueError:
            return None
        if d.get("address"):
            n.address = str(d["address"]).lower()
        return d

    def statuses(self, nodes):
        return dict(zip(nodes, self.pool.map(self.status, nodes)))

    def ring_bad(self, nodes, check_nodes):
        """Nodes in check_nodes whose near-up set lacks a true neighbour,
        truth taken over all of nodes.  Returns (bad list, statuses, secs)."""
        t = time.monotonic()
        truth = true_neighbors([n.address for n in nodes if n.address])
        st = self.statuses(check_nodes)
        bad = [n for n in check_nodes if st[n] is None or not n.address or truth[n.address] - near_up(st[n])]
        return bad, st, time.monotonic() - t

    def wait_consistent(self, t_ref, limit, label):
        """Poll until a full sweep passes; seconds after t_ref, or None
        when limit s pass first.  Sampled rounds first for large N."""
        full = len(self.live()) <= self.a.full_sweep_max
        rounds = sweeps = 0
        sweep_s = []
        while True:
            self.check_exits()
            nodes = [n for n in self.live() if n.alive()]
            unknown = [n for n in nodes if not n.address]
            if unknown:
                self.statuses(unknown)
                nodes = [n for n in nodes if n.address]
            check_nodes = nodes if full else self.rng.sample(nodes, min(self.a.sample, len(nodes)))
            bad, st, secs = self.ring_bad(nodes, check_nodes)
            rounds += 1
            el = time.monotonic() - t_ref
            if full:
                sweeps += 1
                sweep_s.append(secs)
            if not bad and full:
                log("%s: consistent %.1fs after the reference (%d rounds, %d full sweeps of %d nodes, "
                    "median sweep %.2fs)" % (label, el, rounds, sweeps, len(nodes), pct(sweep_s, 50)))
                self.results["%s_sweep_s" % label] = round(pct(sweep_s, 50), 2)
                return el
            if not bad:
                full = True     # the sample passed: let full sweeps decide
                continue
            if rounds % 5 == 1:
                log("%s: %d/%d %s nodes not consistent (%.1fs)"
                    % (label, len(bad), len(check_nodes), "" if full else "sampled", el))
            if el > limit:
                log("%s: NOT consistent after %.1fs; %d/%d bad, e.g.:" % (label, el, len(bad), len(check_nodes)))
                truth = true_neighbors([n.address for n in nodes])
                for n in bad[:6]:
                    have = near_up(st[n]) if st[n] else None
                    log("   %s missing %s has %s" % (n.desc(), [short(x) for x in truth[n.address] - (have or set())],
                                                     [short(x) for x in have or ()]))
                return None
            time.sleep(0.5)

    # ---- pings and dht

    def ping(self, src, dst, timeout_ms=3000):
        """(ok, hops, rtt_ms, t_end)"""
        tgt = dst.ip if (dst.ip and self.rng.random() < 0.5) else dst.address
        out = ctl_ask(src.ctl, "ping %s %d" % (tgt, timeout_ms), timeout_ms / 1000.0 + 5)
        t_end = time.monotonic()
        m = re.match(r"reply (\d+) (\d+)", out or "")
        if not m:
            return False, None, None, t_end, (out or "no answer").strip()
        return True, int(m.group(1)), int(m.group(2)) / 1000.0, t_end, ""

    def ping_pairs(self, pairs):
        return list(self.pool.map(lambda p: (p[0], p[1]) + self.ping(p[0], p[1]), pairs))

    def routing(self, label, count, min_ok):
        nodes = self.members(0)
        pairs = [tuple(self.rng.sample(nodes, 2)) for _ in range(count)]
        t = time.monotonic()
        res = self.ping_pairs(pairs)
        secs = time.monotonic() - t
        ok = [r for r in res if r[2]]
        fails = [r for r in res if not r[2]]
        hops = [r[3] for r in ok]
        hist = {}
        for h in hops:
            hist[h] = hist.get(h, 0) + 1
        n = len(nodes)
        rate = len(ok) / len(res)
        log("%s: %d/%d pings ok (%.2f%%) in %.1fs; hops mean %.2f p50 %g p90 %g max %d; log2 N = %.2f"
            % (label, len(ok), len(res), 100 * rate, secs, mean(hops), pct(hops, 50), pct(hops, 90),
               max(hops) if hops else -1, math.log2(n)))
        log("%s: hop histogram %s" % (label, " ".join("%d:%d" % (h, hist[h]) for h in sorted(hist))))
        for r in fails[:8]:
            log("   FAIL ping %s -> %s: %s" % (r[0].desc(), r[1].desc(), r[6]))
        self.results[label] = {"pairs": len(res), "ok": len(ok), "rate": rate, "hops_mean": mean(hops),
                               "hops_max": max(hops) if hops else None, "hist": hist, "log2n": math.log2(n),
                               "rtt_ms_median": pct([r[4] for r in ok], 50), "n": n}
        self.verdicts.append(("%s success >= %.1f%%" % (label, 100 * min_ok), "%.2f%% (%d/%d)"
                              % (100 * rate, len(ok), len(res)), rate >= min_ok))
        return rate

    def dht_get(self, via, key, timeout=6.0):
        """(owner, value hex) or (None, the node's answer)."""
        out = ctl_ask(via.ctl, "dht get %s" % key, timeout) or "no answer"
        m = re.match(r"value (\d+) ([0-9a-f]{40}) ([0-9a-f]*)", out)
        return (m.group(2), m.group(3)) if m else (None, out.strip())

    def dht_put(self, via, key, value, ttl=3600):
        out = ctl_ask(via.ctl, "dht put %d %s %s" % (ttl, key, value.encode().hex()), 6.0) or ""
        return out.strip() == "ok"

    def dht_setup(self):
        nodes = self.members(0)
        self.dht_keys = {}
        for i in range(self.a.dht_keys):
            k, v = "scale-%d" % i, "v%d-%d" % (i, self.rng.randrange(10 ** 6))
            for _ in range(3):
                if self.dht_put(self.rng.choice(nodes), k, v):
                    self.dht_keys[k] = v
                    break
        log("dht: %d/%d records put with a 1 h lease" % (len(self.dht_keys), self.a.dht_keys))
        self.verdicts.append(("dht puts accepted", "%d/%d" % (len(self.dht_keys), self.a.dht_keys),
                              len(self.dht_keys) == self.a.dht_keys))

    def dht_check(self, label):
        """Read every put record, sampled ip: records and every live name
        through random live members; one retry after 2 s."""
        vias = self.members(self.a.member_age)
        ipn = [n for n in vias if n.ip and time.monotonic() - n.t_start >= 30]
        ipn = self.rng.sample(ipn, min(self.a.ip_checks, len(ipn)))
        names = [n for n in vias if n.vname and time.monotonic() - n.t_start >= 30]
        jobs = [("put", k, v) for k, v in self.dht_keys.items()]
        jobs += [("ip", "ip:" + n.route, n) for n in ipn] + [("name", n.vname, n) for n in names]

        def one(job):
            kind, key, want = job
            first = None
            for attempt in range(2):
                via = self.rng.choice(vias)
                if kind == "put":
                    r = self.dht_get(via, key)
                    ok = r[0] is not None and bytes.fromhex(r[1]).decode(errors="replace") == want
                elif kind == "ip":
                    r = self.dht_get(via, key)
                    ok = r[0] == want.address and r[1] == want.address
                else:
                    rc, out, err = run_cli(["resolve", "--control", via.ctl, key], timeout=10)
                    ok = rc == 0 and out.strip() == want.ip
                    r = (rc, out.strip(), err.strip()[-100:])
                if ok:
                    return kind, True, first
                if kind != "put" and want in self.killed_at:
                    return kind, None, first        # its owner left meanwhile
                first = first or str(r[-1])[:40]
                time.sleep(2)
            return kind, False, (key, r)
        res = list(self.dht_pool.map(one, jobs))
        summary = {}
        for kind in ("put", "ip", "name"):
            rs = [r for r in res if r[0] == kind and r[1] is not None]
            summary[kind] = (sum(1 for r in rs if r[1]), len(rs), sum(1 for r in rs if r[1] and r[2] is not None))
        log("%s: dht records found: put %d/%d, ip %d/%d, name %d/%d (%d needed the retry)"
            % (label, summary["put"][0], summary["put"][1], summary["ip"][0], summary["ip"][1],
               summary["name"][0], summary["name"][1], sum(v[2] for v in summary.values())))
        why = {}
        for r in res:
            if r[1] and r[2]:
                why[r[2]] = why.get(r[2], 0) + 1
        if why:
            log("%s: first answers of the retried reads: %s" % (label, why))
        for r in res:
            if r[1] is False:
                log("   MISSING %s %r" % (r[0], r[2]))
        return summary

    # ---- phases

    def join(self):
        a = self.a
        seed = self.add_node([], with_ip=True)
        seed.vname = None
        self.start(seed)
        self.net.wait_ready([seed], timeout=10)
        self.seed = seed
        started = [seed]
        names = set(self.rng.sample(range(1, a.nodes), min(a.names, a.nodes - 1)))
        gap = a.join_seconds / max(1, a.nodes - 1)
        t0 = time.monotonic()
        log("join: %d nodes over %.0fs (one every %.0f ms), %.0f%% with --ip, %d named"
            % (a.nodes, a.join_seconds, gap * 1000, 100 * a.ip_fraction, len(names)))
        for i in range(1, a.nodes):
            boot = self.rng.sample(started, min(2, len(started)))
            name = "host%d" % i if i in names else None
            n = self.add_node(boot, with_ip=True if name else None, name=name)
            self.start(n)
            started.append(n)
            if i % 100 == 0:
                self.check_exits()
                log("join: %d started (%.1fs)" % (i + 1, time.monotonic() - t0))
            delay = t0 + i * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.t_last = time.monotonic()
        self.results["join_s"] = round(self.t_last - t0, 1)
        log("join: all %d started in %.1fs" % (a.nodes, self.t_last - t0))
        el = self.wait_consistent(self.t_last, a.converge_max, "ring")
        self.results["ring_consistent_after_last_join_s"] = el
        self.verdicts.append(("ring consistent <= %ds after last join" % a.converge_limit,
                              "%.1fs" % el if el is not None else "not within %ds" % a.converge_max,
                              el is not None and el <= a.converge_limit))

    def idle(self):
        a = self.a
        time.sleep(a.settle)
        nodes = [n for n in self.live() if n.alive()]
        st0 = self.statuses(nodes)
        p0 = {n: proc_sample(n.proc.pid) for n in nodes}
        load0 = os.times()
        time.sleep(a.idle_seconds)
        p1 = {n: proc_sample(n.proc.pid) for n in nodes}
        load1 = os.times()
        st1 = self.statuses(nodes)
        rss, hwm, cpu, pps, bps, links = [], [], [], [], [], []
        for n in nodes:
            if not (p0[n] and p1[n] and st0[n] and st1[n]):
                continue
            (t0, _, _, k0), (t1, r1, h1, k1) = p0[n], p1[n]
            rss.append(r1)
            hwm.append(h1)
            cpu.append(100.0 * (k1 - k0) / CLK_TCK / (t1 - t0))
            p, b = tx_delta(tx_map(st0[n]), tx_map(st1[n]))
            pps.append(p / (t1 - t0))
            bps.append(b / (t1 - t0))
            links.append(sum(1 for c in st1[n].get("connections", []) if c.get("state") == "up"))
        harness = 100.0 * ((load1.user - load0.user) + (load1.system - load0.system)) / a.idle_seconds
        r = {"measured_nodes": len(rss),
             "rss_kb": [pct(rss, 50), pct(rss, 90), max(rss)], "hwm_kb": [pct(hwm, 50), pct(hwm, 90), max(hwm)],
             "cpu_pct": [pct(cpu, 50), pct(cpu, 90), max(cpu)], "cpu_sum_pct": sum(cpu),
             "tx_pps": [pct(pps, 50), pct(pps, 90), max(pps)], "tx_bps": [pct(bps, 50), pct(bps, 90), max(bps)],
             "links": [pct(links, 50), pct(links, 90), max(links)], "harness_cpu_pct": harness}
        self.results["idle"] = r
        log("idle %.0fs, %d nodes: VmRSS p50/p90/max %d/%d/%d kB, VmHWM max %d kB"
            % ((a.idle_seconds, len(rss)) + tuple(r["rss_kb"]) + (r["hwm_kb"][2],)))
        log("idle: CPU per node p50/p90/max %.2f/%.2f/%.2f %% of a core; all nodes %.1f %% (of 200 %%)"
            % (tuple(r["cpu_pct"]) + (r["cpu_sum_pct"],)))
        log("idle: control tx per node p50/p90/max %.1f/%.1f/%.1f pkt/s, %.0f/%.0f/%.0f B/s; "
            "up links p50/p90/max %d/%d/%d" % (tuple(r["tx_pps"]) + tuple(r["tx_bps"]) + tuple(r["links"])))
        self.verdicts.append(("idle RSS <= %d kB (max over nodes)" % a.rss_limit_kb, "%d kB" % max(rss),
                              max(rss) <= a.rss_limit_kb))
        self.verdicts.append(("idle CPU <= %.1f%% of a core (p90 over nodes)" % a.cpu_limit_pct,
                              "%.2f%%" % pct(cpu, 90), pct(cpu, 90) <= a.cpu_limit_pct))

    def churn(self):
        a = self.a
        if a.churn_minutes <= 0:
            return
        n0 = len(self.live())
        per_min = max(1, round(a.churn_rate * n0))
        interval = 60.0 / per_min
        total = int(round(a.churn_minutes * per_min))
        log("churn: %d replacements over %.1f min (%d/min, every %.2fs), half SIGKILL half SIGTERM; "
            "pings at %d/s" % (total, a.churn_minutes, per_min, interval, a.probe_rate))
        stop = threading.Event()
        samples = []          # (t_end, ok, hops)
        discarded = [0]
        fails = []

        def prober():
            try:
                probe_loop()
            except BaseException:
                import traceback
                log("prober died:\n" + traceback.format_exc())
                raise

        def probe_loop():
            rng = random.Random(self.rng.random())
            nxt = time.monotonic()
            m, m_until = [], 0
            inflight = []
            while not stop.is_set():
                nxt += 1.0 / a.probe_rate
                d = nxt - time.monotonic()
                if d > 0:
                    time.sleep(d)
                if time.monotonic() >= m_until:     # members() walks every node: once a second
                    m, m_until = self.members(a.member_age), time.monotonic() + 1
                m = [x for x in m if x not in self.killed_at]
                if len(m) < 2:
                    continue
                s, t = rng.sample(m, 2)
                inflight.append(self.pool.submit(lambda s=s, t=t: (s, t) + self.ping(s, t)))
                keep = []
                for f in inflight:
                    if not f.done():
                        keep.append(f)
                        continue
                    s_, t_, ok, hops, rtt, t_end, why = f.result()
                    if s_ in self.killed_at or t_ in self.killed_at:
                        if min(self.killed_at.get(s_, 1e18), self.killed_at.get(t_, 1e18)) <= t_end:
                            discarded[0] += 1
                            continue
                    samples.append((t_end, ok, hops))
                    if not ok:
                        fails.append((s_, t_, why, t_end))
                inflight = keep
            for f in inflight:
                s_, t_, ok, hops, rtt, t_end, why = f.result()
                if min(self.killed_at.get(s_, 1e18), self.killed_at.get(t_, 1e18)) <= t_end:
                    discarded[0] += 1
                    continue
                samples.append((t_end, ok, hops))
                if not ok:
                    fails.append((s_, t_, why, t_end))

        dht_checks = []

        def checker():
            try:
                while not stop.wait(a.dht_check_every):
                    dht_checks.append(self.dht_check("churn %.0fs" % (time.monotonic() - t0)))
            except BaseException:
                import traceback
                log("dht checker died:\n" + traceback.format_exc())
                raise

        th = threading.Thread(target=prober, daemon=True)
        th2 = threading.Thread(target=checker, daemon=True)
        t0 = time.monotonic()
        th.start()
        th2.start()
        kills = {"SIGKILL": 0, "SIGTERM": 0}
        self.sigkills = []
        next_exit_check = 0
        for i in range(total):
            when = t0 + (i + 1) * interval
            while time.monotonic() < when:
                time.sleep(min(0.2, max(0.0, when - time.monotonic())))
                self.reap()
            cands = [n for n in self.live() if n is not self.seed]
            victim = self.rng.choice(cands)
            sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
            kills[sig.name] += 1
            self.kill(victim, sig)
            if sig == signal.SIGKILL:
                self.sigkills.append(time.monotonic())
            boot = self.rng.sample(self.members(a.member_age), 2)
            name = "churn%d" % i if self.rng.random() < a.names / max(1, a.nodes) else None
            self.start(self.add_node(boot, with_ip=True if name else None, name=name))
            if time.monotonic() >= next_exit_check:     # a waitpid per node: not every time
                next_exit_check = time.monotonic() + 5
                self.check_exits()
        stop.set()
        th.join()
        th2.join()
        secs = time.monotonic() - t0
        ok = sum(1 for s in samples if s[1])
        rate = ok / len(samples) if samples else 0.0
        # success per 30 s bucket, to show whether it dips
        buckets = {}
        for t_end, good, _ in samples:
            b = int((t_end - t0) // 30)
            g, c = buckets.get(b, (0, 0))
            buckets[b] = (g + good, c + 1)
        worst = min((g / c for g, c in buckets.values() if c >= 10), default=rate)
        hops = [s[2] for s in samples if s[1]]
        log("churn: actual rate %.1f replacements/min = %.1f%% of the nodes per minute"
            % (60.0 * total / secs, 100.0 * 60.0 * total / secs / n0))
        log("churn: %d replaced (%s) in %.0fs; %d/%d pings ok (%.2f%%), worst 30 s bucket %.2f%%, "
            "%d discarded (end point killed mid-ping), hops mean %.2f"
            % (total, ", ".join("%s %d" % kv for kv in kills.items()), secs, ok, len(samples), 100 * rate,
               100 * worst, discarded[0], mean(hops)))
        log("churn: per 30 s: " + " ".join("%.1f%%/%d" % (100.0 * g / c, c) for _, (g, c) in sorted(buckets.items())))
        # a SIGKILLed node is a black hole until its neighbours notice
        # (LINK_DEAD_MS); count failures that had one within 8 s before
        near_kill = sum(1 for f in fails if any(0 <= f[3] - k <= 8 for k in self.sigkills))
        log("churn: %d of %d failed pings ended within 8 s after a SIGKILL" % (near_kill, len(fails)))
        for s_, t_, why, t_end in fails[:10]:
            log("   FAIL at %.1fs %s (age %.0fs) -> %s (age %.0fs): %s"
                % (t_end - t0, s_.desc(), t_end - s_.t_start, t_.desc(), t_end - t_.t_start, why))
        self.reap(wait=True)
        term_rc = [n.returncode() for n in self.killed_at if n.returncode() is not None]
        log("churn: killed nodes' exit statuses: %s" % {rc: term_rc.count(rc) for rc in set(term_rc)})
        final = self.dht_check("after churn")
        dht_checks.append(final)
        self.results["churn"] = {"replaced": total, "per_min": per_min, "secs": secs, "pings": len(samples),
                                 "actual_pct_per_min": 100.0 * 60.0 * total / secs / n0,
                                 "ok": ok, "rate": rate, "worst_30s": worst, "discarded": discarded[0],
                                 "hops_mean": mean(hops), "dht": dht_checks}
        # the pings must really have run all along (a stalled prober once
        # passed this with a fraction of them)
        expect = a.probe_rate * secs
        self.verdicts.append(("routing during churn >= %.0f%%" % (100 * a.churn_min_ok),
                              "%.2f%% (%d/%d)" % (100 * rate, ok, len(samples)),
                              rate >= a.churn_min_ok and len(samples) + discarded[0] >= 0.8 * expect))
        for kind in ("put", "ip", "name"):
            got = sum(c[kind][0] for c in dht_checks)
            want = sum(c[kind][1] for c in dht_checks)
            self.verdicts.append(("dht %s records survive churn (all checks)" % kind, "%d/%d" % (got, want),
                                  got == want))

    def reap(self, wait=False):
        for n in list(self.killed_at):
            if n.proc is not None and n.proc.poll() is None and wait:
                if n.wait(5) is None:
                    n.proc.kill()
                    n.wait(5)

    def after(self):
        a = self.a
        t = time.monotonic()
        el = self.wait_consistent(t, a.converge_max, "ring-after-churn")
        self.results["ring_after_churn_s"] = el
        self.verdicts.append(("ring consistent again after churn <= %ds" % a.converge_limit,
                              "%.1fs" % el if el is not None else "not within %ds" % a.converge_max,
                              el is not None and el <= a.converge_limit))
        if a.pairs_after:
            self.routing("routing-after-churn", a.pairs_after, a.min_ok)

    def run(self):
        a = self.a
        t0 = time.monotonic()
        self.join()
        self.idle()
        self.routing("routing", a.pairs, a.min_ok)
        self.dht_setup()
        self.churn()
        if a.churn_minutes > 0:
            self.after()
        self.check_exits()
        self.verdicts.append(("no unexpected node exits", "%d" % len(self.unexpected), not self.unexpected))
        self.results["total_s"] = round(time.monotonic() - t0, 1)
        return self.report()

    def report(self):
        a = self.a
        r = self.results
        print("\n==== scale results: N=%d, join %.0fs, churn %.1f min at %.0f%%/min, seed %d"
              % (a.nodes, a.join_seconds, a.churn_minutes, 100 * a.churn_rate, a.seed), flush=True)
        print("%-52s %s" % ("target", "measured"))
        bad = 0
        for what, val, ok in self.verdicts:
            print("%-52s %-28s %s" % (what, val, "ok" if ok else "MISSED"))
            bad += not ok
        idle = r.get("idle", {})
        if idle:
            print("idle control tx per node p50/p90/max: %.1f/%.1f/%.1f pkt/s, %.0f/%.0f/%.0f B/s"
                  % (tuple(idle["tx_pps"]) + tuple(idle["tx_bps"])))
            print("idle CPU all nodes together: %.1f%% of one core (machine: %d cores)"
                  % (idle["cpu_sum_pct"], os.cpu_count()))
        rt = r.get("routing")
        if rt:
            print("hops: mean %.2f (log2 N = %.2f), histogram %s"
                  % (rt["hops_mean"], rt["log2n"], " ".join("%d:%d" % (h, rt["hist"][h]) for h in sorted(rt["hist"]))))
        print("total %.0fs" % r["total_s"])
        out = a.json or os.path.join(REPO, "build", "scale", "scale-%d.json" % a.nodes)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"args": vars(a), "results": r,
                       "verdicts": [list(v) for v in self.verdicts]}, f, indent=1, default=str)
        print("raw numbers: %s" % out)
        print("VERDICT: %s (%d of %d targets missed)" % ("PASS" if not bad else "FAIL", bad, len(self.verdicts)),
              flush=True)
        return bad == 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--join-seconds", type=float, default=60)
    p.add_argument("--ip-fraction", type=float, default=0.5, help="nodes started with --ip")
    p.add_argument("--names", type=int, default=20, help="nodes started with --name")
    p.add_argument("--converge-limit", type=int, default=60, help="target: s after the last join")
    p.add_argument("--converge-max", type=int, default=180, help="give up waiting after this many s")
    p.add_argument("--full-sweep-max", type=int, default=300, help="above this, poll a sample first")
    p.add_argument("--sample", type=int, default=150, help="nodes per sampled consistency round")
    p.add_argument("--settle", type=float, default=5)
    p.add_argument("--idle-seconds", type=float, default=20)
    p.add_argument("--rss-limit-kb", type=int, default=2048)
    p.add_argument("--cpu-limit-pct", type=float, default=1.0)
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--min-ok", type=float, default=0.999, help="routing success target")
    p.add_argument("--dht-keys", type=int, default=50)
    p.add_argument("--ip-checks", type=int, default=50, help="ip: records read per DHT check")
    p.add_argument("--churn-minutes", type=float, default=5)
    p.add_argument("--churn-rate", type=float, default=0.10, help="fraction replaced per minute")
    p.add_argument("--churn-min-ok", type=float, default=0.99)
    p.add_argument("--probe-rate", type=float, default=20, help="pings per second during churn")
    p.add_argument("--member-age", type=float, default=10, help="s up before a node is pinged")
    p.add_argument("--dht-check-every", type=float, default=60)
    p.add_argument("--pairs-after", type=int, default=300)
    p.add_argument("--pool", type=int, default=16, help="parallel control-socket queries")
    p.add_argument("--node-nice", type=int, default=10,
                   help="nice value of every node, so the harness keeps its schedule (0: as the harness)")
    p.add_argument("--port-base", type=int, default=33000)
    p.add_argument("--seed", type=int, default=int(time.time() * 1000) % 1000000)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(argv=None):
    args = parse_args(argv)
    ipop_bin()
    raise_nofile()
    log("scale: %s" % " ".join("--%s=%s" % (k.replace("_", "-"), v) for k, v in sorted(vars(args).items())))
    s = Scale(args)
    ok = False
    try:
        ok = s.run()
    finally:
        s.pool.shutdown(wait=False, cancel_futures=True)
        s.dht_pool.shutdown(wait=False, cancel_futures=True)
        s.net.failed = not ok       # keeps the node logs in build/test-logs
        s.net.close()
    if not ok:
        raise TestFailure("scale targets missed")


if __name__ == "__main__":
    main_wrapper(run)
