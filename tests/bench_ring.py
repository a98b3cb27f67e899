#!/usr/bin/env python3
"""Ring overlay benchmark (issue 2): latency, convergence, idle cost.

Everything runs on 127.0.0.1 with the helpers of tests/lib.py (Net cleans
up every node it started, also on ^C / SIGTERM).

 1. RTT: baseline = plain UDP echo between two Python processes on loopback
    (200 round trips); overlay = one `ipop ping -c 200 -i 0.01` in a 2-node
    network (1 hop). The ping time is measured inside the node (request
    sent -> reply received), so the CLI/control socket is not in it.
    Repeated RUNS times, interleaved; medians of the per-run medians/p90.
 2. Convergence: N nodes (all udp, all --ip) started 20 ms apart from one
    seed; time from the first start until every node's up near links hold
    its 2 true successors and 2 true predecessors (lib.ring_check).
    RUNS runs, fresh network each; plus one run with BIG nodes.
 3. In the last N-node run, after SETTLE s: an IDLE s window with no
    traffic from the bench: VmRSS/VmHWM, CPU (utime+stime delta, % of one
    core) and control packets/s (sum of the links' tx_packets deltas) per
    node; median and max over the N nodes.
 4. Same ring afterwards: PAIRS random pairs x PING_C pings (sequential),
    RTT grouped by the hop count printed in the reply line; per-hop
    increment = least-squares slope of RTT over hops (all samples).

Env: IPOP_BENCH_RUNS (3), IPOP_BENCH_N (64), IPOP_BENCH_BIG (128; 0 skips),
     IPOP_BENCH_BIG_TIMEOUT (60), IPOP_BENCH_IDLE_S (20),
     IPOP_BENCH_SETTLE_S (10), IPOP_BENCH_PAIRS (60), IPOP_BENCH_PING_C (10),
     IPOP_BENCH_SEED, IPOP_BENCH_JSON (default build/bench/ring.json).
Exit status: 0 if everything was measured, 1 if a measurement failed.
"""
import hashlib
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (pct, Net, TestFailure, check, log, free_port, ring_check,  # noqa: E402
                 near_up, run_cli, ipop_bin, main_wrapper, REPO)

RUNS = int(os.environ.get("IPOP_BENCH_RUNS", "3"))
N = int(os.environ.get("IPOP_BENCH_N", "64"))
BIG = int(os.environ.get("IPOP_BENCH_BIG", "128"))
BIG_TIMEOUT = float(os.environ.get("IPOP_BENCH_BIG_TIMEOUT", "60"))
IDLE_S = float(os.environ.get("IPOP_BENCH_IDLE_S", "20"))
SETTLE_S = float(os.environ.get("IPOP_BENCH_SETTLE_S", "10"))
PAIRS = int(os.environ.get("IPOP_BENCH_PAIRS", "60"))
PING_C = int(os.environ.get("IPOP_BENCH_PING_C", "10"))
RTT_COUNT = 200
RTT_INTERVAL = 0.01
START_GAP = 0.02
CONVERGE_TIMEOUT = 60.0
JSON_OUT = os.environ.get("IPOP_BENCH_JSON", os.path.join(REPO, "build", "bench", "ring.json"))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PING_RE = re.compile(r"hops=(\d+) time=([0-9.]+) ms")


# --------------------------------------------------------------------------
# small stats

def median(xs):
    return pct(xs, 50)


def linfit(xs, ys):
    """Least squares y = a + b*x; returns (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, float("nan")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


# --------------------------------------------------------------------------
# 1. RTT

ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
sys.stdout.write("%d\n" % s.getsockname()[1]); sys.stdout.flush()
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""


class EchoServer:
    """Plain UDP echo in its own Python process (no GIL sharing with the
    client)."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", ECHO_SERVER],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.port = int(self.p.stdout.readline())
        return self

    def __exit__(self, *a):
        self.p.kill()
        self.p.wait(5)
        self.p.stdout.close()
        return False


