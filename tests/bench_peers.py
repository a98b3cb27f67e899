#!/usr/bin/env python3
"""ipop against plain veth and its peers, one interleaved run, one table (issue 7).

Needs root (namespaces, tun/tap devices), iperf3, and whichever peers are
installed (tests/bench_peers.sh installs them with apt-get).

Layout (every name starts with "tp"; leftovers are removed at start, and
everything is removed on exit, failure, SIGINT, SIGTERM or SIGHUP; only
processes started here are signalled): namespace tp-sw holds bridge tpbr0;
tp-a and tp-b each get a veth "tp-eth" (peer tppN on the bridge) with
192.168.97.1/24 and .2/24.  The client side of every measurement runs in
tp-a, the servers (iperf3 -s, a TCP echo server, a TCP sink) in tp-b.

Paths (each started fresh for every round, stopped after it):
  veth            plain veth + bridge (the baseline)
  ipop-udp        ipop tap mode over udp, --secret-file (authenticated + encrypted)
  ipop-udp-insec  ipop tap mode over udp, --insecure
  ipop-tcp        ipop tap mode over tcp, --secret-file
  ipop-user-L     A in user mode (lwIP) with -L forwards to B (tap mode); traffic
                  to 127.0.0.1:PORT in tp-a
  ipop-user-socks the same node, through its SOCKS5 server (throughput with a
                  small Python bulk client instead of iperf3: iperf3 cannot
                  use SOCKS)
  ipop-uu-L       both nodes in user mode, no root on either side (issue 20):
                  A's -L forwards to B's -R 5201:127.0.0.1:5201 (and the echo,
                  sink and source ports), B's lwIP connecting to B's servers
  ipop-uu-socks   the same pair, through A's SOCKS5 server to B's -R ports
  ssh-L           ssh -N -L to sshd in tp-b (ed25519 keys made by ssh-keygen)
  tinc            tinc 1.0 (router mode, tun), RSA keys by tincd -K
  nebula          nebula, CA and node certs by nebula-cert, B is the lighthouse
  wireguard-go    wireguard-go (userspace, tun), keys by wg genkey/pubkey
  yggdrasil       yggdrasil (IPv6 200::/7 addresses), keys by yggdrasil -genconf
  n2n             n2n v1 edge (tap) in both, supernode in tp-b, key by the
                  community secret (n2n v1 has no keygen)
A peer whose binary is missing, or that fails to come up, is skipped and
reported as "not installed" / "failed: reason".

Per path and round (RUNS rounds, interleaved: round r starts at path r):
  tput1  iperf3 TCP a -> b, 1 stream, IPERF_S s; received Gbit/s.  During it
         the utime+stime of the path's daemons in both namespaces (ipop,
         tincd, nebula, ...; ssh/sshd for ssh -L) -> CPU-seconds per GB.
  tputR  iperf3 -R: b -> a, 1 stream (for SOCKS: the bulk client reads
         from a source server in b)
  tput4  the same with -P 4, a -> b
  ping   kernel ping a -> b over the path, PINGS pings 10 ms apart: avg RTT
         (not for user mode and ssh -L: no IP path; their RTT is in rr)
  rr     TCP request/response: one connection (TCP_NODELAY), RR_N sequential
         64-byte round trips to the echo server; p50 (ms)
The table shows the median of the rounds and the ratios of medians to
plain veth and to the best peer (the best non-ipop, non-veth value in that
column; higher is better for throughput, lower for the rest).

Env: IPOP_BENCH_RUNS (3), IPOP_BENCH_IPERF_S (5), IPOP_BENCH_PINGS (200),
     IPOP_BENCH_RR_N (500), IPOP_BENCH_PATHS (comma list, default all),
     IPOP_BENCH_JSON (build/bench/peers.json).
Exit status 0 if every path that could run was measured, 1 if a
measurement failed, 2 if not root / iperf3 missing.
"""
import datetime
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tap as bt      # noqa: E402  (sh, Proc, pid file, ping and iperf parsing)
import bench_user as bu     # noqa: E402  (the request/response helper)
import lib                  # noqa: E402  (namespaces, ssh keys)

REPO = bt.REPO
PREFIX = "tp"
SW, BR = "tp-sw", "tpbr0"
NA, NB = "tp-a", "tp-b"
UNDER = "192.168.97.%d"
ECHO_PORT, SINK_PORT, SOURCE_PORT, IPERF_PORT = 7007, 7008, 7009, 5201
B_PORTS = (IPERF_PORT, ECHO_PORT, SINK_PORT, SOURCE_PORT)
RUNS = int(os.environ.get("IPOP_BENCH_RUNS", "3"))
IPERF_S = int(os.environ.get("IPOP_BENCH_IPERF_S", "5"))
PINGS = int(os.environ.get("IPOP_BENCH_PINGS", "200"))
RR_N = int(os.environ.get("IPOP_BENCH_RR_N", "500"))
ALL_PATHS = ["veth", "ipop-udp", "ipop-udp-insec", "ipop-tcp", "ipop-user-L", "ipop-user-socks",
             "ipop-uu-L", "ipop-uu-socks",
             "ssh-L", "tinc", "nebula", "wireguard-go", "yggdrasil", "n2n"]
