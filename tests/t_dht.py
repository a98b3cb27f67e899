#!/usr/bin/env python3
"""DHT integration test (all traffic on 127.0.0.1).

 1. 12 router-only nodes (secret network, no --ip, so nothing else is
    published), ring formed.  put from A, get from 5 other nodes: all return
    the value.  Within 6 s exactly 3 nodes hold a record (status
    "dht_records"), and they are the 3 nodes nearest SHA-1(key) (shorter
    way round the ring).
 3. Survival (same network, still exactly one key in it): SIGKILL two of
    the three holders; within 4 s get from every survivor probed returns
    the value, and within 8 s exactly 3 live nodes hold it (the 3 nearest
    live ones) and still do 6.5 s after the kill.
 4. Graceful leave: SIGTERM the primary holder (nearest live node); get
    works at once and after 4 s; 3 holders again.
 2. create semantics: create K1 from A ok; from B -> exit 1 "exists"; from
    A again -> ok (same owner); put K1 from B -> ok; get returns B's value.
 5. TTL: put --ttl 3; get works at once; after 6 s get -> "not found".
 6. Values: a 1024-byte printable value round-trips; 1025 bytes and a key
    with a space are refused by the CLI with exit 2 and one line.
 7. Certificates: 5 nodes (10.4.0.1..5; node 5 --route-for 10.4.9.0/30
    --name five): keys "ip:X" / "name:N" accepted only from the node whose
    certificate grants them; other keys from any member.

Cases 1, 3, 4 run first, while the secret network holds only one key, so
"dht_records >= 1" identifies that key's holders.  The certificate network
forms in parallel.
Env: IPOP_TEST_VERBOSE, IPOP_KEEP_LOGS, IPOP_TEST_LOGDIR (see lib.py).
"""
import hashlib
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (Net, TestFailure, check, log, soft_check, soft_finish, SOFT_FAILS, run_cli, free_port, sha1_ip,  # noqa: E402
                 wait_ring, short, main_wrapper, ipop_bin, RING)

N = 12
RING_S = 20            # ring formation limit
SETTLE_S = 6.0         # case 1: replication settles within
SURVIVE_S = 8.0        # case 3
READ_S = 4.0           # case 3: gets right again within (LINK_QUIET_MS 1.5 s + retry 1 s + slack)
LEAVE_AFTER_S = 4.0    # case 4: second get after
LEAVE_SETTLE_S = 4.0   # case 4: extra time allowed for 3 holders (after the 4 s)
STABLE_S = 1.5         # case 3: reads and holders must stay right this long (3 DHT_MAINT_MS)
OBSERVE_S = 6.5        # case 3: watched at least this long (LINK_DEAD_MS 4 s + 1 s keepalive grid + slack)
TTL_S = 3              # case 5
TTL_CHECK_S = 6.0

failures = SOFT_FAILS     # soft_check (lib) records here


# --------------------------------------------------------------------------
# helpers


def dht(node, op, key, value=None, ttl=None, timeout=15):
    """`ipop dht OP KEY [VALUE] [--ttl S]` on node; (rc, stdout, stderr)."""
    args = ["dht", op, key]
    if value is not None:
        args.append(value)
    if ttl is not None:
        args += ["--ttl", str(ttl)]
    args += ["--control", node.ctl]
    return run_cli(args, timeout=timeout)


def fmt(r):
    rc, out, err = r
    o = out.strip()
    if len(o) > 40:
        o = o[:20] + "...(%d bytes)" % len(out)
    return "rc=%s out=%r err=%r" % (rc, o, err.strip()[-200:])


def got_value(r, value):
    rc, out, _ = r
    return rc == 0 and out == value + "\n"


def key_hash(key):
    return int(hashlib.sha1(key.encode()).hexdigest(), 16)


def dist(a_hex, h):
    d = (int(a_hex, 16) - h) % RING
    return min(d, RING - d)


def nearest(nodes, key, k=3):
    h = key_hash(key)
    return sorted(nodes, key=lambda n: dist(n.address, h))[:k]


def names(nodes):
    return ",".join(n.name for n in sorted(nodes, key=lambda n: n.idx)) or "-"


def holders(net, nodes=None):
    """(set of nodes with dht_records >= 1, {name: count}, n without status)."""
    st = net.statuses(nodes)
    hs = {n for n, s in st.items() if s and s.get("dht_records", 0) >= 1}
    counts = {n.name: s.get("dht_records") for n, s in st.items() if s and s.get("dht_records")}
    return hs, counts, sum(1 for s in st.values() if s is None)