def udp_echo_rtts(port, count=RTT_COUNT, interval=RTT_INTERVAL, size=64):
    """count round trips to the echo server, interval apart (like ping).
    Returns RTTs in ms."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(("127.0.0.1", port))
    payload = b"x" * size
    out = []
    for i in range(count + 5):
        t = time.perf_counter_ns()
        s.send(payload)
        s.recv(2048)
        dt = (time.perf_counter_ns() - t) / 1e6
        if i >= 5:  # warm-up
            out.append(dt)
        time.sleep(interval)
    s.close()
    return out


def parse_ping(out):
    """[(hops, ms)] from `ipop ping` output."""
    return [(int(h), float(t)) for h, t in PING_RE.findall(out)]


def overlay_ping(node, target, count, interval=RTT_INTERVAL, wait=2):
    rc, out, err = run_cli(["ping", "--control", node.ctl, target, "-c", str(count),
                            "-i", str(interval), "-W", str(wait)],
                           timeout=count * (interval + wait) + 15)
    return rc, parse_ping(out), (out + err)


def bench_rtt():
    log("== 1. RTT: Python UDP echo baseline vs 2-node overlay ping, %d runs x %d"
        % (RUNS, RTT_COUNT))
    runs = []
    with Net("bench_rtt") as net, EchoServer() as echo:
        a = net.add(udp=free_port(), ip="10.1.0.1")
        b = net.add(udp=free_port(), ip="10.1.0.2", bootstrap=[a.udp_uri])
        a.start()
        net.wait_ready([a])
        b.start()
        net.wait_ready()
        # wait for the link and let the handshake settle
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            if b.status() and sha_of(b) in near_up(a.status()):
                break
            time.sleep(0.1)
        time.sleep(1)
        overlay_ping(a, b.ip, 10)  # warm-up
        for r in range(RUNS):
            base = udp_echo_rtts(echo.port)
            rc, samples, out = overlay_ping(a, b.ip, RTT_COUNT)
            check(rc == 0 and len(samples) >= RTT_COUNT * 0.95,
                  "2-node ping run %d: rc=%s, %d replies: %s" % (r, rc, len(samples), out[-300:]))
            ov = [t for _, t in samples]
            hops = sorted(set(h for h, _ in samples))
            runs.append({"base_med": median(base), "base_p90": pct(base, 90),
                         "ov_med": median(ov), "ov_p90": pct(ov, 90), "hops": hops,
                         "replies": len(samples)})
            log("  run %d: udp echo median %.3f p90 %.3f ms | overlay median %.3f p90 %.3f ms "
                "(%d replies, hops %s)" % (r + 1, median(base), pct(base, 90), median(ov),
                                           pct(ov, 90), len(samples), hops))
        net.check_alive()
    res = {k: median([r[k] for r in runs]) for k in ("base_med", "base_p90", "ov_med", "ov_p90")}
    res["runs"] = runs
    return res


def sha_of(node):
    return hashlib.sha1(socket.inet_aton(node.ip)).hexdigest()


# --------------------------------------------------------------------------
# 2. convergence

def ip_for(i):
    return "10.1.%d.%d" % (i // 200, 10 + i % 200)


def start_ring(name, n):
    """Start n udp nodes (all --ip) 20 ms apart from one seed. Returns
    (net, t_first_start, t_all_started); the caller closes net."""
    net = Net(name)
    seed = net.add(udp=free_port(), ip=ip_for(0))
    for i in range(1, n):
        net.add(udp=free_port(), ip=ip_for(i), bootstrap=[seed.udp_uri])
    for nd in net.nodes:
        nd.address = sha_of(nd)  # --ip nodes: ring address = SHA-1(ip)
    t_start = time.monotonic()
    seed.start()
    net.wait_ready([seed], timeout=10)
    for nd in net.nodes[1:]:
        nd.start()
        time.sleep(START_GAP)
    return net, t_start, time.monotonic()


def wait_consistent(net, t_start, timeout):
    """Poll ring_check back to back. Returns (secs since first start at the
    end of the first passing round, that round's duration) or (None, bad)."""
    while True:
        net.check_alive()
        r0 = time.monotonic()
        bad, _ = ring_check(net, net.nodes)
        r1 = time.monotonic()
        if not bad:
            return r1 - t_start, r1 - r0
        if r1 - t_start > timeout:
            return None, len(bad)
        time.sleep(0.05)


def converge_run(name, n, timeout, keep=False):
    net, t_start, t_all = start_ring(name, n)
    try:
        secs, x = wait_consistent(net, t_start, timeout)
        after_last = None if secs is None else secs - (t_all - t_start)
        if secs is None:
            log("  %s: NOT consistent after %.0fs (%d/%d nodes wrong)" % (name, timeout, x, n))
        else:
            log("  %s: %d nodes started in %.2fs; ring consistent %.2fs after first start, "
                "%.2fs after last start (poll round %.2fs)"
                % (name, n, t_all - t_start, secs, after_last, x))
        if not keep:
            net.close()
            return secs, after_last, x, None
        return secs, after_last, x, net
    except BaseException:
        net.failed = True
        net.close()
        raise


# --------------------------------------------------------------------------
# 3. idle cost

def proc_sample(pid):
    with open("/proc/%d/status" % pid) as f:
        st = f.read()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", st).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", st).group(1))
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return time.monotonic(), rss, hwm, ticks