PEERS = ["ssh-L", "tinc", "nebula", "wireguard-go", "yggdrasil", "n2n"]
PATHS = [p for p in os.environ.get("IPOP_BENCH_PATHS", ",".join(ALL_PATHS)).split(",") if p]
JSON_OUT = os.environ.get("IPOP_BENCH_JSON", os.path.join(REPO, "build", "bench", "peers.json"))
bt.PIDFILE = os.path.join(REPO, "build", "bench", "peers.pids")
bt.PREFIX = PREFIX
sh, nsx, log, BenchError, Proc = bt.sh, bt.nsx, bt.log, bt.BenchError, bt.Proc

EXTRA_HELPER = r'''
def _listen6(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(port)))
    s.listen(64)
    return s


def _serve(port, fn):
    import threading
    ls = _listen6(port)
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=fn, args=(c,), daemon=True).start()


def _echo(c):
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
    except OSError:
        pass
    c.close()


def _sink(c):
    try:
        while c.recv(1 << 20):
            pass
    except OSError:
        pass
    c.close()


def _source(c):
    buf = b"\0" * (128 * 1024)
    try:
        while True:
            c.sendall(buf)
    except OSError:
        pass
    c.close()


def cmd_echo6(port):
    _serve(port, _echo)


def cmd_source6(port):
    _serve(port, _source)


def cmd_sink6(port):
    _serve(port, _sink)


def _socks_connect(socks, host, port):
    sh_, sp = socks.rsplit(":", 1)
    s = socket.create_connection((sh_, int(sp)), 10)
    s.sendall(b"\x05\x01\x00")
    if recvn(s, 2) != b"\x05\x00":
        raise RuntimeError("greeting refused")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", int(port)))
    if recvn(s, 10)[1] != 0:
        raise RuntimeError("SOCKS refused")
    return s


def cmd_bulk(host, port, seconds, streams, socks="", read="0"):
    """streams processes, each sending 128 kB writes for seconds (to a
    sink), or reading that long (read=1, from a source); prints {"bytes",
    "secs"} (sent: bytes acknowledged by the sink's close)."""
    import multiprocessing
    seconds, streams = float(seconds), int(streams)

    def one(q):
        s = _socks_connect(socks, host, port) if socks else socket.create_connection((host, int(port)), 10)
        buf = b"\0" * (128 * 1024)
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if read == "1":
                n += len(s.recv(1 << 20))
                continue
            s.sendall(buf)
            n += len(buf)
        if read == "1":
            s.close()
            q.put(n)
            return
        s.shutdown(socket.SHUT_WR)
        s.recv(1)               # the sink closes after reading everything
        q.put(n)
    q = multiprocessing.Queue()
    t0 = time.monotonic()
    ps = [multiprocessing.Process(target=one, args=(q,)) for _ in range(streams)]
    for p in ps:
        p.start()
    total = sum(q.get(timeout=seconds + 60) for _ in ps)
    for p in ps:
        p.join()
    print(json.dumps({"bytes": total, "secs": time.monotonic() - t0}))

'''


def helper_src():
    marker = 'if __name__ == "__main__":'
    src = bu.HELPER
    if marker not in src:
        raise SystemExit("bench_peers: bench_user.HELPER changed shape")
    return src.replace(marker, EXTRA_HELPER + "\n" + marker)


# --------------------------------------------------------------------------

def median(xs):
    return bt.median([x for x in xs if x is not None])


def remove_netns():
    """Delete our tp-* namespaces; processes still in them are ours (they
    were started by an earlier, killed run of this script)."""
    lib.remove_netns(PREFIX + "-", quiet=True)


def setup_underlay():
    lib.ns_add(SW)
    lib.bridge_add(SW, BR)
    for i, ns in enumerate((NA, NB), 1):
        lib.ns_add(ns)
        lib.veth_to_bridge(SW, BR, ns, "tp-eth", "tpp%d" % i, UNDER % i + "/24")
    if nsx(NA, ["ping", "-n", "-c", "1", "-W", "2", UNDER % 2], check_rc=False)[0] != 0:
        raise BenchError("underlay ping a -> b failed")


def ns_pids(ns):
    rc, out, _ = sh(["ip", "netns", "pids", ns], check_rc=False, timeout=10)
    return [int(p) for p in out.split()]


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