def wait_for(pred, timeout, every=0.2):
    t = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t
        if time.monotonic() - t >= timeout:
            return None
        time.sleep(every)


def wait_holders(net, want, timeout, label):
    """Poll until exactly the nodes `want` hold records. Returns (secs or
    None, last holder set, last counts)."""
    last = [set(), {}, 0]

    def ok():
        hs, c, miss = holders(net)
        last[:] = [hs, c, miss]
        return hs == set(want)
    dt = wait_for(ok, timeout, every=0.25)
    hs, c, miss = last
    log("%s: holders %s (want %s) counts %s%s after %s"
        % (label, names(hs), names(want), c, (" (%d no status)" % miss) if miss else "",
           "%.2fs" % dt if dt is not None else "%.1fs (timeout)" % timeout))
    return dt, hs, c


def cli_ok(args, what):
    rc, out, err = run_cli(args, timeout=20)
    check(rc == 0, "%s failed rc=%s: %s" % (what, rc, (err or out).strip()[-300:]))
    return out


# --------------------------------------------------------------------------
# setup


def setup_secret(net):
    seed = net.add(udp=free_port())
    for _ in range(N - 1):
        net.add(udp=free_port(), bootstrap=[seed.udp_uri])
    return net.nodes


def setup_cert(net):
    d = net.dir
    ca = os.path.join(d, "ca")
    cli_ok(["ca", "init", "--out", ca], "ca init")
    nodes = []
    for i in range(1, 6):
        cd = os.path.join(d, "cert-n%d" % i)
        extra = ["--route-for", "10.4.9.0/30", "--name", "five"] if i == 5 else []
        cli_ok(["cert", "issue", "--ca", ca, "--ip", "10.4.0.%d" % i, "--out", cd] + extra,
               "cert issue n%d" % i)
        kw = dict(udp=free_port(), creds=["--cert-dir", cd])
        if nodes:
            kw["bootstrap"] = [nodes[0].udp_uri]
        n = net.add(**kw)
        n.vip = "10.4.0.%d" % i
        nodes.append(n)
    return nodes


def start(net, nodes):
    nodes[0].start()
    net.wait_ready(nodes[:1], timeout=10)
    for n in nodes[1:]:
        n.start()
        time.sleep(0.02)


# --------------------------------------------------------------------------
# cases 1, 3, 4: one key in the network


def case_1(net, nodes):
    log("=== case 1: put/get across 12 nodes, 3 replicas")
    st = net.statuses(nodes)
    pre = {n.name: s.get("dht_records") for n, s in st.items() if s and s.get("dht_records")}
    check(not pre, "records before any put: %s" % pre)
    key, value = "case1-key", "value-of-case-1"
    a = nodes[3]
    t = time.monotonic()
    r = dht(a, "put", key, value)
    log("put %s from %s: %s (%.3fs)" % (key, a.name, fmt(r), time.monotonic() - t))
    check(r[0] == 0 and r[1].strip() == "ok", "case 1: put failed: %s" % fmt(r))
    readers = [n for n in nodes if n is not a][:5]
    res = list(net.pool.map(lambda n: (n, time.monotonic(), dht(n, "get", key)), readers))
    good = [n for n, _, r in res if got_value(r, value)]
    for n, _, r in res:
        if not got_value(r, value):
            log("  get from %s: %s" % (n.name, fmt(r)))
    soft_check(len(good) == 5, "case 1: get from 5 other nodes returned the value: %d/5 (%s)"
               % (len(good), names(good)))
    want = nearest(nodes, key)
    dt, hs, c = wait_holders(net, want, SETTLE_S, "case 1")
    soft_check(len(hs) == 3, "case 1: exactly 3 nodes hold the record (%d: %s)" % (len(hs), names(hs)))
    soft_check(dt is not None, "case 1: holders are the 3 nodes nearest sha1(key) %s (%s)"
               % (short(hashlib.sha1(key.encode()).hexdigest()), names(want)))
    soft_check(all(v == 1 for v in c.values()), "case 1: each holder has exactly 1 record: %s" % c)
    return key, value


