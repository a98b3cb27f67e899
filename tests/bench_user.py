#!/usr/bin/env python3
"""User-mode benchmark (issue 5): an unprivileged node (lwIP + SOCKS5 + -L)
against ssh -L and plain veth.

Needs root (network namespaces, a tap device for B); A runs as nobody.

Layout (every name starts with "tw"; leftover "tw-*" namespaces are removed
at start (their processes killed), and everything is removed on exit,
failure, SIGINT, SIGTERM or SIGHUP; only processes started here are
signalled): namespace tw-sw holds bridge twbr0; tw-a and tw-b each get a
veth "tw-eth" (peer twpN on the bridge) with 192.168.96.N/24.
  B  tw-b  root, ipop --mode tap --ip 10.128.0.2/16; a Python HTTP server
           (sendfile) on 0.0.0.0:8000 with a FILE_MB random file, a TCP echo
           server on 0.0.0.0:7000, sshd on 192.168.96.2:22 (throwaway keys,
           SetEnv SHLVL=1)
  A  tw-a  nobody, ipop --mode user --ip 10.128.0.1/16, SOCKS5 on
           127.0.0.1:1080, -L 127.0.0.1:18080:10.128.0.2:8000 and
           -L 127.0.0.1:18007:10.128.0.2:7000; also (root) ssh -N -L
           127.0.0.1:28080:192.168.96.2:8000 -L 127.0.0.1:28007:192.168.96.2:7000
The nodes run a copy of ./ipop taken at start (its sha1 goes to the JSON).

Paths (the client always runs in tw-a):
  veth   curl / echo client straight to 192.168.96.2 (baseline)
  ssh    through the ssh -L forwards (over the plain veth)
  fwd    through A's -L forwards (A's lwIP, the overlay, B's tap)
  socks  through A's SOCKS5 server to 10.128.0.2
Measured RUNS rounds, interleaved (round r runs every path once, starting at
a different path each round), medians shown:
  download  curl -sS --fail -o /dev/null URL/big.bin, single stream;
            size_download / time_total in MB/s (10^6 bytes)
  latency   one TCP connection (through the path), TCP_NODELAY, LAT_N
            sequential 64-byte request/response round trips to the echo
            server; p50 and p90 in ms (connection setup not included)
  A's memory: VmRSS and VmHWM idle after startup (before any load), VmRSS
            sampled every 50 ms during the SOCKS and -L downloads, VmHWM at
            the end (peak under load), VmRSS 3 s after the load; A's CPU
            seconds per GB (utime+stime) during the SOCKS and -L downloads.
Env: IPOP_BENCH_RUNS (3), IPOP_BENCH_USER_MB (256), IPOP_BENCH_LAT_N (200),
     IPOP_BENCH_JSON (build/bench/user.json).
Exit status: 0 if everything was measured, 1 if a measurement failed,
2 if not root or a tool is missing.
"""
import datetime
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (REPO, TestFailure as BenchError, log, sh, nsx, Proc, list_netns, remove_netns,  # noqa: E402
                 ns_add, bridge_add, veth_to_bridge, wait_listen, RssSampler, ssh_keys, sshd_config,
                 sshd_bin, SSH_OPTS, bench_start)