def daemon_pids(names):
    return [p for ns in (NA, NB) for p in ns_pids(ns) if comm(p) in names]


def cpu_of(pids):
    t = 0.0
    for p in pids:
        try:
            t += bt.proc_cpu_s(p)
        except (OSError, IndexError, ValueError):
            pass
    return t


def wait_for(fn, timeout, what, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        if proc is not None and not proc.alive():
            raise BenchError("%s: %s exited:\n%s" % (what, proc.name, proc.log_tail()))
        time.sleep(0.05)
    raise BenchError("%s: not within %d s%s" % (what, timeout, ("\n" + proc.log_tail()) if proc else ""))


def pings_ok(dst):
    v6 = ":" in dst
    return nsx(NA, ["ping", "-6" if v6 else "-4", "-n", "-c", "1", "-W", "1", dst],
               check_rc=False, timeout=5)[0] == 0


def listening(ns, port):
    rc, out, _ = nsx(ns, ["ss", "-Hltn"], check_rc=False, timeout=5)
    return any((":%d " % port) in ln for ln in out.splitlines())


# --------------------------------------------------------------------------
# the paths: each start() returns a dict
#   dst (host for iperf3/ping/rr), iperf_port, rr_port, ping (bool), socks,
#   daemons (comm names for CPU), procs (to stop)

class Bench:
    def __init__(self, tmp):
        self.tmp = tmp
        self.ipop = os.path.join(tmp, "ipop")
        shutil.copy2(os.path.join(REPO, "ipop"), self.ipop)
        with open(self.ipop, "rb") as f:
            self.ipop_sha1 = hashlib.sha1(f.read()).hexdigest()
        self.helper = os.path.join(tmp, "helper.py")
        with open(self.helper, "w") as f:
            f.write(helper_src())
        self.skip = {}
        self.port = 4100
        self.versions = {}

    def d(self, *p):
        return os.path.join(self.tmp, *p)

    def proc(self, name, ns, argv, env=None):
        a = ["ip", "netns", "exec", ns]
        if env:
            a += ["env"] + ["%s=%s" % kv for kv in env.items()]
        return Proc(name, a + list(argv), self.d(name + ".log"))

    # ---------------------------------------------------------------- prepare
    def prepare(self):
        """Keys and configs, once.  Sets self.skip[path] for peers that cannot run."""
        sh([self.ipop, "genkey", "--out", self.d("net.key")])
        os.chmod(self.d("net.key"), 0o600)
        self.servers = [self.proc("iperf3-b", NB, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                        self.proc("echo-b", NB, [sys.executable, self.helper, "echo6", str(ECHO_PORT)]),
                        self.proc("sink-b", NB, [sys.executable, self.helper, "sink6", str(SINK_PORT)]),
                        self.proc("source-b", NB, [sys.executable, self.helper, "source6", str(SOURCE_PORT)])]
        for port in B_PORTS:
            wait_for(lambda: listening(NB, port), 10, "server on :%d" % port)
        for peer in PEERS:
            if peer not in PATHS:
                continue
            try:
                getattr(self, "prep_" + peer.replace("-", "_").lower())()
            except BenchError as e:
                self.skip[peer] = str(e).splitlines()[0][:200]
                log("skip %s: %s" % (peer, self.skip[peer]))

    def need(self, *tools):
        for t in tools:
            if not shutil.which(t) and not os.path.exists("/usr/sbin/" + t):
                raise BenchError("not installed (%s missing)" % t)

    def prep_ssh_l(self):
        self.need("ssh", "sshd", "ssh-keygen")
        d = self.d("ssh")
        lib.ssh_keys(d, "host", "client")
        with open(os.path.join(d, "sshd_config"), "w") as f:
            f.write("ListenAddress %s\nPort 22\nHostKey %s/host\nAuthorizedKeysFile %s/authorized_keys\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n"
                    "UsePAM no\nPidFile none\nAllowTcpForwarding yes\n" % (UNDER % 2, d, d))
        with open(os.path.join(d, "known_hosts"), "w") as f:
            f.write("%s %s" % (UNDER % 2, open(os.path.join(d, "host.pub")).read()))
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", 0o755)
            global _made_run_sshd
            _made_run_sshd = True
        rc, out, err = sh(["ssh", "-V"], check_rc=False)
        self.versions["ssh-L"] = (out + err).strip()

    def prep_tinc(self):
        self.need("tincd")
        for i, (me, other) in enumerate((("a", "b"), ("b", "a")), 1):
            d = self.d("tinc", me)
            os.makedirs(os.path.join(d, "hosts"))
            with open(os.path.join(d, "tinc.conf"), "w") as f:
                f.write("Name = %s\nInterface = tptinc0\nAddressFamily = ipv4\nBindToAddress = %s\n%s"
                        % (me, UNDER % i, "ConnectTo = b\n" if me == "a" else ""))
            with open(os.path.join(d, "hosts", me), "w") as f:
                f.write("Address = %s\nPort = 655\nSubnet = 10.201.0.%d/32\n" % (UNDER % i, i))
            with open(os.path.join(d, "tinc-up"), "w") as f:
                f.write("#!/bin/sh\nip addr add 10.201.0.%d/24 dev $INTERFACE\nip link set $INTERFACE up\n" % i)
            os.chmod(os.path.join(d, "tinc-up"), 0o755)
            rc, out, err = sh(["tincd", "-c", d, "-K2048"], timeout=60, check_rc=False, )
            if rc != 0 or not os.path.exists(os.path.join(d, "rsa_key.priv")):
                raise BenchError("failed: tincd -K: %s" % (out + err).strip()[-150:])
        for me, other in (("a", "b"), ("b", "a")):
            shutil.copy(self.d("tinc", other, "hosts", other), self.d("tinc", me, "hosts", other))
        self.versions["tinc"] = sh(["tincd", "--version"], check_rc=False)[1].splitlines()[0]

    def prep_nebula(self):
        self.need("nebula", "nebula-cert")
        d = self.d("nebula")
        os.mkdir(d)
        sh(["nebula-cert", "ca", "-name", "tp", "-out-crt", d + "/ca.crt", "-out-key", d + "/ca.key"])
        for i, me in enumerate("ab", 1):
            sh(["nebula-cert", "sign", "-ca-crt", d + "/ca.crt", "-ca-key", d + "/ca.key", "-name", me,
                "-ip", "10.202.0.%d/24" % i, "-out-crt", "%s/%s.crt" % (d, me), "-out-key", "%s/%s.key" % (d, me)])
            light = ("  am_lighthouse: false\n  interval: 60\n  hosts:\n    - \"10.202.0.2\"\n" if me == "a"
                     else "  am_lighthouse: true\n")
            with open("%s/%s.yml" % (d, me), "w") as f:
                f.write("pki:\n  ca: %s/ca.crt\n  cert: %s/%s.crt\n  key: %s/%s.key\n"
                        "static_host_map:\n  \"10.202.0.2\": [\"%s:4242\"]\n"
                        "lighthouse:\n%s"
                        "listen:\n  host: %s\n  port: 4242\n"
                        "punchy:\n  punch: false\n"
                        "tun:\n  disabled: false\n  dev: tpneb0\n  mtu: 1300\n"
                        "logging:\n  level: warning\n"
                        "firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n"
                        "  inbound:\n    - port: any\n      proto: any\n      host: any\n"
                        % (d, d, me, d, me, UNDER % 2, light, UNDER % i))
        self.versions["nebula"] = sh(["nebula", "-version"], check_rc=False)[1].strip()

    def prep_wireguard_go(self):
        self.need("wireguard-go", "wg")
        d = self.d("wg")
        os.mkdir(d, 0o700)
        self.wg = {}
        for me in "ab":
            priv = sh(["wg", "genkey"])[1].strip()
            pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True).stdout.strip()
            with open("%s/%s.key" % (d, me), "w") as f:
                f.write(priv + "\n")
            self.wg[me] = pub
        self.versions["wireguard-go"] = sh(["wireguard-go", "--version"], check_rc=False)[1].splitlines()[0]

    def prep_yggdrasil(self):
        self.need("yggdrasil")
        d = self.d("ygg")
        os.mkdir(d)
        self.ygg_addr = {}
        for i, me in enumerate("ab", 1):
            conf = json.loads(sh(["yggdrasil", "-genconf", "-json"])[1])
            conf["IfName"] = "tpygg0"
            conf["IfMTU"] = 65535
            conf["MulticastInterfaces"] = []
            conf["AdminListen"] = "none"
            conf["Listen"] = ["tcp://%s:4243" % (UNDER % i)] if me == "b" else []
            conf["Peers"] = ["tcp://%s:4243" % (UNDER % 2)] if me == "a" else []
            p = "%s/%s.json" % (d, me)
            with open(p, "w") as f:
                json.dump(conf, f)
            self.ygg_addr[me] = sh(["yggdrasil", "-useconffile", p, "-address"])[1].strip()
        self.versions["yggdrasil"] = " ".join(sh(["yggdrasil", "-version"], check_rc=False)[1].split())

    def prep_n2n(self):
        self.need("edge", "supernode")
        rc, out, err = sh(["edge", "-h"], check_rc=False)
        self.versions["n2n"] = ((out + err).strip().splitlines() or ["?"])[0].replace("Welcome to ", "")

    # ---------------------------------------------------------------- start
    def start(self, path):
        self.port += 1
        if path in self.skip:
            raise BenchError("skip")
        return getattr(self, "start_" + path.replace("-", "_").lower())()

    def start_veth(self):
        return {"dst": UNDER % 2, "ping": True, "daemons": (), "procs": []}

    def _ipop(self, name, ns, i, transport, secure, extra=(), mode="tap"):
        ctl = self.d("%s-%d.sock" % (name, self.port))
        a = [self.ipop, "up", "--ip", "10.128.0.%d/16" % i, "--mode", mode, "--listen",
             "%s://%s:%d" % (transport, UNDER % i, self.port), "--control", ctl]
        a += ["--secret-file", self.d("net.key")] if secure else ["--insecure"]
        a += list(extra)
        return self.proc(name, ns, a), ctl

    def _ipop_pair(self, transport, secure, user=False, b_user=False):
        b_extra = [x for port in B_PORTS for x in ("-R", "%d:127.0.0.1:%d" % (port, port))] if b_user else []
        b, bctl = self._ipop("ipop-b", NB, 2, transport, secure, b_extra, mode="user" if b_user else "tap")
        wait_for(lambda: sh([self.ipop, "status", "--control", bctl], check_rc=False)[0] == 0, 10,
                 "ipop b status", b)
        boot = ["--bootstrap", "%s://%s:%d" % (transport, UNDER % 2, self.port)]
        if user:
            extra = boot + ["--socks", "127.0.0.1:1080"] + [
                x for port in B_PORTS
                for x in ("-L", "127.0.0.1:%d:10.128.0.2:%d" % (port + 10000, port))]
            a, actl = self._ipop("ipop-a", NA, 1, transport, secure, extra, mode="user")
            wait_for(lambda: sh([self.ipop, "ping", "-c", "1", "-W", "1", "10.128.0.2", "--control", actl],
                                check_rc=False, timeout=5)[0] == 0, 20, "ipop overlay ping", a)
            wait_for(lambda: listening(NA, IPERF_PORT + 10000), 10, "ipop -L listening", a)
        else:
            a, actl = self._ipop("ipop-a", NA, 1, transport, secure, boot)
            wait_for(lambda: pings_ok("10.128.0.2"), 20, "ping over ipop taps", a)
        return [a, b]

    def start_ipop_udp(self):
        return {"dst": "10.128.0.2", "ping": True, "daemons": ("ipop",), "procs": self._ipop_pair("udp", True)}

    def start_ipop_udp_insec(self):
        return {"dst": "10.128.0.2", "ping": True, "daemons": ("ipop",), "procs": self._ipop_pair("udp", False)}

    def start_ipop_tcp(self):
        return {"dst": "10.128.0.2", "ping": True, "daemons": ("ipop",), "procs": self._ipop_pair("tcp", True)}

    def start_ipop_user_l(self):
        return {"dst": "127.0.0.1", "port_off": 10000, "ping": False, "daemons": ("ipop",),
                "procs": self._ipop_pair("udp", True, user=True)}

    def start_ipop_user_socks(self):
        return {"dst": "10.128.0.2", "socks": "127.0.0.1:1080", "ping": False, "daemons": ("ipop",),
                "procs": self._ipop_pair("udp", True, user=True)}

    def start_ipop_uu_l(self):
        return {"dst": "127.0.0.1", "port_off": 10000, "ping": False, "daemons": ("ipop",),
                "procs": self._ipop_pair("udp", True, user=True, b_user=True)}

    def start_ipop_uu_socks(self):
        return {"dst": "10.128.0.2", "socks": "127.0.0.1:1080", "ping": False, "daemons": ("ipop",),
                "procs": self._ipop_pair("udp", True, user=True, b_user=True)}

    def start_ssh_l(self):
        d = self.d("ssh")
        srv = self.proc("sshd-b", NB, [lib.sshd_bin(), "-D", "-e", "-f", d + "/sshd_config"])
        wait_for(lambda: listening(NB, 22), 10, "sshd", srv)
        fw = [x for port in (IPERF_PORT, ECHO_PORT) for x in ("-L", "127.0.0.1:%d:127.0.0.1:%d" % (port + 20000, port))]
        cl = self.proc("ssh-a", NA, ["ssh", "-N", "-i", d + "/client", "-o", "UserKnownHostsFile=" + d + "/known_hosts",
                                     "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                                     "-o", "ExitOnForwardFailure=yes"] + fw + ["root@" + UNDER % 2])
        wait_for(lambda: listening(NA, IPERF_PORT + 20000), 15, "ssh -L", cl)
        return {"dst": "127.0.0.1", "port_off": 20000, "ping": False, "daemons": ("ssh", "sshd"),
                "procs": [cl, srv]}

    def start_tinc(self):
        procs = []
        for me, ns in (("b", NB), ("a", NA)):
            procs.append(self.proc("tinc-" + me, ns, ["tincd", "-c", self.d("tinc", me), "-D", "-d0",
                                                      "--pidfile", self.d("tinc", me, "pid")]))
        wait_for(lambda: pings_ok("10.201.0.2"), 20, "ping over tinc", procs[1])
        return {"dst": "10.201.0.2", "ping": True, "daemons": ("tincd",), "procs": procs}

    def start_nebula(self):
        d = self.d("nebula")
        procs = [self.proc("nebula-" + me, ns, ["nebula", "-config", "%s/%s.yml" % (d, me)])
                 for me, ns in (("b", NB), ("a", NA))]
        wait_for(lambda: pings_ok("10.202.0.2"), 20, "ping over nebula", procs[1])
        return {"dst": "10.202.0.2", "ping": True, "daemons": ("nebula",), "procs": procs}

    def start_wireguard_go(self):
        d = self.d("wg")
        env = {"WG_PROCESS_FOREGROUND": "1", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        procs = []
        for i, (me, ns, other) in enumerate((("a", NA, "b"), ("b", NB, "a")), 1):
            dev = "tpwg" + me        # the UAPI socket /var/run/wireguard/DEV.sock is not per namespace
            p = self.proc("wg-" + me, ns, ["wireguard-go", "-f", dev], env)
            procs.append(p)
            wait_for(lambda: nsx(ns, ["ip", "link", "show", dev], check_rc=False)[0] == 0 and
                     os.path.exists("/var/run/wireguard/%s.sock" % dev), 10, "wireguard-go " + dev, p)
            nsx(ns, ["wg", "set", dev, "listen-port", "51820", "private-key", "%s/%s.key" % (d, me),
                     "peer", self.wg[other], "allowed-ips", "10.203.0.%d/32" % (3 - i),
                     "endpoint", "%s:51820" % (UNDER % (3 - i))])
            nsx(ns, ["ip", "addr", "add", "10.203.0.%d/24" % i, "dev", dev])
            nsx(ns, ["ip", "link", "set", dev, "mtu", "1420", "up"])
        wait_for(lambda: pings_ok("10.203.0.2"), 20, "ping over wireguard-go", procs[0])
        return {"dst": "10.203.0.2", "ping": True, "daemons": ("wireguard-go",), "procs": procs}

    def start_yggdrasil(self):
        d = self.d("ygg")
        procs = [self.proc("ygg-" + me, ns, ["yggdrasil", "-useconffile", "%s/%s.json" % (d, me),
                                             "-loglevel", "warn"])
                 for me, ns in (("b", NB), ("a", NA))]
        dst = self.ygg_addr["b"]
        wait_for(lambda: pings_ok(dst), 30, "ping over yggdrasil", procs[1])
        return {"dst": dst, "ping": True, "daemons": ("yggdrasil",), "procs": procs}

    def start_n2n(self):
        sn = self.proc("n2n-sn", NB, ["supernode", "-l", "7654"])
        time.sleep(0.3)
        procs = [sn]
        for i, ns in ((2, NB), (1, NA)):
            procs.append(self.proc("n2n-edge-%d" % i, ns, [
                "edge", "-d", "tpn2n0", "-a", "10.205.0.%d" % i, "-c", "tpbench", "-k", "tp-secret-key",
                "-s", "255.255.255.0", "-l", "%s:7654" % (UNDER % 2), "-p", "7655", "-M", "1400"]))
            time.sleep(0.2)
        wait_for(lambda: pings_ok("10.205.0.2"), 30, "ping over n2n", procs[-1])
        return {"dst": "10.205.0.2", "ping": True, "daemons": ("edge", "supernode"), "procs": procs}

    # ---------------------------------------------------------------- measure
    def iperf(self, st, streams, cpu=False, rev=False):
        pids = daemon_pids(st["daemons"]) if cpu else []
        c0 = cpu_of(pids)
        off = st.get("port_off", 0)
        if st.get("socks"):
            rc, out, err = nsx(NA, [sys.executable, self.helper, "bulk", st["dst"],
                                    str(SOURCE_PORT if rev else SINK_PORT), str(IPERF_S),
                                    str(streams), st["socks"], "1" if rev else "0"],
                               timeout=IPERF_S + 90, check_rc=False)
            try:
                r = json.loads(out.strip().splitlines()[-1])
                nbytes, gbps = r["bytes"], r["bytes"] * 8 / r["secs"] / 1e9
            except (ValueError, KeyError, IndexError):
                raise BenchError("bulk via SOCKS failed: %s" % (out + err).strip()[-300:])
        else:
            rc, out, err = nsx(NA, ["iperf3", "-c", st["dst"], "-p", str(IPERF_PORT + off), "-t", str(IPERF_S),
                                    "-P", str(streams), "-J"] + (["-R"] if rev else []),
                               timeout=IPERF_S + 60, check_rc=False)
            try:
                end = json.loads(out)["end"]
                nbytes, gbps = end["sum_received"]["bytes"], end["sum_received"]["bits_per_second"] / 1e9
            except (ValueError, KeyError, TypeError):
                raise BenchError("iperf3 -P %d failed (rc=%s): %s" % (streams, rc, (out + err).strip()[-300:]))
        r = {"gbps": gbps, "bytes": nbytes}
        if cpu and pids:
            r["cpu_s"] = cpu_of(pids) - c0
            r["cpu_s_per_gb"] = r["cpu_s"] / (nbytes / 1e9) if nbytes else None
            r["daemon_pids"] = len(pids)
        return r

    def ping(self, st):
        v6 = ":" in st["dst"]
        rc, out, err = nsx(NA, ["ping", "-6" if v6 else "-4", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "1",
                                st["dst"]], timeout=PINGS * 0.05 + 20, check_rc=False)
        m = bt.PING_RTT_RE.search(out)
        if not m:
            raise BenchError("ping: no rtt line: %s" % (out + err).strip()[-200:])
        return float(m.group(2))

    def rr(self, st):
        a = [sys.executable, self.helper, "lat", st["dst"], str(ECHO_PORT + st.get("port_off", 0)), str(RR_N)]
        if st.get("socks"):
            a.append(st["socks"])
        rc, out, err = nsx(NA, a, timeout=RR_N * 0.2 + 30, check_rc=False)
        try:
            return json.loads(out.strip().splitlines()[-1])["p50"]
        except (ValueError, KeyError, IndexError):
            raise BenchError("request/response failed: %s" % (out + err).strip()[-300:])

    def measure(self, path):
        st = self.start(path)
        try:
            time.sleep(0.3)
            r = {}
            if st["ping"]:
                r["ping_ms"] = self.ping(st)
            r["rr_p50_ms"] = self.rr(st)
            r["iperf1"] = self.iperf(st, 1, cpu=bool(st["daemons"]))
            r["iperfR"] = self.iperf(st, 1, rev=True)
            r["iperf4"] = self.iperf(st, 4)
            for p in st["procs"]:
                if not p.alive():
                    raise BenchError("%s exited during the measurement:\n%s" % (p.name, p.log_tail()))
            return r
        finally:
            for p in reversed(st["procs"]):
                p.stop(timeout=3)
            time.sleep(0.2)


COLS = [
    ("tput1", "TCP 1 stream Gbit/s", lambda r: r["iperf1"]["gbps"], "%.2f", True),
    ("tputR", "TCP 1 stream b->a Gbit/s", lambda r: r["iperfR"]["gbps"], "%.2f", True),
    ("tput4", "TCP 4 streams Gbit/s", lambda r: r["iperf4"]["gbps"], "%.2f", True),
    ("ping", "ping avg ms", lambda r: r.get("ping_ms"), "%.3f", False),
    ("rr", "TCP 64 B RR p50 ms", lambda r: r["rr_p50_ms"], "%.3f", False),
    ("cpu", "CPU s/GB (daemons)", lambda r: r["iperf1"].get("cpu_s_per_gb"), "%.2f", False),
]


def summarize(rounds, paths):
    s = {}
    for p in paths:
        s[p] = {}
        for key, _, get, _, _ in COLS:
            vals = []
            for rnd in rounds:
                r = rnd.get(p)
                if r and "error" not in r:
                    try:
                        v = get(r)
                    except (KeyError, TypeError):
                        v = None
                    if v is not None:
                        vals.append(v)
            if vals:
                s[p][key] = {"median": median(vals), "values": vals}
    return s


def fr(x):
    return "—" if x is None else ("%.2f" % x if x < 10 else "%.0f" % x)


def table(summ, paths, skip):
    best = {}
    for key, _, _, _, higher in COLS:
        vals = [(summ[p][key]["median"], p) for p in paths if p in PEERS and key in summ.get(p, {})]
        if vals:
            best[key] = (max if higher else min)(vals)
    head = ["path"] + [c[1] for c in COLS]
    rows = []
    for p in paths:
        if p in skip or not summ.get(p):
            continue
        row = [p]
        for key, _, _, fmt, _ in COLS:
            v = summ[p].get(key)
            if not v:
                row.append("—")
                continue
            m = v["median"]
            vb = summ.get("veth", {}).get(key)
            rv = m / vb["median"] if vb and vb["median"] and p != "veth" else None
            rb = m / best[key][0] if key in best and best[key][0] and p != best[key][1] else None
            cellv = fmt % m
            if p != "veth":
                cellv += " (%s / %s)" % (fr(rv), fr(rb))
            row.append(cellv)
        rows.append(row)
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    out = [line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows]
    notes = ["Cells: median of the rounds (ratio to plain veth / ratio to the best peer). "
             "Best peer per column: " + ", ".join("%s %s" % (k, best[k][1]) for k, _, _, _, _ in COLS if k in best) + "."]
    for p in paths:
        if p in skip:
            notes.append("%s: skipped, %s" % (p, skip[p]))
    return "\n".join(out), notes


_made_run_sshd = False


def cleanup():
    """bench_tap's (our processes, the tp namespaces, the pid file), and /run/sshd if we made it."""
    bt.cleanup()
    if _made_run_sshd:
        try:
            os.rmdir("/run/sshd")
        except OSError:
            pass


def main():
    lib.bench_start("bench_peers", ("iperf3",), cleanup, "network namespaces, tun/tap devices")
    for p in PATHS:
        if p not in ALL_PATHS:
            print("bench_peers: unknown path %r (known: %s)" % (p, ", ".join(ALL_PATHS)))
            return 2
    bt.kill_leftover_pids()
    remove_netns()
    for d in glob.glob("/tmp/ipop-bench-peers-*"):  # temp dirs of killed runs
        shutil.rmtree(d, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix="ipop-bench-peers-", dir="/tmp")
    os.chmod(tmp, 0o755)
    load0 = bt.loadavg()
    t0 = time.monotonic()
    rounds, failures = [], []
    git = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check_rc=False)[1].strip()
    try:
        setup_underlay()
        b = Bench(tmp)
        b.prepare()
        run = [p for p in PATHS if p not in b.skip]
        for rnd in range(RUNS):
            order = run[rnd % len(run):] + run[:rnd % len(run)]
            res = {}
            for path in order:
                t1 = time.monotonic()
                try:
                    r = b.measure(path)
                except BenchError as e:
                    r = {"error": str(e)}
                    log("FAIL round %d %s: %s" % (rnd + 1, path, e))
                    failures.append((rnd, path, str(e)))
                r["elapsed_s"] = time.monotonic() - t1
                res[path] = r
                if "error" not in r:
                    log("round %d %-16s 1x %.3f 4x %.3f Gbit/s, ping %s ms, rr p50 %.3f ms, %s CPU-s/GB (%.0f s)"
                        % (rnd + 1, path, r["iperf1"]["gbps"], r["iperf4"]["gbps"],
                           "%.3f" % r["ping_ms"] if "ping_ms" in r else "-", r["rr_p50_ms"],
                           "%.2f" % r["iperf1"]["cpu_s_per_gb"] if r["iperf1"].get("cpu_s_per_gb") else "-",
                           r["elapsed_s"]))
            rounds.append(res)
        # a peer that failed every round is reported as failed, not measured
        for p in run:
            errs = [r[p]["error"] for r in rounds if "error" in r.get(p, {})]
            if len(errs) == RUNS:
                b.skip[p] = "failed: " + " ".join(x.strip(" |") for x in errs[0].splitlines())[:300]
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = bt.loadavg()
    summ = summarize(rounds, PATHS)
    tab, notes = table(summ, PATHS, b.skip)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    head = ("ipop vs plain veth vs peers: %s UTC, ipop git %s (binary sha1 %s), %d interleaved rounds, "
            "%s, %d vCPU, kernel %s; load avg %s -> %s; %.0f s"
            % (datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), git, b.ipop_sha1[:12], RUNS, cpu,
               os.cpu_count(), platform.release(), "/".join("%.2f" % x for x in load0),
               "/".join("%.2f" % x for x in load1), time.monotonic() - t0))
    print()
    print(head)
    print()
    print(tab)
    print()
    for n in notes:
        print(n)
    vers = "; ".join("%s: %s" % kv for kv in sorted(b.versions.items()))
    print("Versions: " + vers)
    os.makedirs(os.path.dirname(JSON_OUT), exist_ok=True)
    with open(JSON_OUT, "w") as f:
        json.dump({"header": head, "table": tab, "notes": notes, "versions": b.versions, "rounds": rounds,
                   "summary": summ, "skipped": b.skip, "failures": failures,
                   "config": {"runs": RUNS, "iperf_s": IPERF_S, "pings": PINGS, "rr_n": RR_N, "paths": PATHS}},
                  f, indent=1)
    log("raw numbers: %s" % os.path.relpath(JSON_OUT, REPO))
    return 1 if any(p not in b.skip for _, p, _ in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