class Prober:
    """Background probes from t0 on: each reader starts a `dht get key`
    every `every` s (overlapping: a lost request does not delay the next
    one) and one loop polls the holder set; every result is kept with its
    start and end time (seconds since t0)."""

    def __init__(self, net, readers, key, t0, every=0.25):
        self.net, self.readers, self.key, self.t0, self.every = net, readers, key, t0, every
        self.gets = {n: [] for n in readers}      # n -> [(start, end, (rc,out,err))]
        self.polls = []                            # [(start, end, holders, counts)]
        self.stop_ev = threading.Event()
        self.workers = []
        self.threads = [threading.Thread(target=self._get_loop, args=(n,), daemon=True) for n in readers]
        self.threads.append(threading.Thread(target=self._poll_loop, daemon=True))

    def now(self):
        return time.monotonic() - self.t0

    def _one_get(self, n):
        s = self.now()
        r = dht(n, "get", self.key, timeout=8)
        self.gets[n].append((s, self.now(), r))

    def _get_loop(self, n):
        while not self.stop_ev.is_set():
            w = threading.Thread(target=self._one_get, args=(n,), daemon=True)
            w.start()
            self.workers.append(w)
            self.stop_ev.wait(self.every)

    def _poll_loop(self):
        while not self.stop_ev.is_set():
            s = self.now()
            hs, c, _ = holders(self.net)
            self.polls.append((s, self.now(), hs, c))
            self.stop_ev.wait(self.every)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(12)
        for w in list(self.workers):      # lost requests end within ~5 s
            w.join(10)

    def first_ok_get(self, n, value):
        """End time of the earliest successful get from n such that every
        get started after it succeeded too (only finished gets count);
        None if the last one failed."""
        gs = sorted(self.gets[n])
        t = None
        for i, (s, e, r) in enumerate(gs):
            if got_value(r, value) and all(got_value(x[2], value) for x in gs[i:]):
                t = e
                break
        return t

    def first_holders(self, want):
        t = None
        for s, e, hs, c in self.polls:
            if hs == set(want):
                t = e if t is None else t
            else:
                t = None
        return t

    def timeline(self, value):
        for n, gs in self.gets.items():
            parts, prev = [], None
            for s, e, r in sorted(gs):
                what = "ok" if got_value(r, value) else \
                    ("rc=%s %s" % (r[0], (r[2].strip().split(": ")[-1] or r[1].strip())[:30]))
                if what == prev and parts:
                    parts[-1][1] = e
                    parts[-1][2] += 1
                    parts[-1][4] = s
                else:
                    parts.append([s, e, 1, what, s])
                prev = what
            log("  gets from %s (by start time): %s"
                % (n.name, "; ".join("started %.2f-%.2fs: %s x%d (last ended %.2fs)" % (a, parts[j][4], w, k, b)
                                     for j, (a, b, k, w, _) in enumerate(parts))))
        parts, prev = [], None
        for s, e, hs, c in self.polls:
            what = names(hs)
            if what == prev and parts:
                parts[-1][1] = e
            else:
                parts.append([s, e, what])
            prev = what
        log("  holders: %s" % "; ".join("%.1f-%.1fs %s" % (a, b, w) for a, b, w in parts))


def run_probe(net, readers, key, value, want, t0, limit):
    """Probe until every reader's gets and the holder set are right (and
    stay right), at most `limit` s after t0. Returns (worst time or None,
    per-reader first-ok times, holders time)."""
    pr = Prober(net, readers, key, t0).start()
    deadline = t0 + limit

    def settled():
        # right, right for STABLE_S since, and watched until OBSERVE_S: the
        # links to the dead close up to ~5 s after the kill and start one
        # more round of hand-overs, whose outcome must be right too.  A
        # stray 4th copy pushed by a node not yet linked to a new
        # neighbour is released within ~1 s (PROTOCOL.md 14, RELEASE);
        # stopping 0.5 s after the first right poll failed runs whose set
        # was right and stable a second later, and missed copies that stay.
        ts = [pr.first_ok_get(n, value) for n in readers] + [pr.first_holders(want)]
        return (all(t is not None for t in ts) and pr.now() - max(ts) >= STABLE_S
                and pr.now() >= min(OBSERVE_S, limit))
    while time.monotonic() < deadline and not settled():
        time.sleep(0.1)
    time.sleep(0.5)          # a few more results: it must stay right
    pr.stop()
    pr.timeline(value)
    gt = {n.name: pr.first_ok_get(n, value) for n in readers}
    ht = pr.first_holders(want)
    ts = list(gt.values()) + [ht]
    worst = None if any(t is None for t in ts) else max(ts)
    return worst, gt, ht, pr