NS_PREFIX = "tw-"
SW = "tw-sw"
BR = "twbr0"
UNDERLAY = "192.168.96.%d"
VNET = "10.128.0.%d"
PORT = 4000
RUNS = int(os.environ.get("IPOP_BENCH_RUNS", "3"))
FILE_MB = int(os.environ.get("IPOP_BENCH_USER_MB", "256"))
LAT_N = int(os.environ.get("IPOP_BENCH_LAT_N", "200"))
JSON_OUT = os.environ.get("IPOP_BENCH_JSON", os.path.join(REPO, "build", "bench", "user.json"))
PATHS = ["veth", "ssh", "fwd", "socks"]
LABEL = {"veth": "plain veth", "ssh": "ssh -L", "fwd": "ipop -L", "socks": "ipop SOCKS5"}
SOCKS = "127.0.0.1:1080"
HELPER = r'''
import json, os, socket, socketserver, struct, sys, time
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler


def recvn(s, n):
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise RuntimeError("EOF after %d of %d bytes" % (len(b), n))
        b += x
    return b


def cmd_http(port, d):
    class H(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=d, **kw)

        def copyfile(self, src, dst):
            self.connection.sendfile(src)

        def log_message(self, *a):
            pass

    class S(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
    S(("0.0.0.0", int(port)), H).serve_forever()


def cmd_echo(port):
    class E(socketserver.BaseRequestHandler):
        def handle(self):
            s = self.request
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    s.sendall(b)
            except OSError:
                pass

    class S(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
    S(("0.0.0.0", int(port)), E).serve_forever()


def cmd_lat(host, port, n, socks=""):
    """n sequential 64-byte round trips over one connection (direct, or
    SOCKS5 CONNECT via socks=HOST:PORT to host:port)."""
    n, port = int(n), int(port)
    if socks:
        sh, sp = socks.rsplit(":", 1)
        s = socket.create_connection((sh, int(sp)), 10)
        s.settimeout(10)
        s.sendall(b"\x05\x01\x00")
        if recvn(s, 2) != b"\x05\x00":
            raise RuntimeError("greeting refused")
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
        r = recvn(s, 10)
        if r[1] != 0:
            raise RuntimeError("SOCKS reply %d" % r[1])
    else:
        s = socket.create_connection((host, port), 10)
    s.settimeout(10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes(range(64))
    for _ in range(5):              # warm up
        s.sendall(msg)
        recvn(s, 64)
    t = []
    for i in range(n):
        m = bytes([i & 255]) + msg[1:]
        a = time.perf_counter()
        s.sendall(m)
        if recvn(s, 64) != m:
            raise RuntimeError("echo mismatch at %d" % i)
        t.append((time.perf_counter() - a) * 1000)
    s.close()
    t.sort()
    print(json.dumps({"n": n, "p50": t[n // 2], "p90": t[int(n * 0.9)], "mean": sum(t) / n,
                      "min": t[0], "max": t[-1]}))


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
'''


