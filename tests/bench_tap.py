#!/usr/bin/env python3
"""Data-plane benchmark (tap mode, issue 4; security on vs off, issue 3).

Needs root (network namespaces, tap devices) and iperf3.

Layout (every name starts with "tb"; leftovers are removed at start, and
everything is removed on exit, failure, SIGINT, SIGTERM or SIGHUP):
namespace tb-sw holds bridge tbbr0; host namespaces tb-h1 / tb-h2 each get a
veth "eth0" (peer tbpN on the bridge) with 192.168.93.N/24.  The root
namespace is not touched.

Paths, each measured RUNS times; the rounds are interleaved (round r runs
every path once, starting at a different path each round):
  veth          plain veth + bridge, 192.168.93.1 -> 192.168.93.2 (baseline)
  udp-secure    ipop over udp, --secret-file (authenticated + encrypted)
  udp-insecure  ipop over udp, --insecure on both nodes
  tcp-secure    ipop over tcp, --secret-file
  udp-chacha    udp-secure with IPOP_CIPHER=chacha20-poly1305 on both nodes
                (records sealed with ChaCha20-Poly1305 instead of AEGIS-256)
  udp-gcm       udp-secure with IPOP_CIPHER=aes-256-gcm (AES-256-GCM, the
                record cipher before AEGIS-256)
The nodes run a copy of ./ipop taken at start (its sha1 goes to the JSON),
so a rebuild during the run does not mix binaries.
For an ipop path h1 runs `ipop up --ip 10.128.0.1/16 --mode tap --listen
URI` and h2 `--ip 10.128.0.2/16 --bootstrap URI`; the traffic goes between
the virtual IPs through the tap devices.  Fresh nodes every round.

Per path and round:
  setup    (ipop only) clock starts just before h2's node is started and
           stops when `ipop ping -c 1 -W 1 10.128.0.1 --control H2SOCK`
           first succeeds (polled back to back, 5 ms apart)
  ping     kernel ping h1 -> h2: 200 pings, -i 0.01; the "avg" of the
           summary line, and the median of the 200 per-packet times
  oping    (ipop only) `ipop ping -c 50 -i 0.02` h2 -> h1 (overlay echo, 1
           hop, timed inside the node); median of the "time=" fields
  iperf1   iperf3 TCP h1 -> h2, 1 stream, T s; received bits/s.  During it,
           CPU of both ipop processes (utime+stime from /proc/PID/stat,
           before/after), reported as CPU-seconds per GB received and as %
           of one core; also the whole machine's busy share (/proc/stat)
  iperf4   the same with -P 4 (no CPU sampling)
The table shows, per metric, the median over the rounds (min-max in
brackets) and ratios of medians: to plain veth, and udp secure/insecure.

Env: IPOP_BENCH_RUNS (3), IPOP_BENCH_IPERF_S (5), IPOP_BENCH_PINGS (200),
     IPOP_BENCH_OPINGS (50), IPOP_BENCH_PATHS (comma list, default all),
     IPOP_BENCH_JSON (default build/bench/tap.json).
Exit status: 0 if everything was measured, 1 if a measurement failed,
2 if not root / iperf3 missing.
"""
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402  (nodes' state (remembered peers) not in ~)
from lib import (REPO, TestFailure as BenchError, log, sh, nsx, list_netns, ns_add,  # noqa: E402
                 bridge_add, veth_to_bridge)
IPOP_SRC = os.path.join(REPO, "ipop")
IPOP = IPOP_SRC  # main() points this at a private copy: one binary per run

PREFIX = "tb"
SW = "tb-sw"
BR = "tbbr0"
HOSTS = ("tb-h1", "tb-h2")
UNDERLAY = "192.168.93.%d"
VIP = "10.128.0.%d"
BASE_PORT = 4000
IPERF_PORT = 5201

RUNS = int(os.environ.get("IPOP_BENCH_RUNS", "3"))
IPERF_S = int(os.environ.get("IPOP_BENCH_IPERF_S", "5"))
PINGS = int(os.environ.get("IPOP_BENCH_PINGS", "200"))
OPINGS = int(os.environ.get("IPOP_BENCH_OPINGS", "50"))
ALL_PATHS = ["veth", "udp-secure", "udp-insecure", "tcp-secure", "udp-chacha", "udp-gcm"]
PATHS = [p for p in os.environ.get("IPOP_BENCH_PATHS", ",".join(ALL_PATHS)).split(",") if p]
JSON_OUT = os.environ.get("IPOP_BENCH_JSON", os.path.join(REPO, "build", "bench", "tap.json"))
PIDFILE = os.path.join(REPO, "build", "bench", "tap.pids")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PING_RTT_RE = re.compile(r"= ([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+) ms")
PING_LOSS_RE = re.compile(r"([0-9.]+)% packet loss")
OPING_RE = re.compile(r"time=([0-9.]+) ms")



# --------------------------------------------------------------------------
# processes: only what this script started is ever signalled

def proc_starttime(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def proc_cpu_s(pid):
    """utime+stime of the whole process, seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc(lib.Proc):
    """A long-running child (lib.Proc).  Each pid is also written to PIDFILE
    with its start time, so a later run can remove exactly our leftovers."""
    live = []

    def __init__(self, name, argv, logpath, env=None):
        lib.Proc.__init__(self, name, argv, logpath, env)
        Proc.live.append(self)
        _pidfile_write()

    def stop(self, timeout=5):
        """SIGTERM (graceful leave), then SIGKILL."""
        lib.Proc.stop(self, timeout)
        if self in Proc.live:
            Proc.live.remove(self)
        _pidfile_write()


def _pidfile_write():
    try:
        os.makedirs(os.path.dirname(PIDFILE), exist_ok=True)
        with open(PIDFILE, "w") as f:
            for p in Proc.live:
                f.write("%d %s\n" % (p.pid, proc_starttime(p.pid)))
    except OSError:
        pass


def kill_leftover_pids():
    """SIGKILL processes a previous (killed) run of this script recorded,
    if the pid still names the same process (same start time)."""
    try:
        with open(PIDFILE) as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError:
        return
    for row in rows:
        if len(row) != 2:
            continue
        pid = int(row[0])
        if proc_starttime(pid) == row[1]:
            log("cleanup: killing leftover pid %d from an earlier run" % pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    os.unlink(PIDFILE)


# --------------------------------------------------------------------------
# namespaces

def remove_tb_netns():
    for nm in list_netns(PREFIX):
        rc, out, _ = sh(["ip", "netns", "pids", nm], check_rc=False, timeout=10)
        if out.split():
            log("cleanup: namespace %s still has pids %s (not ours: left alone)"
                % (nm, " ".join(out.split())))
        rc, _, err = sh(["ip", "netns", "del", nm], check_rc=False, timeout=10)
        if rc != 0:
            log("cleanup: ip netns del %s: %s" % (nm, err.strip()))


def setup_underlay():
    ns_add(SW)
    bridge_add(SW, BR)
    for i, ns in enumerate(HOSTS, 1):
        ns_add(ns)
        veth_to_bridge(SW, BR, ns, "eth0", "tbp%d" % i, UNDERLAY % i + "/24")
    rc, out, _ = nsx(HOSTS[0], ["ping", "-n", "-c", "1", "-W", "2", UNDERLAY % 2], check_rc=False)
    if rc != 0:
        raise BenchError("underlay ping h1 -> h2 failed: %s" % out.strip())


# --------------------------------------------------------------------------
# measurements

def kernel_ping(dst):
    """PINGS pings h1 -> dst, -i 0.01; {avg_ms, min_ms, max_ms, mdev_ms, loss_pct}
    from the summary line, median_ms of the per-packet times."""
    rc, out, err = nsx(HOSTS[0], ["ping", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "1",
                                  dst], timeout=PINGS * 0.05 + 20, check_rc=False)
    m = PING_RTT_RE.search(out)
    loss = PING_LOSS_RE.search(out)
    if not m:
        raise BenchError("ping %s: no rtt line (rc=%s): %s" % (dst, rc, (out + err).strip()[-200:]))
    mn, avg, mx, mdev = (float(x) for x in m.groups())
    each = [float(x) for x in OPING_RE.findall(out)]
    return {"avg_ms": avg, "min_ms": mn, "max_ms": mx, "mdev_ms": mdev,
            "median_ms": median(each), "n": len(each),
            "loss_pct": float(loss.group(1)) if loss else None}


def system_cpu():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def wait_listen(ns, port, timeout=10):
    return lib.wait_listen(ns, ":%d " % port, timeout)


def iperf(dst, streams, tmp, cpu_pids=()):
    """iperf3 TCP h1 -> dst for IPERF_S seconds against a one-off server in
    h2.  Returns a dict: gbps, bytes, retransmits, and (with cpu_pids) cpu_s,
    wall_s."""
    srv = Proc("iperf3-server", ["ip", "netns", "exec", HOSTS[1], "iperf3", "-s", "-1",
                                 "-p", str(IPERF_PORT)], os.path.join(tmp, "iperf3-server.log"))
    try:
        if not wait_listen(HOSTS[1], IPERF_PORT):
            raise BenchError("iperf3 server not listening")
        cpu0 = [proc_cpu_s(p) for p in cpu_pids]
        sys0 = system_cpu()
        t0 = time.monotonic()
        rc, out, err = nsx(HOSTS[0], ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t",
                                      str(IPERF_S), "-P", str(streams), "-J"],
                           timeout=IPERF_S + 30, check_rc=False)
        wall = time.monotonic() - t0
        cpu1 = [proc_cpu_s(p) for p in cpu_pids]
        sys1 = system_cpu()
        try:
            d = json.loads(out)
            end = d["end"]
            res = {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                   "bytes": end["sum_received"]["bytes"],
                   "retransmits": end["sum_sent"].get("retransmits"),
                   "iperf3_cpu": end.get("cpu_utilization_percent"),
                   "machine_busy_pct": 100.0 * (sys1[0] - sys0[0]) / max(1, sys1[1] - sys0[1])}
        except (ValueError, KeyError, TypeError):
            raise BenchError("iperf3 -> %s -P %d failed (rc=%s): %s"
                             % (dst, streams, rc, (out + err).strip()[-300:]))
        if cpu_pids:
            res["cpu_s"] = sum(b - a for a, b in zip(cpu0, cpu1))
            res["wall_s"] = wall
            res["cpu_s_per_gb"] = res["cpu_s"] / (res["bytes"] / 1e9) if res["bytes"] else None
            res["cpu_pct_core"] = 100.0 * res["cpu_s"] / wall
        return res
    finally:
        srv.stop(timeout=3)


class Overlay:
    """Two ipop nodes in tap mode, h1 listening, h2 bootstrapping from it."""

    def __init__(self, tmp, key, transport, secure, port, env=None):
        self.env = env
        self.tmp = tmp
        self.key = key
        self.transport = transport
        self.secure = secure
        self.port = port
        self.nodes = []
        self.ctl = [os.path.join(tmp, "h%d-%d.sock" % (i, port)) for i in (1, 2)]

    def start_node(self, i):
        uri = "%s://%s:%d" % (self.transport, UNDERLAY % i, self.port)
        a = ["ip", "netns", "exec", HOSTS[i - 1], IPOP, "up", "--ip", VIP % i + "/16",
             "--mode", "tap", "--listen", uri, "--control", self.ctl[i - 1]]
        a += ["--secret-file", self.key] if self.secure else ["--insecure"]
        if i == 2:
            a += ["--bootstrap", "%s://%s:%d" % (self.transport, UNDERLAY % 1, self.port)]
        p = Proc("h%d" % i, a, os.path.join(self.tmp, "h%d-%d.log" % (i, self.port)), self.env)
        self.nodes.append(p)
        return p

    def ipop_ping(self, count, interval=None, wait=1, timeout=None):
        a = [IPOP, "ping", "-c", str(count), "-W", str(wait), VIP % 1, "--control", self.ctl[1]]
        if interval is not None:
            a[2:2] = ["-i", str(interval)]
        return sh(a, timeout=timeout or count * (wait + 1) + 10, check_rc=False)

    def up(self):
        """Start both nodes; returns the setup time of h2 (s)."""
        h1 = self.start_node(1)
        t0 = time.monotonic()
        while sh([IPOP, "status", "--control", self.ctl[0]], check_rc=False, timeout=5)[0] != 0:
            if not h1.alive() or time.monotonic() - t0 > 10:
                raise BenchError("h1 not answering status:\n" + h1.log_tail())
            time.sleep(0.02)
        t0 = time.monotonic()
        h2 = self.start_node(2)
        while True:
            rc, out, err = self.ipop_ping(1, wait=1, timeout=5)
            if rc == 0:
                setup = time.monotonic() - t0
                break
            if not h2.alive() or time.monotonic() - t0 > 20:
                raise BenchError("h2: no overlay ping within 20 s (%s):\n%s"
                                 % ((out + err).strip()[-200:], h2.log_tail()))
            time.sleep(0.005)
        # kernel path through the taps (ARP is answered by the node)
        t1 = time.monotonic()
        while nsx(HOSTS[0], ["ping", "-n", "-c", "1", "-W", "1", VIP % 2],
                  check_rc=False, timeout=5)[0] != 0:
            if time.monotonic() - t1 > 10:
                raise BenchError("no kernel ping over the taps within 10 s")
        return setup

    def pids(self):
        return [p.pid for p in self.nodes]

    def check_alive(self):
        for p in self.nodes:
            if not p.alive():
                raise BenchError("%s exited rc=%s:\n%s" % (p.name, p.p.poll(), p.log_tail()))

    def down(self):
        for p in reversed(self.nodes):
            p.stop()
        self.nodes = []


def measure_path(path, tmp, key, port):
    """One round of one path: a dict of raw numbers."""
    r = {}
    if path == "veth":
        dst = UNDERLAY % 2
        r["ping"] = kernel_ping(dst)
        r["iperf1"] = iperf(dst, 1, tmp)
        r["iperf4"] = iperf(dst, 4, tmp)
        return r
    transport, mode = path.split("-")
    if mode in ("chacha", "gcm"):
        cipher = {"chacha": "chacha20-poly1305", "gcm": "aes-256-gcm"}[mode]
        ov = Overlay(tmp, key, transport, True, port, {"IPOP_CIPHER": cipher})
    else:
        ov = Overlay(tmp, key, transport, mode == "secure", port)
    try:
        r["setup_s"] = ov.up()
        time.sleep(0.3)
        dst = VIP % 2
        r["ping"] = kernel_ping(dst)
        rc, out, err = ov.ipop_ping(OPINGS, interval=0.02, wait=1)
        ts = [float(x) for x in OPING_RE.findall(out)]
        if not ts:
            raise BenchError("ipop ping: no replies (rc=%s): %s" % (rc, (out + err).strip()[-200:]))
        r["oping_median_ms"] = median(ts)
        r["oping_n"] = len(ts)
        r["iperf1"] = iperf(dst, 1, tmp, cpu_pids=ov.pids())
        r["iperf4"] = iperf(dst, 4, tmp)
        ov.check_alive()
    finally:
        ov.down()
    return r


# --------------------------------------------------------------------------
# stats and the table

def median(xs):
    s = sorted(xs)
    if not s:
        return None
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


METRICS = [
    # key, label, getter, format
    ("tput1", "iperf3 TCP, 1 stream (Gbit/s)", lambda r: r["iperf1"]["gbps"], "%.3f"),
    ("tput4", "iperf3 TCP, 4 streams (Gbit/s)", lambda r: r["iperf4"]["gbps"], "%.3f"),
    ("ping", "kernel ping avg, %d x 10 ms (ms)" % PINGS, lambda r: r["ping"]["avg_ms"], "%.3f"),
    ("ping_med", "kernel ping, median of the %d (ms)" % PINGS,
     lambda r: r["ping"]["median_ms"], "%.3f"),
    ("cpu_gb", "ipop CPU per GB, 1 stream (CPU-s/GB)", lambda r: r["iperf1"]["cpu_s_per_gb"], "%.2f"),
    ("cpu_pct", "ipop CPU during 1 stream (% of a core, 2 nodes)",
     lambda r: r["iperf1"]["cpu_pct_core"], "%.0f"),
    ("busy", "machine CPU busy during 1 stream (% of all vCPUs)",
     lambda r: r["iperf1"]["machine_busy_pct"], "%.0f"),
    ("setup", "link setup: h2 start -> 1st ipop ping ok (ms)", lambda r: 1000 * r["setup_s"], "%.0f"),
    ("oping", "ipop ping RTT h2 -> h1, median of %d (ms)" % OPINGS,
     lambda r: r["oping_median_ms"], "%.3f"),
]


NO_RATIO = {"busy"}  # context, not a result: no ratios


def summarize(rounds):
    """{path: {metric: {"median", "min", "max", "values"}}}."""
    out = {}
    for path in PATHS:
        out[path] = {}
        for key, _, get, _ in METRICS:
            vals = []
            for rnd in rounds:
                r = rnd.get(path)
                if not r or "error" in r:
                    continue
                try:
                    v = get(r)
                except (KeyError, TypeError):
                    continue
                if v is not None:
                    vals.append(v)
            if vals:
                out[path][key] = {"median": median(vals), "min": min(vals), "max": max(vals),
                                  "values": vals}
    return out


def ratio(summ, a, b, key):
    x = summ.get(a, {}).get(key)
    y = summ.get(b, {}).get(key)
    if not x or not y or not y["median"]:
        return None
    return x["median"] / y["median"]


def cell(summ, path, key, fmt):
    s = summ.get(path, {}).get(key)
    if not s:
        return "—"
    if len(s["values"]) == 1:
        return fmt % s["median"]
    return "%s (%s–%s)" % (fmt % s["median"], fmt % s["min"], fmt % s["max"])


def fmt_ratio(x):
    if x is None:
        return "—"
    return "%.3gx" % x if x < 10 else "%.0fx" % x


def table(summ, paths, ratio_pairs):
    head = ["metric"] + paths + ["%s / %s" % (a, b) for a, b in ratio_pairs]
    rows = []
    for key, label, _, fmt in METRICS:
        if not any(summ.get(p, {}).get(key) for p in paths):
            continue
        row = [label] + [cell(summ, p, key, fmt) for p in paths]
        row += [fmt_ratio(ratio(summ, a, b, key)) if key not in NO_RATIO else ""
                for a, b in ratio_pairs]
        rows.append(row)
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    out = [line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------
# main

def machine_info():
    info = {"kernel": platform.release(), "nproc": os.cpu_count(),
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat()}
    try:
        with open(IPOP_SRC, "rb") as f:
            info["ipop_sha1"] = hashlib.sha1(f.read()).hexdigest()
    except OSError:
        pass
    rc, out, _ = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check_rc=False)
    info["git"] = out.strip()
    rc, out, _ = sh(["git", "-C", REPO, "status", "--porcelain", "ipop.c"], check_rc=False)
    info["ipop_c_modified"] = bool(out.strip())
    rc, out, _ = sh(["iperf3", "--version"], check_rc=False)
    info["iperf3"] = out.splitlines()[0] if out else None
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            info["cpu"] = m.group(1) if m else None
    except OSError:
        pass
    return info


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


_cleaned = False


def cleanup():
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    for p in list(Proc.live):
        p.stop(timeout=3)
    remove_tb_netns()
    try:
        os.unlink(PIDFILE)
    except OSError:
        pass


def main():
    lib.bench_start("bench_tap", ("iperf3",), cleanup, "network namespaces, tap devices")
    if not os.access(IPOP_SRC, os.X_OK):
        print("bench_tap: %s missing; run make" % IPOP_SRC, flush=True)
        return 2
    for p in PATHS:
        if p not in ALL_PATHS:
            print("bench_tap: unknown path %r (known: %s)" % (p, ", ".join(ALL_PATHS)))
            return 2

    kill_leftover_pids()
    remove_tb_netns()
    for d in glob.glob("/tmp/ipop-bench-tap-*"):  # temp dirs of killed runs
        shutil.rmtree(d, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix="ipop-bench-tap-", dir="/tmp")
    key = os.path.join(tmp, "net.key")
    # ./ipop may be rebuilt while we run (shared checkout): measure one copy
    global IPOP
    IPOP = os.path.join(tmp, "ipop")
    shutil.copy2(IPOP_SRC, IPOP)
    failures = []
    rounds = []
    info = machine_info()
    with open(IPOP, "rb") as f:
        info["ipop_sha1"] = hashlib.sha1(f.read()).hexdigest()  # the copy we run
    info["loadavg_start"] = loadavg()
    t_start = time.monotonic()
    try:
        setup_underlay()
        sh([IPOP, "genkey", "--out", key])
        os.chmod(key, 0o600)
        port = BASE_PORT
        for rnd in range(RUNS):
            order = PATHS[rnd % len(PATHS):] + PATHS[:rnd % len(PATHS)]
            res = {}
            for path in order:
                port += 1
                t0 = time.monotonic()
                try:
                    r = measure_path(path, tmp, key, port)
                except BenchError as e:
                    r = {"error": str(e)}
                    failures.append("round %d %s: %s" % (rnd + 1, path, e))
                    log("FAIL round %d %s: %s" % (rnd + 1, path, e))
                r["elapsed_s"] = time.monotonic() - t0
                res[path] = r
                if "error" not in r:
                    log("round %d %-12s 1x %.3f 4x %.3f Gbit/s, ping %.3f ms%s%s%s (%.0f s)"
                        % (rnd + 1, path, r["iperf1"]["gbps"], r["iperf4"]["gbps"],
                           r["ping"]["avg_ms"],
                           ", setup %.0f ms" % (1000 * r["setup_s"]) if "setup_s" in r else "",
                           ", ipop ping %.3f ms" % r["oping_median_ms"] if "oping_median_ms" in r else "",
                           ", %.2f CPU-s/GB" % r["iperf1"]["cpu_s_per_gb"] if "cpu_s" in r["iperf1"] else "",
                           r["elapsed_s"]))
            rounds.append(res)
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    info["loadavg_end"] = loadavg()
    info["elapsed_s"] = time.monotonic() - t_start
    summ = summarize(rounds)
    veth_ratios = [(p, "veth") for p in PATHS if p != "veth" and "veth" in PATHS]
    sec_pairs = [(a, b) for a, b in [("udp-secure", "udp-insecure")] if a in PATHS and b in PATHS]
    t_all = table(summ, PATHS, veth_ratios + sec_pairs)
    sec_paths = [p for p in ("udp-insecure", "udp-secure", "udp-chacha", "udp-gcm", "tcp-secure") if p in PATHS]
    t_sec = table(summ, sec_paths, sec_pairs)

    print()
    print("Data plane, %d interleaved rounds, median (min–max); ratios are of medians." % RUNS)
    print("Machine: %s, %s vCPU, kernel %s; load avg %s -> %s; %.0f s"
          % (info.get("cpu"), info["nproc"], info["kernel"],
             "/".join("%.2f" % x for x in info["loadavg_start"]),
             "/".join("%.2f" % x for x in info["loadavg_end"]), info["elapsed_s"]))
    print()
    print(t_all)
    print()
    print("Security on vs off:")
    print()
    print(t_sec)
    print()

    os.makedirs(os.path.dirname(JSON_OUT), exist_ok=True)
    with open(JSON_OUT, "w") as f:
        json.dump({"config": {"runs": RUNS, "iperf_s": IPERF_S, "pings": PINGS,
                              "ipop_pings": OPINGS, "paths": PATHS},
                   "machine": info, "rounds": rounds, "summary": summ,
                   "table": t_all, "table_security": t_sec, "failures": failures},
                  f, indent=1)
    log("raw numbers: %s" % os.path.relpath(JSON_OUT, REPO))
    if failures:
        log("%d measurement(s) failed:" % len(failures))
        for x in failures:
            print("  " + x.splitlines()[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