def case_3(net, nodes, key, value):
    log("=== case 3: SIGKILL two of the three holders")
    hs, _, _ = holders(net)
    want = nearest(net.live(), key)
    check(set(want) == hs, "case 3: holder set %s != nearest %s before the kill" % (names(hs), names(want)))
    victims = want[:2]      # the primary and the second: the third must hand over
    t = time.monotonic()
    for v in victims:
        v.kill(signal.SIGKILL)
    for v in victims:
        v.wait(5)
    live = net.live()
    survivor = want[2]
    after = nearest(live, key)
    log("killed %s (holders %s); survivor holder %s; new nearest %s"
        % (names(victims), names(want), survivor.name, names(after)))
    readers = [n for n in live if n not in want][:3] + [survivor]
    worst, gt, ht, pr = run_probe(net, readers, key, value, after, t, SURVIVE_S + 4)
    nf = sorted((s, e, n.name) for n, gs in pr.gets.items() for s, e, r in gs
                if r[0] == 1 and "not found" in r[2])
    n_all = sum(len(gs) for gs in pr.gets.values())
    n_to = sum(1 for gs in pr.gets.values() for _, _, r in gs if "timeout" in r[2])
    log("  info: %d probe gets: %d timed out, %d answered 'not found'" % (n_all, n_to, len(nf)))
    if nf:
        log("  NOTE: false 'not found' while a copy survived (holders then: %s): %s"
            % ("; ".join(sorted({names(hs) for s0, e0, hs, _ in pr.polls
                                 if any(s0 <= e and e0 >= s for s, e, _ in nf)})),
               ", ".join("%s get started %.2fs ended %.2fs" % (nm, s, e) for s, e, nm in nf)))
    log("case 3: reads ok from (s after kill) %s; holders %s right from %s"
        % ({k: (round(v, 2) if v is not None else None) for k, v in gt.items()}, names(after),
           "%.2fs" % ht if ht is not None else "never"))
    soft_check(worst is not None and worst <= SURVIVE_S,
               "case 3: within %.0fs get from %d survivors (%s) returns the value and exactly the "
               "3 nearest live nodes (%s) hold it: %s"
               % (SURVIVE_S, len(readers), names(readers), names(after),
                  "%.2fs" % worst if worst is not None else "NOT within %.0fs" % (SURVIVE_S + 4)))
    # A surviving copy must be readable once the dead links are quiet, not
    # only once they close: NEAREST routing into a quiet link lost every
    # get for 4.3-5.4 s after the kill (PROTOCOL.md 6.1).
    rt = [t for t in gt.values()]
    soft_check(all(t is not None for t in rt) and max(rt) <= READ_S,
               "case 3: within %.0fs get from every reader returns the value: %s"
               % (READ_S, {k: (round(v, 2) if v is not None else None) for k, v in gt.items()}))


def case_4(net, key, value):
    log("=== case 4: SIGTERM the primary holder")
    live = net.live()
    want = nearest(live, key)
    hs, _, _ = holders(net)
    if hs != set(want):
        log("  note: holders %s != nearest %s before the leave" % (names(hs), names(want)))
    prim = want[0]
    readers = [n for n in live if n not in want][:2]
    t = time.monotonic()
    prim.kill(signal.SIGTERM)
    res = list(net.pool.map(lambda n: dht(n, "get", key, timeout=8), readers))
    el = time.monotonic() - t
    soft_check(all(got_value(r, value) for r in res),
               "case 4: get right after SIGTERM of %s from %s: %s (done %.2fs after the signal)"
               % (prim.name, names(readers), "; ".join(fmt(r) for r in res), el))
    rc = prim.wait(5)
    log("  %s exited rc=%s %.2fs after SIGTERM" % (prim.name, rc, time.monotonic() - t))
    soft_check(rc is not None, "case 4: %s exited after SIGTERM (rc=%s)" % (prim.name, rc))
    time.sleep(max(0.0, LEAVE_AFTER_S - (time.monotonic() - t)))
    res = list(net.pool.map(lambda n: dht(n, "get", key, timeout=8), readers))
    soft_check(all(got_value(r, value) for r in res),
               "case 4: get %.1fs after SIGTERM: %s"
               % (time.monotonic() - t, "; ".join(fmt(r) for r in res)))
    after = nearest(net.live(), key)
    dt, hs, c = wait_holders(net, after, LEAVE_SETTLE_S, "case 4")
    soft_check(dt is not None, "case 4: 3 holders again (%s), the nearest live %s; %.2fs after SIGTERM"
               % (names(hs), names(after), time.monotonic() - t))