def tx_map(st):
    return {(c.get("address"), c.get("uri")): int(c.get("tx_packets", 0))
            for c in (st or {}).get("connections", [])}


def tx_delta(m0, m1):
    """Packets sent between two status snapshots; links that appeared count
    from 0, links that vanished are lost (rare in an idle ring)."""
    return sum(v - m0.get(k, 0) if v >= m0.get(k, 0) else v for k, v in m1.items())


def bench_idle(net):
    log("== 3. idle window: settle %.0fs, then %.0fs without bench traffic" % (SETTLE_S, IDLE_S))
    time.sleep(SETTLE_S)
    nodes = net.nodes
    st0 = net.statuses(nodes)
    p0 = {nd: proc_sample(nd.proc.pid) for nd in nodes}
    time.sleep(IDLE_S)
    p1 = {nd: proc_sample(nd.proc.pid) for nd in nodes}
    st1 = net.statuses(nodes)
    net.check_alive()
    check(all(st0[nd] and st1[nd] for nd in nodes), "status failed around the idle window")
    rss, hwm, cpu, pps = [], [], [], []
    for nd in nodes:
        (t0, _, _, k0), (t1, r1, h1, k1) = p0[nd], p1[nd]
        rss.append(r1)
        hwm.append(h1)
        cpu.append(100.0 * (k1 - k0) / CLK_TCK / (t1 - t0))
        pps.append(tx_delta(tx_map(st0[nd]), tx_map(st1[nd])) / (t1 - t0))
    nconn = [len(s.get("connections", [])) for s in st1.values()]
    bad, _ = ring_check(net, nodes)
    res = {"rss_kb": (median(rss), max(rss)), "hwm_kb": (median(hwm), max(hwm)),
           "cpu_pct": (median(cpu), max(cpu)), "tx_pps": (median(pps), max(pps)),
           "links": (median(nconn), max(nconn)), "consistent_after": not bad,
           "cpu_sum_pct": sum(cpu)}
    log("  VmRSS median %d max %d kB; VmHWM median %d max %d kB" % (res["rss_kb"] + res["hwm_kb"]))
    log("  CPU median %.2f%% max %.2f%% of one core (all %d nodes together %.1f%%)"
        % (res["cpu_pct"] + (len(nodes), sum(cpu))))
    log("  tx packets/s median %.1f max %.1f; links per node median %d max %d; ring still "
        "consistent: %s" % (res["tx_pps"] + res["links"] + (not bad,)))
    return res


# --------------------------------------------------------------------------
# 4. RTT vs hops in the ring