def proc_kb(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for ln in f:
                if ln.startswith(key + ":"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return None


def cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


class Bench:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ipop-bench_user-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.udir = None
        self.made_run_sshd = False
        self.closed = False
        self.helper = os.path.join(self.dir, "helper.py")
        with open(self.helper, "w") as f:
            f.write(HELPER)
        self.bin = os.path.join(self.dir, "ipop")
        src = os.environ.get("IPOP") or os.path.join(REPO, "ipop")
        shutil.copy(src, self.bin)
        with open(self.bin, "rb") as f:
            self.bin_sha1 = hashlib.sha1(f.read()).hexdigest()
        self.res = {p: {"download_mbs": [], "lat_p50_ms": [], "lat_p90_ms": []} for p in PATHS}
        self.mem = {}
        self.cpu = {"socks": [], "fwd": []}
        self.errors = []

    # ---- setup
    def helper_proc(self, name, ns, args):
        return Proc(name, ["ip", "netns", "exec", ns, sys.executable, self.helper] + list(args),
                    os.path.join(self.dir, name + ".log"))

    def setup(self):
        ns_add(SW)
        bridge_add(SW, BR)
        for ns, idx in (("tw-a", 1), ("tw-b", 2)):
            ns_add(ns)
            veth_to_bridge(SW, BR, ns, "tw-eth", "twp%d" % idx, UNDERLAY % idx + "/24")
        pw = pwd.getpwnam("nobody")
        uid, gid = pw.pw_uid, pw.pw_gid
        key = os.path.join(self.dir, "net.key")
        sh([self.bin, "genkey", "--out", key])
        os.chmod(key, 0o600)
        self.udir = tempfile.mkdtemp(prefix="ipop-bench_user-nobody-", dir="/tmp")
        ubin = os.path.join(self.udir, "ipop")
        shutil.copy(self.bin, ubin)
        os.chmod(ubin, 0o755)
        ukey = os.path.join(self.udir, "net.key")
        shutil.copy(key, ukey)
        os.chown(ukey, uid, gid)
        os.chmod(ukey, 0o600)
        os.chown(self.udir, uid, gid)
        os.chmod(self.udir, 0o700)
        www = os.path.join(self.dir, "www")
        os.mkdir(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("bench\n")
        self.big_bytes = FILE_MB * 1024 * 1024
        sh(["sh", "-c", "head -c %d /dev/urandom > '%s'" % (self.big_bytes, os.path.join(www, "big.bin"))],
           timeout=120)
        self.http = self.helper_proc("http-b", "tw-b", ["http", "8000", www])
        self.echo = self.helper_proc("echo-b", "tw-b", ["echo", "7000"])
        self.b = Proc("B", ["ip", "netns", "exec", "tw-b", self.bin, "up", "--secret-file", key, "--listen",
                            "udp://%s:%d" % (UNDERLAY % 2, PORT), "--control", os.path.join(self.dir, "B.sock"),
                            "--ip", VNET % 2 + "/16", "--mode", "tap"], os.path.join(self.dir, "B.log"))
        time.sleep(0.5)
        self.a_cmd = ["ip", "netns", "exec", "tw-a", "setpriv", "--reuid=%d" % uid, "--regid=%d" % gid,
                      "--clear-groups", "--inh-caps=-all", "--", ubin, "up", "--secret-file", ukey,
                      "--listen", "udp://%s:%d" % (UNDERLAY % 1, PORT), "--bootstrap",
                      "udp://%s:%d" % (UNDERLAY % 2, PORT), "--control", os.path.join(self.udir, "A.sock"),
                      "--ip", VNET % 1 + "/16", "--mode", "user", "--socks", SOCKS,
                      "-L", "127.0.0.1:18080:%s:8000" % VNET % 2, "-L", "127.0.0.1:18007:%s:7000" % VNET % 2]
        self.a = Proc("A", self.a_cmd, os.path.join(self.dir, "A.log"))
        for p, ns, ap in ((self.http, "tw-b", ":8000"), (self.echo, "tw-b", ":7000"),
                          (self.a, "tw-a", "127.0.0.1:1080"), (self.a, "tw-a", "127.0.0.1:18080")):
            if not wait_listen(ns, ap, 15, p):
                raise BenchError("%s not listening on %s:\n%s" % (p.name, ap, p.log_tail()))
        # sshd on B's veth address, ssh -L from tw-a
        d = os.path.join(self.dir, "ssh")
        hk, ck, ak = ssh_keys(d)
        cfg = sshd_config(os.path.join(d, "sshd_config"), UNDERLAY % 2, hk, ak, os.path.join(d, "sshd.pid"),
                          ["AllowTcpForwarding yes"])
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", 0o755)
            self.made_run_sshd = True
        self.sshd = Proc("sshd", ["ip", "netns", "exec", "tw-b", sshd_bin(), "-f", cfg, "-D", "-e"],
                         os.path.join(self.dir, "sshd.log"))
        if not wait_listen("tw-b", "%s:22" % UNDERLAY % 2, 10, self.sshd):
            raise BenchError("sshd not listening:\n%s" % self.sshd.log_tail())
        self.sshlog = os.path.join(self.dir, "ssh-client.log")
        self.ssh_cmd = ["ssh"] + SSH_OPTS + [
            "-i", ck, "-o", "ExitOnForwardFailure=yes", "-v", "-E", self.sshlog, "-N",
            "-L", "127.0.0.1:28080:%s:8000" % UNDERLAY % 2, "-L", "127.0.0.1:28007:%s:7000" % UNDERLAY % 2,
            "root@%s" % UNDERLAY % 2]
        self.ssh = Proc("ssh", ["ip", "netns", "exec", "tw-a"] + self.ssh_cmd, os.path.join(self.dir, "ssh.log"))
        if not wait_listen("tw-a", "127.0.0.1:28080", 15, self.ssh):
            raise BenchError("ssh -L not listening:\n%s" % self.ssh.log_tail())
        # the overlay: poll through SOCKS until B answers
        t0 = time.monotonic()
        while True:
            rc, out, _ = nsx("tw-a", ["curl", "-sS", "--max-time", "3", "--socks5", SOCKS,
                                      "http://%s:8000/" % VNET % 2], check_rc=False, timeout=10)
            if rc == 0 and "bench" in out:
                break
            if time.monotonic() - t0 > 30 or not self.a.alive() or not self.b.alive():
                raise BenchError("no page via A's SOCKS after 30 s (rc %s)\nA:\n%s\nB:\n%s"
                                 % (rc, self.a.log_tail(), self.b.log_tail()))
            time.sleep(0.3)
        log("setup done: overlay up %.2f s after the SOCKS poll started; file %d MB" % (time.monotonic() - t0,
                                                                                     FILE_MB))
        m = re.search(r"kex: server->client cipher: (\S+)", open(self.sshlog, errors="replace").read())
        self.ssh_cipher = m.group(1) if m else "?"
        time.sleep(2)
        self.mem["idle_rss_kb"] = proc_kb(self.a.pid, "VmRSS")
        self.mem["idle_hwm_kb"] = proc_kb(self.a.pid, "VmHWM")
        self.apid = self.a.pid
        # setpriv + ip netns exec exec() in place: the pid is ipop's
        with open("/proc/%d/comm" % self.apid) as f:
            self.mem["a_comm"] = f.read().strip()

    # ---- measurements
    def url(self, path, f):
        return {"veth": "http://%s:8000/%s" % (UNDERLAY % 2, f), "ssh": "http://127.0.0.1:28080/%s" % f,
                "fwd": "http://127.0.0.1:18080/%s" % f, "socks": "http://%s:8000/%s" % (VNET % 2, f)}[path]

    def download(self, path):
        a = ["curl", "-sS", "--fail", "--max-time", "300", "-o", "/dev/null", "-w",
             "%{size_download} %{time_total}"]
        if path == "socks":
            a += ["--socks5", SOCKS]
        a.append(self.url(path, "big.bin"))
        samp = RssSampler(self.apid) if path in ("socks", "fwd") else None
        c0 = cpu_s(self.apid)
        rc, out, err = nsx("tw-a", a, timeout=320, check_rc=False)
        c1 = cpu_s(self.apid)
        if samp:
            samp.stop()
        mb = samp.max_between() if samp else None
        peak = round(mb * 1024) if mb is not None else None      # kB
        try:
            size, tt = out.split()
            size, tt = int(size), float(tt)
        except ValueError:
            size, tt = 0, 0
        if rc != 0 or size != self.big_bytes:
            raise BenchError("download via %s: rc=%s size=%s: %s" % (path, rc, size, err.strip()[-200:]))
        mbs = size / 1e6 / tt
        self.res[path]["download_mbs"].append(mbs)
        if samp:
            self.mem.setdefault("load_rss_max_kb", {}).setdefault(path, []).append(peak)
            self.cpu[path].append((c1 - c0) / (size / 1e9) if c0 is not None and c1 is not None else None)
        log("download %-6s %8.1f MB/s (%.2f s)%s" % (path, mbs, tt, "  A VmRSS max %.1f MB" % (peak / 1024)
                                                          if peak else ""))

    def latency(self, path):
        host, port, socks = {"veth": (UNDERLAY % 2, 7000, ""), "ssh": ("127.0.0.1", 28007, ""),
                             "fwd": ("127.0.0.1", 18007, ""), "socks": (VNET % 2, 7000, SOCKS)}[path]
        rc, out, err = nsx("tw-a", [sys.executable, self.helper, "lat", host, str(port), str(LAT_N), socks],
                           timeout=120, check_rc=False)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError("latency via %s: rc=%s %s" % (path, rc, (err or out).strip()[-300:]))
        self.res[path]["lat_p50_ms"].append(r["p50"])
        self.res[path]["lat_p90_ms"].append(r["p90"])
        log("latency  %-6s p50 %.3f ms p90 %.3f ms (%d round trips)" % (path, r["p50"], r["p90"], r["n"]))

    def run(self):
        for r in range(RUNS):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
            log("---- round %d/%d: %s" % (r + 1, RUNS, " ".join(order)))
            for p in order:
                try:
                    self.download(p)
                except BenchError as e:
                    self.errors.append(str(e))
                    log("ERROR " + str(e))
            for p in order:
                try:
                    self.latency(p)
                except BenchError as e:
                    self.errors.append(str(e))
                    log("ERROR " + str(e))
            if not self.a.alive():
                raise BenchError("A exited (rc %s):\n%s" % (self.a.p.poll(), self.a.log_tail()))
        self.mem["load_hwm_kb"] = proc_kb(self.apid, "VmHWM")
        time.sleep(3)
        self.mem["after_rss_kb"] = proc_kb(self.apid, "VmRSS")

    # ---- report
    def report(self):
        md = {p: {k: med(v) for k, v in self.res[p].items()} for p in PATHS}

        def rng(v, fmt):
            v = [x for x in v if x is not None]
            return ("(" + fmt + "-" + fmt + ")") % (min(v), max(v)) if v else ""

        def ratio(a, b):
            return "%.2f" % (a / b) if a is not None and b else "-"
        lines = []
        lines.append("| path | download MB/s (min-max) | / veth | / ssh -L | latency p50 ms (min-max) "
                     "| / veth | / ssh -L | p90 ms |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for p in PATHS:
            d, l9 = md[p]["download_mbs"], md[p]["lat_p90_ms"]
            lp = md[p]["lat_p50_ms"]
            lines.append("| %s | %s %s | %s | %s | %s %s | %s | %s | %s |" % (
                LABEL[p], "%.1f" % d if d is not None else "-", rng(self.res[p]["download_mbs"], "%.0f"),
                ratio(d, md["veth"]["download_mbs"]), ratio(d, md["ssh"]["download_mbs"]),
                "%.3f" % lp if lp is not None else "-", rng(self.res[p]["lat_p50_ms"], "%.3f"),
                ratio(lp, md["veth"]["lat_p50_ms"]), ratio(lp, md["ssh"]["lat_p50_ms"]),
                "%.3f" % l9 if l9 is not None else "-"))
        mb = lambda kb: "%.1f" % (kb / 1024) if kb else "-"  # noqa: E731
        lr = self.mem.get("load_rss_max_kb", {})
        lines.append("")
        lines.append("A (user mode, nobody) memory: idle VmRSS %s MB (VmHWM %s MB) before any load; "
                     "max VmRSS during the SOCKS downloads %s MB, during the -L downloads %s MB; "
                     "VmHWM after all the load %s MB; VmRSS 3 s after the load %s MB." % (
                         mb(self.mem.get("idle_rss_kb")), mb(self.mem.get("idle_hwm_kb")),
                         mb(max(lr.get("socks", [0]) or [0])), mb(max(lr.get("fwd", [0]) or [0])),
                         mb(self.mem.get("load_hwm_kb")), mb(self.mem.get("after_rss_kb"))))
        lines.append("A's CPU during the downloads: %s CPU-s/GB via SOCKS, %s CPU-s/GB via -L (one core = "
                     "1 CPU-s per s)." % ("%.2f" % med(self.cpu["socks"]) if med(self.cpu["socks"]) else "-",
                                         "%.2f" % med(self.cpu["fwd"]) if med(self.cpu["fwd"]) else "-"))
        lines.append("ssh cipher: %s. Medians of %d interleaved rounds; %d MB file, single curl stream; "
                     "latency: %d sequential 64-byte round trips over one TCP connection."
                     % (self.ssh_cipher, RUNS, FILE_MB, LAT_N))
        table = "\n".join(lines)
        print("\n==== bench_user (ipop %s)\n%s" % (self.bin_sha1[:12], table), flush=True)
        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": {"kernel": platform.release(), "cpu": cpu, "ncpu": os.cpu_count()},
               "ipop_sha1": self.bin_sha1, "runs": RUNS, "file_mb": FILE_MB, "lat_n": LAT_N,
               "paths": self.res, "medians": md, "memory_kb": self.mem, "a_cpu_s_per_gb": self.cpu,
               "ssh_cipher": self.ssh_cipher, "errors": self.errors, "table": table,
               "commands": {"A": self.a_cmd, "ssh": self.ssh_cmd}}
        os.makedirs(os.path.dirname(JSON_OUT), exist_ok=True)
        with open(JSON_OUT, "w") as f:
            json.dump(out, f, indent=1)
        log("raw numbers: %s" % JSON_OUT)

    def close(self):
        if self.closed:
            return
        self.closed = True
        for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sg, signal.SIG_IGN)
        for p in reversed(Proc.all):
            p.kill()
        for p in Proc.all:
            p.wait(5)
        remove_netns(NS_PREFIX)
        left = list_netns(NS_PREFIX)
        if left:
            print("cleanup: namespaces left: %s" % left, flush=True)
        if self.made_run_sshd:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.udir:
            shutil.rmtree(self.udir, ignore_errors=True)


_bench = None


def _cleanup():
    if _bench is not None:
        _bench.close()


def main():
    global _bench
    bench_start("bench_user", ("ip", "curl", "sshd", "ssh", "ssh-keygen", "ss", "setpriv"), _cleanup,
                "network namespaces, a tap device")
    old = remove_netns(NS_PREFIX)
    if old:
        log("removed leftover namespaces: %s" % " ".join(old))
    b = _bench = Bench()
    log("bench_user: ipop copy %s (sha1 %s), %d rounds, %d MB" % (b.bin, b.bin_sha1[:12], RUNS, FILE_MB))
    rc = 0
    try:
        b.setup()
        b.run()
        b.report()
        if b.errors:
            rc = 1
    except BenchError as e:
        log("FAIL: %s" % e)
        rc = 1
    finally:
        b.close()
    sys.exit(rc)


if __name__ == "__main__":
    main()