# --------------------------------------------------------------------------
# cases 2, 5, 6


def case_2(net):
    log("=== case 2: create semantics")
    live = net.live()
    a, b, c = live[0], live[1], live[2]
    k = "case2-k1"
    r = dht(a, "create", k, "from-a")
    soft_check(r[0] == 0 and r[1].strip() == "ok", "case 2: create K1 from %s: %s" % (a.name, fmt(r)))
    r = dht(b, "create", k, "from-b")
    soft_check(r[0] == 1 and "exists" in r[2] and not r[1].strip(),
               "case 2: create K1 from %s -> exit 1 'exists': %s" % (b.name, fmt(r)))
    r = dht(c, "get", k)
    soft_check(got_value(r, "from-a"), "case 2: value still A's after B's create: %s" % fmt(r))
    r = dht(a, "create", k, "from-a-2")
    soft_check(r[0] == 0 and r[1].strip() == "ok", "case 2: create K1 from %s again (same owner): %s"
               % (a.name, fmt(r)))
    r = dht(c, "get", k)
    soft_check(got_value(r, "from-a-2"), "case 2: get after A's second create returns A's new value: %s"
               % fmt(r))
    r = dht(b, "put", k, "from-b")
    soft_check(r[0] == 0 and r[1].strip() == "ok", "case 2: put K1 from %s (overwrites): %s" % (b.name, fmt(r)))
    res = list(net.pool.map(lambda n: (n, dht(n, "get", k)), [a, b, c]))
    soft_check(all(got_value(r, "from-b") for _, r in res),
               "case 2: get from %s returns B's value: %s"
               % (names([a, b, c]), "; ".join("%s %s" % (n.name, fmt(r)) for n, r in res)))
    r = dht(a, "create", k, "from-a-3")
    log("  info: create K1 from A after B's put: %s" % fmt(r))


def total_records(net):
    return sum((s or {}).get("dht_records", 0) for s in net.statuses().values())


def case_5_put(net):
    log("=== case 5: TTL")
    live = net.live()
    a, b = live[0], live[-1]
    k, v = "case5-ttl", "short-lived"
    net.ttl_base = total_records(net)
    t = time.monotonic()
    r = dht(a, "put", k, v, ttl=TTL_S)
    soft_check(r[0] == 0 and r[1].strip() == "ok", "case 5: put --ttl %d from %s: %s" % (TTL_S, a.name, fmt(r)))
    r = dht(b, "get", k)
    soft_check(got_value(r, v), "case 5: get from %s at once (%.2fs): %s" % (b.name, time.monotonic() - t, fmt(r)))
    return t, k, b


def case_5_check(net, t, k, b):
    time.sleep(max(0.0, TTL_CHECK_S - (time.monotonic() - t)))
    res = list(net.pool.map(lambda n: (n, dht(n, "get", k)), [b] + net.live()[:2]))
    soft_check(all(r[0] == 1 and "not found" in r[2] for _, r in res),
               "case 5: %.1fs after put --ttl %d: get -> exit 1 'not found': %s"
               % (time.monotonic() - t, TTL_S, "; ".join("%s %s" % (n.name, fmt(r)) for n, r in res)))
    # info: the expired copies are purged (other keys were written meanwhile)
    log("  info: records in the network: %d before the TTL put, %d now (%.1fs after it; "
        "expected %d: the TTL record's copies purged, case 6's 1024-byte record held 3 times)"
        % (net.ttl_base, total_records(net), time.monotonic() - t, net.ttl_base + 3))


def case_6(net):
    log("=== case 6: value and key limits")
    live = net.live()
    a, b = live[1], live[-2]
    v = "".join(chr(33 + (i * 7) % 94) for i in range(1024))   # printable, no spaces
    r = dht(a, "put", "case6-big", v)
    soft_check(r[0] == 0 and r[1].strip() == "ok", "case 6: put 1024-byte value: %s" % fmt(r))
    r = dht(b, "get", "case6-big")
    soft_check(got_value(r, v), "case 6: 1024-byte value round-trips (got %d bytes, rc=%s, equal=%s)"
               % (len(r[1]) - 1, r[0], r[1] == v + "\n"))
    for what, key, val in (("1025-byte value", "case6-big2", v + "x"),
                           ("key with a space", "case6 bad", "y")):
        r = dht(a, "put", key, val)
        lines = [l for l in (r[1] + r[2]).splitlines() if l.strip()]
        soft_check(r[0] == 2 and len(lines) == 1 and not r[1].strip(),
                   "case 6: %s refused by the CLI: rc=%s, %d line(s): %r"
                   % (what, r[0], len(lines), lines[:3]))
    r = dht(b, "get", "case6-big2")
    soft_check(r[0] == 1 and "not found" in r[2], "case 6: the refused 1025-byte put stored nothing: %s"
               % fmt(r))