def bench_hops(net, rng):
    log("== 4. RTT vs hops: %d random pairs x %d pings in the %d-node ring"
        % (PAIRS, PING_C, len(net.nodes)))
    by_hops = {}
    fails = 0
    for _ in range(PAIRS):
        a, b = rng.sample(net.nodes, 2)
        rc, samples, out = overlay_ping(a, b.ip, PING_C)
        if rc != 0 or not samples:
            fails += 1
            log("  ping %s -> %s failed rc=%s: %s" % (a.name, b.ip, rc, out[-200:]))
        for h, t in samples:
            by_hops.setdefault(h, []).append(t)
    net.check_alive()
    xs = [h for h, ts in by_hops.items() for _ in ts]
    ys = [t for h, ts in by_hops.items() for t in ts]
    check(xs, "no ping replies in the ring")
    a0, slope = linfit(xs, ys)
    # robust variant: fit through the per-hop-count medians
    hs = sorted(by_hops)
    am, slope_med = linfit(hs, [median(by_hops[h]) for h in hs]) if len(hs) > 1 else (0, float("nan"))
    for h in hs:
        log("  hops=%d: %4d samples, median %.3f ms, p90 %.3f ms"
            % (h, len(by_hops[h]), median(by_hops[h]), pct(by_hops[h], 90)))
    log("  fit all samples: %.3f ms + %.3f ms/hop; fit of medians: %.3f ms + %.3f ms/hop; "
        "%d/%d pairs failed" % (a0, slope, am, slope_med, fails, PAIRS))
    return {"by_hops": {h: (len(by_hops[h]), median(by_hops[h]), pct(by_hops[h], 90)) for h in hs},
            "slope": slope, "intercept": a0, "slope_med": slope_med, "intercept_med": am,
            "fails": fails}


# --------------------------------------------------------------------------

def machine_note():
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except Exception:
        model = "?"
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "ipop.c"],
                               capture_output=True, text=True).stdout.strip()
        rev += " (ipop.c modified)" if dirty else ""
    except Exception:
        rev = "?"
    with open(ipop_bin(), "rb") as f:
        bsum = hashlib.sha1(f.read()).hexdigest()[:12]
    return "%d CPUs (%s), %s %s, python %s, git %s, ipop sha1 %s" % (
        os.cpu_count(), model, platform.system(), platform.release(),
        platform.python_version(), rev, bsum)