# --------------------------------------------------------------------------
# case 7


def case_7(cnet, cn):
    log("=== case 7: certificate network key ownership")
    n1, n2, n3, n4, n5 = cn
    st = cnet.statuses(cn)
    for n in cn:
        s = st[n] or {}
        check(s.get("address") == sha1_ip(n.vip), "%s address %s != sha1(%s)"
              % (n.name, short(s.get("address")), n.vip))
    before = dht(n4, "get", "ip:10.4.0.1")
    log("  info: before: get ip:10.4.0.1 (node 1's own publication) from n4: %s" % fmt(before))

    def put(node, key, val, want_ok):
        r = dht(node, "put", key, val)
        if want_ok:
            ok = r[0] == 0 and r[1].strip() == "ok"
        else:
            ok = r[0] == 1 and "refused" in r[2] and not r[1].strip()
        soft_check(ok, "case 7: put %s %s from node %s (%s) -> %s: %s"
                   % (key, val, node.idx + 1, node.vip, "ok" if want_ok else "refused", fmt(r)))
        return r

    put(n2, "ip:10.4.0.2", "x", True)
    put(n2, "ip:10.4.0.1", "x", False)
    put(n2, "ip:10.4.9.1", "x", False)
    put(n5, "ip:10.4.9.1", "x", True)
    put(n5, "name:five", "x", True)
    put(n2, "name:five", "z", False)
    put(n3, "free-key", "y", True)
    # what readers see
    for key, want in (("ip:10.4.0.2", "x"), ("ip:10.4.9.1", "x"), ("name:five", "x"), ("free-key", "y")):
        r = dht(n1 if key != "free-key" else n4, "get", key)
        soft_check(got_value(r, want), "case 7: get %s returns %r: %s" % (key, want, fmt(r)))
    r = dht(n4, "get", "ip:10.4.0.1")
    soft_check(not got_value(r, "x"), "case 7: the refused put did not change ip:10.4.0.1: %s" % fmt(r))
    r = dht(n4, "get", "ip:10.4.9.2")
    log("  info: get ip:10.4.9.2 (inside node 5's routed /30): %s" % fmt(r))


# --------------------------------------------------------------------------


def main():
    ipop_bin()
    t0 = time.monotonic()
    log("t_dht: %s" % ipop_bin())
    with Net("t_dht-secret") as net, Net("t_dht-cert") as cnet:
        nodes = setup_secret(net)
        cn = setup_cert(cnet)
        log("certificates issued in %.2fs" % (time.monotonic() - t0))
        start(net, nodes)
        start(cnet, cn)
        net.wait_ready(nodes, timeout=15)
        cnet.wait_ready(cn, timeout=15)
        rs = wait_ring(net, nodes, timeout=RING_S, poll=0.25, label="secret ring")
        log("secret ring (%d nodes) consistent in %.1fs (%.1fs since start)"
            % (N, rs, time.monotonic() - t0))
        for n in nodes:
            check(n.address, "%s has no address" % n.name)
        key, value = case_1(net, nodes)
        case_3(net, nodes, key, value)
        case_4(net, key, value)
        net.check_alive()
        log("cases 1, 3, 4 done at %.1fs" % (time.monotonic() - t0))
        case_2(net)
        t5, k5, b5 = case_5_put(net)
        case_6(net)
        case_5_check(net, t5, k5, b5)
        net.check_alive()
        log("cases 2, 5, 6 done at %.1fs" % (time.monotonic() - t0))
        rc = wait_ring(cnet, cn, timeout=RING_S, poll=0.25, label="cert ring")
        log("cert ring consistent (%.1fs more)" % rc)
        case_7(cnet, cn)
        cnet.check_alive()
        log("case 7 done at %.1fs" % (time.monotonic() - t0))
        soft_finish(net, cnet)
    log("total %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    main_wrapper(main)