def main():
    ipop_bin()
    seed = int(os.environ.get("IPOP_BENCH_SEED", str(int(time.time() * 1000) % 1000000)))
    rng = random.Random(seed)
    note = machine_note()
    log("bench_ring: N=%d runs=%d big=%d seed=%d" % (N, RUNS, BIG, seed))
    log("machine: %s" % note)
    t_total = time.monotonic()
    failed = []

    rtt = bench_rtt()

    log("== 2. convergence: %d nodes, started %d ms apart from one seed, %d runs"
        % (N, START_GAP * 1000, RUNS))
    conv, conv_last, rounds, idle, hops = [], [], [], None, None
    for r in range(RUNS):
        last = r == RUNS - 1
        secs, after_last, x, net = converge_run("bench_ring%d" % r, N, CONVERGE_TIMEOUT, keep=last)
        if secs is None:
            failed.append("%d-node run %d did not converge" % (N, r + 1))
        else:
            conv.append(secs)
            conv_last.append(after_last)
            rounds.append(x)
        if net is not None:
            try:
                if secs is not None:
                    idle = bench_idle(net)
                    hops = bench_hops(net, rng)
            finally:
                net.close()
    big = None
    if BIG > 0:
        log("== 2b. convergence: %d nodes, once (timeout %.0fs)" % (BIG, BIG_TIMEOUT))
        secs, after_last, x, _ = converge_run("bench_ring_big", BIG, BIG_TIMEOUT)
        big = (secs, after_last, x)
        if secs is None:
            failed.append("%d-node run did not converge within %.0fs" % (BIG, BIG_TIMEOUT))

    # ---------------------------------------------------------------- table
    rows = []
    rows.append(("RTT loopback UDP echo (Python, baseline)", "median / p90",
                 "%.3f / %.3f ms" % (rtt["base_med"], rtt["base_p90"])))
    rows.append(("RTT overlay ping, 2 nodes (1 hop)", "median / p90",
                 "%.3f / %.3f ms" % (rtt["ov_med"], rtt["ov_p90"])))
    rows.append(("  ratio overlay / baseline", "median",
                 "%.2fx" % (rtt["ov_med"] / rtt["base_med"])))
    if hops:
        for h, (cnt, md, p90) in sorted(hops["by_hops"].items()):
            rows.append(("RTT in %d-node ring, hops=%d" % (N, h), "median / p90 (n=%d)" % cnt,
                         "%.3f / %.3f ms" % (md, p90)))
        rows.append(("  per-hop increment (LSQ all samples)", "slope",
                     "%.3f ms/hop" % hops["slope"]))
        rows.append(("  per-hop increment (fit of medians)", "slope",
                     "%.3f ms/hop" % hops["slope_med"]))
    if conv:
        rows.append(("Ring consistent, %d nodes (from 1st start)" % N,
                     "median (min..max, %d runs)" % len(conv),
                     "%.2f s (%.2f..%.2f)" % (median(conv), min(conv), max(conv))))
        rows.append(("  same, from last node's start", "median (min..max)",
                     "%.2f s (%.2f..%.2f)" % (median(conv_last), min(conv_last), max(conv_last))))
        rows.append(("  status poll round (resolution)", "median", "%.2f s" % median(rounds)))
    if big is not None:
        rows.append(("Ring consistent, %d nodes (from 1st start)" % BIG, "1 run",
                     ("%.2f s (%.2f s after last start)" % big[:2]) if big[0] is not None
                     else "not within %.0f s" % BIG_TIMEOUT))
    if idle:
        rows.append(("Idle VmRSS per node (%d-node ring)" % N, "median / max",
                     "%d / %d kB" % idle["rss_kb"]))
        rows.append(("Idle VmHWM per node", "median / max", "%d / %d kB" % idle["hwm_kb"]))
        rows.append(("Idle CPU per node (%.0f s window)" % IDLE_S, "median / max",
                     "%.2f / %.2f %% of a core" % idle["cpu_pct"]))
        rows.append(("Idle control traffic per node (tx)", "median / max",
                     "%.1f / %.1f pkt/s" % idle["tx_pps"]))
        rows.append(("Links per node (any role)", "median / max", "%d / %d" % idle["links"]))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    print("\nRESULTS (%s)\nmachine: %s\n" % (time.strftime("%Y-%m-%d %H:%M"), note))
    print("| %-*s | %-*s | %-*s |" % (w0, "metric", w1, "stat", w2, "value"))
    print("|-%s-|-%s-|-%s-|" % ("-" * w0, "-" * w1, "-" * w2))
    for a, b, c in rows:
        print("| %-*s | %-*s | %-*s |" % (w0, a, w1, b, w2, c))
    print(flush=True)

    try:
        os.makedirs(os.path.dirname(JSON_OUT), exist_ok=True)
        with open(JSON_OUT, "w") as f:
            json.dump({"machine": note, "seed": seed, "n": N, "runs": RUNS, "rtt": rtt,
                       "converge_s": conv, "converge_after_last_s": conv_last, "poll_round_s": rounds, "big": [BIG, big],
                       "idle": idle, "hops": hops, "failed": failed}, f, indent=1, default=str)
        log("raw numbers in %s" % JSON_OUT)
    except OSError as e:
        log("could not write %s: %r" % (JSON_OUT, e))
    log("bench total %.1fs" % (time.monotonic() - t_total))
    if failed:
        raise TestFailure("; ".join(failed))


if __name__ == "__main__":
    main_wrapper(main)
