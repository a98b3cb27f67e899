"""Shared helpers for the ipop integration tests (Python 3 stdlib only).

Main pieces:
  * ipop_bin()            -- locate the binary ($IPOP or <repo>/ipop)
  * sha1_ip(ip)           -- ring address of a virtual IP (hex)
  * Net                   -- starts/stops nodes in a private temp dir,
                             always cleans up (finally + atexit + signals)
  * true_neighbors(addrs) -- the 2 true successors/predecessors of each addr
  * ring_check(net, nodes)-- compare nodes' up near links with the true ring
Namespace labs (root tests that build their own network, and the benches):
  * Lab                   -- a test's dir, nodes, steps (step, check, ok,
                             fail, note), summary line, cleanup
  * NsNode                -- an `ipop up` in a named namespace
  * ns_add, bridge_add, veth_to_bridge, veth_pair, nat_rules, wait_listen,
    kernel_ping, ssh_keys, sshd_config, bench_start -- the lab's pieces
"""

import atexit
import concurrent.futures
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RING = 1 << 160
HEX40 = re.compile(r"^[0-9a-f]{40}$")

T0 = time.monotonic()

# Nodes keep state (--ip auto leases, remembered peers) under
# $XDG_STATE_HOME/ipop: a test run, started by tests/run.sh or by hand, gets
# a fresh one of its own and leaves nothing in the user's home.
if not os.environ.get("XDG_STATE_HOME"):
    _STATE = tempfile.mkdtemp(prefix="ipop-test-state-")
    os.environ["XDG_STATE_HOME"] = _STATE
    atexit.register(shutil.rmtree, _STATE, True)


def log(*a):
    """Progress line with time since test start; flushed at once."""
    print("[%7.2fs] %s" % (time.monotonic() - T0, " ".join(str(x) for x in a)),
          flush=True)


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


# --------------------------------------------------------------------------
# binary / addresses


def ipop_bin():
    b = os.environ.get("IPOP") or os.path.join(REPO, "ipop")
    b = os.path.abspath(b)
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        print("FATAL: ipop binary not found or not executable: %s "
              "(set IPOP=/path/to/ipop or run make)" % b, flush=True)
        sys.exit(1)
    return b


def kit_bin(name):
    """A hostile-peer kit program (tests/kit_NAME.c, issue 18), built by
    `make kit` (make test builds it first); built here when missing."""
    b = os.path.join(REPO, "build", "kit", "kit_" + name)
    src = os.path.join(REPO, "tests", "kit_%s.c" % name)
    if not os.path.isfile(b) or os.path.getmtime(b) < os.path.getmtime(src):
        subprocess.run(["make", "-s", "-C", REPO, "build/kit/kit_" + name], check=True)
    return b


def sha1_ip(ip):
    """Ring address (40 lowercase hex) of an IPv4 address: SHA-1 of its 4
    bytes in network order."""
    return hashlib.sha1(socket.inet_aton(ip)).hexdigest()


def addr_int(a):
    return int(a, 16)


def short(a):
    return (a or "?")[:10]


# --------------------------------------------------------------------------
# ports

_used_ports = set()


def free_port(lo=12000, hi=32000):
    """A loopback port free for BOTH udp and tcp (bind-probe). Stays below
    the usual ephemeral range so outgoing sockets do not steal it."""
    for _ in range(2000):
        p = random.randint(lo, hi)
        if p in _used_ports:
            continue
        ok = True
        for typ in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_INET, typ)
            try:
                if typ == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            _used_ports.add(p)
            return p
    raise RuntimeError("no free port found")


# --------------------------------------------------------------------------
# running the CLI


def run_cli(args, timeout=10, input=None):
    """Run `ipop ARGS`; returns (rc, stdout, stderr). rc=None on timeout."""
    cmd = [ipop_bin()] + list(args)
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, text=True,
                           errors="replace")
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, out, err


def _pdeathsig():
    """preexec_fn: child gets SIGKILL if the test process dies, so a
    SIGKILLed test run never leaks overlay nodes. Also new session."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def sh(args, timeout=30, check_rc=True, input=None):
    """Run a short command; returns (rc, out, err). rc None on timeout.
    With check_rc, a failure or timeout raises TestFailure."""
    try:
        p = subprocess.run(args, capture_output=True, timeout=timeout, text=True,
                           errors="replace", input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        if check_rc:
            raise TestFailure("timeout after %ss: %s" % (timeout, " ".join(args)))
        return None, out, err
    if check_rc and p.returncode != 0:
        raise TestFailure("command failed rc=%d: %s: %s" % (p.returncode, " ".join(args),
                                                            (p.stderr or p.stdout).strip()[-300:]))
    return p.returncode, p.stdout, p.stderr


def nsx(ns, args, **kw):
    """sh() inside network namespace ns."""
    return sh(["ip", "netns", "exec", ns] + list(args), **kw)


def list_netns(prefix):
    """Names of the network namespaces starting with prefix."""
    rc, out, _ = sh(["ip", "netns", "list"], check_rc=False)
    return [ln.split()[0] for ln in (out or "").splitlines()
            if ln.split() and ln.split()[0].startswith(prefix)]


def remove_netns(prefix, quiet=False):
    """Kill every process in the namespaces starting with prefix (only the
    calling test's processes live there) and delete them; their veths and
    bridges go with them.  Returns the names removed."""
    names = list_netns(prefix)
    for nm in names:
        rc, out, _ = sh(["ip", "netns", "pids", nm], check_rc=False, timeout=10)
        for p in (out or "").split():
            if p == str(os.getpid()):
                continue        # a test that joined its namespace (t_local) lives on
            try:
                os.kill(int(p), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    for nm in names:
        rc, _, err = sh(["ip", "netns", "del", nm], check_rc=False, timeout=10)
        if rc != 0 and not quiet:
            print("  cleanup: ip netns del %s: %s" % (nm, (err or "").strip()), flush=True)
    return names


class Proc:
    """A long-running process (started from the main thread only, since
    PR_SET_PDEATHSIG fires when the creating thread exits)."""
    all = []

    def __init__(self, name, argv, logpath, env=None):
        self.name = name
        self.argv = argv
        self.logpath = logpath
        lf = open(logpath, "ab")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                  start_new_session=True, preexec_fn=_pdeathsig,
                                  env=dict(os.environ, **env) if env else None)
        lf.close()
        self.t0 = time.monotonic()
        Proc.all.append(self)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def rc(self):
        return self.p.poll()

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except OSError:
                try:
                    self.p.send_signal(sig)
                except OSError:
                    pass

    def stop(self, timeout=3):
        """SIGTERM, then SIGKILL."""
        if self.alive():
            self.kill(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.kill(signal.SIGKILL)
                self.wait(5)

    def log_text(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=25):
        lines = self.log_text().splitlines()
        return "\n".join("    | " + line for line in lines[-n:]) or "    | (empty log)"

# --------------------------------------------------------------------------
# namespace labs (root tests that build their own network)


def lab_start(name, cleanup, tools, remove_leftovers, hint="tests/deps.sh installs it"):
    """The start of a test that builds network namespaces: cleanup() runs at
    exit and on SIGTERM/SIGINT/SIGHUP; without root or a tool it prints one
    FAIL line and exits 1; leftovers of an earlier run are removed."""
    atexit.register(cleanup)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)
    if os.geteuid() != 0:
        print("FAIL: %s needs root (network namespaces, nftables, tap)" % name, flush=True)
        sys.exit(1)
    ipop_bin()
    for tool in tools:
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            print("FAIL: missing tool %s (%s)" % (tool, hint), flush=True)
            sys.exit(1)
    old = remove_leftovers()
    if old:
        log("removed leftover namespaces: %s" % " ".join(old))


def bench_start(name, tools, cleanup, need="network namespaces"):
    """The start of a benchmark (tests/bench_*.py): without root or a tool it
    prints one line and exits 2; cleanup() runs at exit and on
    SIGTERM/SIGINT/SIGHUP."""
    if os.geteuid() != 0:
        print("%s: needs root (%s)" % (name, need), flush=True)
        sys.exit(2)
    for tool in tools:
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            print("%s: %s not found" % (name, tool), flush=True)
            sys.exit(2)
    atexit.register(cleanup)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)


def keep_lab_logs(name, src, failed, suffixes=(".log",)):
    """A failed run (or IPOP_KEEP_LOGS) keeps src's logs in
    build/test-logs/NAME-nodes (or $IPOP_TEST_LOGDIR/NAME-nodes)."""
    if not (failed or os.environ.get("IPOP_KEEP_LOGS")):
        return
    base = os.environ.get("IPOP_TEST_LOGDIR") or os.path.join(REPO, "build", "test-logs")
    dst = os.path.join(base, "%s-nodes" % name)
    try:
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst, exist_ok=True)
        for f in os.listdir(src):
            if f.endswith(tuple(suffixes)):
                shutil.copy(os.path.join(src, f), dst)
        print("node logs kept in %s" % dst, flush=True)
    except OSError as e:
        print("could not keep logs: %r" % e, flush=True)


def timed_status(ctl, timeout=5, ns=None):
    """`ipop status --json` against control socket ctl (run in namespace ns
    when given): (dict or None, seconds it took) -- for tests that measure
    how promptly a node under load answers."""
    t = time.monotonic()
    rc, out, _ = (nsx(ns, [ipop_bin(), "status", "--json", "--control", ctl], timeout=timeout, check_rc=False)
                  if ns else run_cli(["status", "--json", "--control", ctl], timeout=timeout))
    dt = time.monotonic() - t if rc is not None else timeout
    try:
        return (json.loads(out) if rc == 0 else None), dt
    except ValueError:
        return None, dt


def wait_for(fn, timeout, poll=0.2):
    """Seconds until fn() is true, polled every poll s; None after timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(poll)
    return None


def ns_add(*names):
    """New network namespaces with their loopback up."""
    for ns in names:
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])


def bridge_add(ns, br):
    """A bridge br, up, in namespace ns (the lab's switch)."""
    sh(["ip", "-n", ns, "link", "add", br, "type", "bridge"])
    sh(["ip", "-n", ns, "link", "set", br, "up"])


def veth_to_bridge(sw, br, ns, ifname, port, cidr):
    """A veth from bridge br in namespace sw (its end named port) to ns
    (named ifname, carrying cidr, e.g. "192.168.90.1/24")."""
    sh(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns])
    sh(["ip", "-n", sw, "link", "set", port, "master", br, "up"])
    sh(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
    sh(["ip", "-n", ns, "link", "set", ifname, "up"])


def veth_pair(ns1, if1, ip1, ns2, if2, ip2, plen):
    """A point-to-point veth between two namespaces, an address on each end."""
    sh(["ip", "-n", ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2])
    for ns, ifn, ip in ((ns1, if1, ip1), (ns2, if2, ip2)):
        sh(["ip", "-n", ns, "addr", "add", "%s/%d" % (ip, plen), "dev", ifn])
        sh(["ip", "-n", ns, "link", "set", ifn, "up"])


def nat_rules(kind, lan, wan, wan_if, lan_if, fwd=()):
    """nftables script of a site router (t_natlab's types) whose WAN
    interface wan_if has the public address wan and whose LAN lan (a CIDR)
    is on lan_if: "F" full cone (snat to wan keeping the port, UDP ports
    dnat back as fwd says: [(ports, host ip)], e.g. [("4000-4999",
    "10.1.0.2")]), "S" symmetric (masquerade random,fully-random), "P"
    port-restricted cone (masquerade), "T" outbound TCP only (masquerade,
    UDP from the LAN dropped).  Every router drops unsolicited packets to
    itself (ct state new on its WAN), as home routers do."""
    if kind == "F":
        post = "ip saddr %s snat to %s" % (lan, wan)
        pre = "".join("add rule ip nat pre iifname \"%s\" udp dport %s dnat to %s\n" % (wan_if, ports, ip)
                      for ports, ip in fwd)
    elif kind == "S":
        post, pre = "masquerade random,fully-random", ""
    else:
        post, pre = "masquerade", ""
    script = ("add table ip nat\n"
              "add chain ip nat pre { type nat hook prerouting priority -100; }\n"
              "add chain ip nat post { type nat hook postrouting priority 100; }\n"
              "add rule ip nat post oifname \"%s\" %s\n%s"
              "add table ip filter\n"
              "add chain ip filter input { type filter hook input priority 0; policy accept; }\n"
              "add rule ip filter input iifname \"%s\" ct state new drop\n"
              "add chain ip filter forwarding { type filter hook forward priority 0; policy accept; }\n"
              % (wan_if, post, pre, wan_if))
    if kind == "T":
        script += "add rule ip filter forwarding iifname \"%s\" meta l4proto udp drop\n" % lan_if
    return script


def wait_listen(ns, addr_port, timeout=10, proc=None):
    """Poll `ss` in ns until a TCP socket listens on addr_port ("IP:PORT" or
    ":PORT"); False on timeout or when proc (the server) has exited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rc, out, _ = nsx(ns, ["ss", "-Hltn"], check_rc=False, timeout=5)
        if any(addr_port in line for line in out.splitlines()):
            return True
        if proc is not None and not proc.alive():
            return False
        time.sleep(0.1)
    return False


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def proc_status(pid):
    """{key: value} of /proc/PID/status, {} if gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def rss_mb(pid):
    v = proc_status(pid).get("VmRSS", "")
    m = re.match(r"\s*(\d+)\s*kB", v)
    return int(m.group(1)) / 1024.0 if m else None


def n_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


class RssSampler:
    """Samples a pid's VmRSS every `every` s in a thread (reading /proc only)."""

    def __init__(self, pid, every=0.05):
        import threading
        self.pid = pid
        self.every = every
        self.samples = []           # (monotonic, MB)
        self._stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while not self._stop.is_set():
            r = rss_mb(self.pid)
            if r is not None:
                self.samples.append((time.monotonic(), r))
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self.th.join(2)

    def max_between(self, t0=None, t1=None):
        v = [r for t, r in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return max(v) if v else None


SSH_OPTS = ["-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]


def ssh_keygen(path):
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path])


def ssh_keys(d, host="host_ed25519", client="client_ed25519"):
    """Throwaway ed25519 keys in d (made, mode 0700): (host key, client key,
    authorized_keys holding the client's public key)."""
    os.makedirs(d, 0o700, exist_ok=True)
    hk, ck = os.path.join(d, host), os.path.join(d, client)
    for k in (hk, ck):
        ssh_keygen(k)
    ak = os.path.join(d, "authorized_keys")
    shutil.copy(ck + ".pub", ak)
    os.chmod(ak, 0o600)
    return hk, ck, ak


def sshd_config(path, listen, hostkey, authkeys, pidfile, extra=(), port=22, user="root"):
    """An sshd config for root (or user) with the client key only.  SetEnv
    SHLVL=1: bash started by sshd then skips root's ~/.bashrc, whose
    contents (a slow pyenv init, say) must not decide whether a test passes."""
    with open(path, "w") as f:
        f.write("\n".join([
            "Port %d" % port, "ListenAddress %s" % listen, "HostKey %s" % hostkey, "PidFile %s" % pidfile,
            "AuthorizedKeysFile %s" % authkeys, "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "StrictModes no", "UsePAM no", "SetEnv SHLVL=1",
            "AllowUsers %s" % user, "X11Forwarding no", "PrintMotd no"] + list(extra) + [""]))
    return path


def sshd_bin():
    return shutil.which("sshd") or "/usr/sbin/sshd"


class NsNode:
    """One `ipop up` inside network namespace ns, its log and control socket
    in the lab's dir.  A test's node class gives command(): the argv run in
    the namespace (the binary, `up` and its flags)."""
    status_timeout = 5

    def __init__(self, lab, name, ns, vip=None):
        self.lab, self.name, self.ns, self.vip = lab, name, ns, vip
        self.ctl = os.path.join(lab.dir, "%s.sock" % name)
        self.logpath = os.path.join(lab.dir, "%s.log" % name)
        self.address = sha1_ip(vip) if vip else None
        self.proc = None
        self.killed = False         # stopped on purpose
        self.started = None

    def command(self):
        raise NotImplementedError

    def start(self):
        """Starts (or restarts) the node; a restart appends to the same log
        after a "---- start" line."""
        try:
            os.unlink(self.ctl)
        except OSError:
            pass
        with open(self.logpath, "ab") as f:
            f.write(("---- start %s\n" % time.strftime("%H:%M:%S")).encode())
        self.proc = Proc(self.name, ["ip", "netns", "exec", self.ns] + list(self.command()), self.logpath)
        self.killed = False
        self.started = time.monotonic()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def stop(self, timeout=3):
        self.killed = True
        if self.proc is not None:
            self.proc.stop(timeout)

    def cli(self, args, timeout=15):
        """`ipop ARGS --control CTL`: (rc, stdout, stderr), rc None on timeout."""
        return run_cli(list(args) + ["--control", self.ctl], timeout=timeout)

    def status(self, timeout=None):
        """Parsed `status --json` dict (address in lowercase), or None."""
        rc, out, _ = self.cli(["status", "--json"], timeout or self.status_timeout)
        if rc != 0:
            return None
        try:
            d = json.loads(out)
        except ValueError:
            return None
        if not isinstance(d, dict):
            return None
        if d.get("address"):
            d["address"] = str(d["address"]).lower()
            if self.address is None:
                self.address = d["address"]
        return d

    def oping(self, target, count=1, wait=3, interval=None, timeout=None):
        """Overlay echo (`ipop ping`): (ok, hops list, output)."""
        args = ["ping", target, "-c", str(count)]
        if interval is not None:
            args += ["-i", str(interval)]
        rc, out, err = self.cli(args + ["-W", str(wait)],
                                timeout or count * (wait + (interval or 1)) + 15)
        out = (out + err).strip() if rc is not None else "timeout"
        return rc == 0, [int(h) for h in re.findall(r"hops=(\d+)", out)], out


def kernel_ping(ns, ip, count=3, wait=2, interval=None, quiet=False, timeout=None):
    """Kernel ping in namespace ns: (ok, output)."""
    args = ["ping", "-n"] + (["-q"] if quiet else []) + ["-c", str(count)]
    if interval is not None:
        args += ["-i", str(interval)]
    rc, out, err = nsx(ns, args + ["-W", str(wait), ip], check_rc=False,
                       timeout=timeout or count * (wait + (interval or 1)) + 5)
    return rc == 0, ((out or "") + (err or "")).strip()


class Lab:
    """A root test that builds its own network of namespaces named PREFIX*:
    a private dir, the nodes by name, steps, and one report.

    Steps run through step(name, fn): a TestFailure (lib.check, the hard
    assert) ends that step as one FAIL and the test goes on with the next;
    fatal=True ends the test.  Inside a step, check(cond, msg) is the soft
    assert: it prints "PASS: step: msg" or "FAIL: step: msg" and goes on;
    ok(msg) and fail(msg) print those lines directly.  run() ends with the
    PASS/FAIL lines again and one line "NAME: N passed, N failed", exits 1
    when anything failed, and on every exit (failure, signal) kills what
    the test started, removes its namespaces and keeps the logs of a
    failed run (keep_lab_logs)."""
    name = "t_lab"
    prefix = None
    tools = ("ip",)
    hint = "tests/deps.sh installs it"

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ipop-%s-" % self.name, dir="/tmp")
        self.key = os.path.join(self.dir, "net.key")
        self.nodes = {}
        self.notes, self.passes, self.failures = [], [], []
        self.step_name = "setup"
        self.t0 = time.monotonic()
        self.done = False
        self._closed = False
        self.made_run_sshd = False

    @classmethod
    def main(cls, *a, **kw):
        """The test's main: root, tools and leftovers checked (lab_start), then
        body() run and reported."""
        labs = []
        lab_start(cls.name, lambda: labs and labs[0].close(not labs[0].done or bool(labs[0].failures)),
                  cls.tools, lambda: remove_netns(cls.prefix, quiet=True), cls.hint)
        labs.append(cls(*a, **kw))
        labs[0].run()

    def body(self):
        raise NotImplementedError

    def secret(self):
        """The network secret, DIR/net.key, made by `ipop genkey` on first use."""
        if not os.path.exists(self.key):
            sh([ipop_bin(), "genkey", "--out", self.key])
        return self.key

    # ---- reporting
    def ok(self, msg, step=None):
        """A PASS line, under the running step's name (or step)."""
        self.passes.append("%s: %s" % (step or self.step_name, msg))
        log("PASS: " + self.passes[-1])

    def fail(self, msg, step=None):
        self.failures.append("%s: %s" % (step or self.step_name, msg))
        log("FAIL: " + self.failures[-1])

    def note(self, msg):
        """A measurement or table line, neither PASS nor FAIL; repeated in the summary."""
        self.notes.append(msg)
        log(msg)

    def check(self, cond, msg):
        """The soft assert: PASS or FAIL msg; returns cond."""
        (self.ok if cond else self.fail)(msg)
        return cond

    def step(self, name, fn, fatal=False):
        self.step_name = name
        log("---- step %s" % name)
        ts = time.monotonic()
        try:
            fn()
        except TestFailure as e:
            self.fail(str(e))
            if fatal:
                e.recorded = True
                raise
        finally:
            log("---- step %s took %.1f s" % (name, time.monotonic() - ts))

    def run(self):
        try:
            self.body()
            self.done = True
        except TestFailure as e:
            if not getattr(e, "recorded", False):
                self.fail(str(e))
        except SystemExit as e:
            log("interrupted (exit %s): cleaning up" % e.code)
            self.close(failed=True)
            raise
        except BaseException:
            import traceback
            traceback.print_exc()
            self.fail("unexpected exception (see traceback)")
        print("\n==== %s summary (%.0f s)" % (self.name, time.monotonic() - self.t0), flush=True)
        for line in self.notes:
            print("  " + line, flush=True)
        for line in self.passes:
            print("PASS: " + line.replace("\n", "\n      "), flush=True)
        for line in self.failures:
            print("FAIL: " + line.replace("\n", "\n      "), flush=True)
        self.close(failed=bool(self.failures))
        log("%s: %d passed, %d failed" % (self.name, len(self.passes), len(self.failures)))
        sys.exit(1 if self.failures else 0)

    # ---- nodes
    def dump_logs(self, names, n=20):
        for nm in names:
            nd = self.nodes.get(nm)
            if nd and nd.proc:
                print("  log tail of %s (alive=%s rc=%s):\n%s"
                      % (nm, nd.alive(), nd.proc.rc(), nd.proc.log_tail(n)), flush=True)

    def wait_status(self, nodes, timeout, poll=0.1):
        """Poll until every node answers status; a node that exits fails."""
        t0 = time.monotonic()
        pending = list(nodes)
        while pending:
            for n in pending:
                if not n.alive():
                    raise TestFailure("%s exited rc=%s during startup; log:\n%s"
                                      % (n.name, n.proc.rc(), n.proc.log_tail()))
            pending = [n for n in pending if n.status() is None]
            if pending and time.monotonic() - t0 > timeout:
                self.dump_logs([n.name for n in pending[:4]], 10)
                raise TestFailure("%s not answering status after %d s"
                                  % (", ".join(n.name for n in pending), timeout))
            if pending:
                time.sleep(poll)
        return time.monotonic() - t0

    def check_alive(self, nodes):
        """The hard assert that none of nodes (or node names) has exited."""
        dead = [n for n in (self.nodes[x] if isinstance(x, str) else x for x in nodes) if not n.alive()]
        if dead:
            self.dump_logs([n.name for n in dead], 40)
        check(not dead, "node(s) exited: %s" % ", ".join("%s rc=%s" % (n.name, n.proc.rc()) for n in dead))

    def sshd(self, ns, listen, extra=(), tag="sshd"):
        """Throwaway keys (in DIR/TAG) and an sshd for root on address listen
        in ns, its config checked by sshd -t: (Proc, client key)."""
        d = os.path.join(self.dir, tag)
        hk, ck, ak = ssh_keys(d)
        cfg = sshd_config(os.path.join(d, "sshd_config"), listen, hk, ak, os.path.join(d, "sshd.pid"), extra)
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", 0o755)
            self.made_run_sshd = True
        rc, out, err = sh([sshd_bin(), "-t", "-f", cfg], check_rc=False)
        check(rc == 0, "sshd -t rejects the config: %s" % (err or out).strip())
        return Proc(tag, ["ip", "netns", "exec", ns, sshd_bin(), "-f", cfg, "-D", "-e"],
                    os.path.join(self.dir, tag + ".log")), ck

    # ---- cleanup
    def close_more(self):
        """What a test made besides processes, namespaces and its dir."""

    def close(self, failed):
        if self._closed:
            return
        self._closed = True
        for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sg, signal.SIG_IGN)     # finish cleaning up
        for p in reversed(Proc.all):
            p.kill(signal.SIGKILL)
        for p in Proc.all:
            p.wait(5)
        remove_netns(self.prefix)
        left = list_netns(self.prefix)
        if left:
            print("  cleanup: namespaces left: %s" % left, flush=True)
        if self.made_run_sshd:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass
        self.close_more()
        keep_lab_logs(self.name, self.dir, failed)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# cleanup registry

_nets = []


def _cleanup_all():
    for n in list(_nets):
        try:
            n.close()
        except Exception as e:  # pragma: no cover
            print("cleanup error: %r" % e, flush=True)


def _on_signal(signum, frame):
    # turn into an exception so that finally: blocks run, then atexit
    raise SystemExit(128 + signum)


atexit.register(_cleanup_all)
for _s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    try:
        signal.signal(_s, _on_signal)
    except Exception:
        pass


# --------------------------------------------------------------------------
# nodes


class Node:
    def __init__(self, net, idx, udp=None, tcp=None, ip=None, bootstrap=(),
                 extra=(), creds=None):
        self.net = net
        # None: the network's shared secret; else a list of credential flags
        # (["--insecure"], ["--cert-dir", DIR], ["--secret-file", OTHER]).
        self.creds = creds
        self.idx = idx
        self.name = "n%02d" % idx
        self.udp = udp        # port or None
        self.tcp = tcp        # port or None
        self.ip = ip
        self.bootstrap = list(bootstrap)
        self.extra = list(extra)
        self.ctl = os.path.join(net.dir, "%s.sock" % self.name)
        self.logpath = os.path.join(net.dir, "%s.log" % self.name)
        self.proc = None
        self.address = None   # from status, lowercase hex
        self.killed = False   # intentionally stopped
        self.started_at = None

    # URIs
    @property
    def udp_uri(self):
        return "udp://127.0.0.1:%d" % self.udp if self.udp else None

    @property
    def tcp_uri(self):
        return "tcp://127.0.0.1:%d" % self.tcp if self.tcp else None

    def listen_uris(self):
        return [u for u in (self.udp_uri, self.tcp_uri) if u]

    def bootstrap_uri(self, prefer="udp"):
        if prefer == "tcp" and self.tcp:
            return self.tcp_uri
        return self.udp_uri or self.tcp_uri

    def argv(self):
        a = [ipop_bin(), "up"]
        for u in self.listen_uris():
            a += ["--listen", u]
        for b in self.bootstrap:
            a += ["--bootstrap", b]
        if self.ip:
            a += ["--ip", self.ip]
        a += ["--control", self.ctl]
        a += self.creds if self.creds is not None else ["--secret-file", self.net.secret()]
        if "--mode" not in self.extra:
            a += ["--mode", "none"]     # loopback tests must not create tap devices
        if os.environ.get("IPOP_TEST_VERBOSE"):
            a.append("-v")
        a += self.extra
        return a

    def start(self):
        lf = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=lf, stderr=lf,
                                     start_new_session=True,
                                     preexec_fn=_pdeathsig)
        lf.close()
        self.started_at = time.monotonic()
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def send(self, sig):
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self, sig=signal.SIGKILL):
        self.killed = True
        self.send(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def status(self, timeout=5):
        """Parsed `status --json` dict, or None."""
        rc, out, err = run_cli(["status", "--control", self.ctl, "--json"],
                               timeout=timeout)
        if rc != 0:
            self.last_status_err = (rc, out[-300:], err[-300:])
            return None
        try:
            d = json.loads(out)
        except ValueError as e:
            self.last_status_err = (rc, "bad json: %s: %r" % (e, out[:300]), err[-300:])
            return None
        if isinstance(d, dict) and d.get("address"):
            d["address"] = str(d["address"]).lower()
            if self.address is None:
                self.address = d["address"]
        return d

    def ping(self, target, count=1, wait=3, interval=None, timeout=None):
        """Returns (ok, hops list, rc, output)."""
        args = ["ping", "--control", self.ctl, target, "-c", str(count),
                "-W", str(wait)]
        if interval is not None:
            args += ["-i", str(interval)]
        if timeout is None:
            timeout = count * (wait + (interval or 1)) + 10
        rc, out, err = run_cli(args, timeout=timeout)
        hops = [int(h) for h in re.findall(r"hops=(\d+)", out)]
        return rc == 0, hops, rc, (out + err).strip()

    def log_tail(self, n=25):
        try:
            with open(self.logpath, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join("    | " + l for l in lines[-n:])
        except OSError:
            return "    | (no log)"

    def desc(self):
        kind = "udp+tcp" if (self.udp and self.tcp) else ("tcp" if self.tcp else "udp")
        return "%s[%s %s%s]" % (self.name, short(self.address), kind,
                                 (" ip=" + self.ip) if self.ip else "")


# --------------------------------------------------------------------------
# soft checks for loopback tests (the hostile-peer tests): every failure is
# reported before the test ends


SOFT_FAILS = []


def soft_result(ok, what):
    """PASS/FAIL line; a failure is remembered for soft_finish()."""
    print("%s: %s" % ("PASS" if ok else "FAIL", what), flush=True)
    if not ok:
        SOFT_FAILS.append(what)
    return ok


def pct(xs, p):
    """Percentile with linear interpolation (p in 0..100); nan for none."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def soft_check(cond, msg):
    """Record a failure but keep going, so one run reports everything."""
    log(("  ok: " if cond else "  FAILED: ") + msg)
    if not cond:
        SOFT_FAILS.append(msg)
    return cond


def soft_finish(*nets):
    """Fail the test if a soft check failed: list them, and mark the given
    Nets failed (their logs are kept)."""
    if not SOFT_FAILS:
        return
    for net in nets:
        net.failed = True
    for f in SOFT_FAILS:
        print("  failed: " + f, flush=True)
    raise TestFailure("%d check(s) failed: %s" % (len(SOFT_FAILS), "; ".join(SOFT_FAILS)))


def wait_value(pred, timeout, every=0.1):
    """pred()'s first true value within timeout (polled), else its last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


def linked(node, vip):
    """node has an up link to the node with virtual IP vip."""
    st = node.status() or {}
    return any(c.get("state") == "up" and c.get("ip") == vip for c in st.get("connections", []))


def node_drops(node):
    return (node.status() or {}).get("drops", {})


def udp_echo_server(sock, stop):
    """Echo every datagram on sock to its sender until stop (an Event) is set."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            d, a = sock.recvfrom(4096)
            sock.sendto(d, a)
        except socket.timeout:
            pass


def cli_ok(args):
    """ipop ARGS must succeed; its standard output."""
    rc, out, err = run_cli(args)
    if rc != 0:
        raise TestFailure("ipop %s: rc=%d %s" % (" ".join(args), rc, err.strip()))
    return out


class KitPeer(Node):
    """A hostile member (tests/kit_peer.c): a real node that a test scripts.
    `claims` are kit options (["--claim-started", "1"], ...); cmd() sends one
    command line and returns its answer lines, the last "ok ..." or "err ..."."""

    def __init__(self, net, idx, claims=(), **kw):
        Node.__init__(self, net, idx, **kw)
        self.name = "kit%02d" % idx
        self.ctl = os.path.join(net.dir, "%s.sock" % self.name)
        self.logpath = os.path.join(net.dir, "%s.log" % self.name)
        self.claims = list(claims)
        self._out = b""

    def argv(self):
        return [kit_bin("peer")] + self.claims + ["--"] + Node.argv(self)[2:]

    def start(self):
        lf = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=lf, start_new_session=True, preexec_fn=_pdeathsig)
        lf.close()
        self.started_at = time.monotonic()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.expect(("ready",), timeout=10)
        return self

    def expect(self, prefixes, timeout=10):
        """Answer lines up to the first that starts with one of prefixes."""
        import select
        lines, deadline = [], time.monotonic() + timeout
        dead = False
        while True:
            while b"\n" in self._out:
                line, self._out = self._out.split(b"\n", 1)
                line = line.decode(errors="replace")
                lines.append(line)
                if line.startswith(tuple(prefixes)):
                    return lines
            left = deadline - time.monotonic()
            gone = not self.alive()
            if gone and self._read_some():
                continue                # what it said before it exited
            if left <= 0 or gone:
                raise TestFailure("%s: no %s answer (got %r; %s)" % (self.name, "/".join(prefixes), lines,
                                                                    self._why_silent()))
            select.select([self.proc.stdout.fileno()], [], [], left)
            self._read_some()

    def _read_some(self):
        try:
            got = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return False
        self._out += got
        return bool(got)

    def _why_silent(self):
        if not self.alive():
            return "exited rc=%s" % self.returncode()
        try:
            return "fd 0 is %s" % os.readlink("/proc/%d/fd/0" % self.proc.pid)
        except OSError as e:
            return "fd 0: %s" % e

    def cmd(self, line, timeout=10):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()
        lines = self.expect(("ok", "err"), timeout)
        if lines[-1].startswith("err"):
            raise TestFailure("%s: %s -> %s" % (self.name, line, lines[-1]))
        return lines

    def links(self):
        """[(ring address, vip)] of its up links."""
        return [tuple(l.split()[1:3]) for l in self.cmd("links") if l.startswith("link ")]


class Net:
    """A set of nodes in a private temp dir. Use as a context manager;
    close() is also registered with atexit and runs on SIGTERM/SIGINT."""

    def __init__(self, name):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="ipop-%s-" % name, dir="/tmp")
        self.nodes = []
        self.failed = False
        self._closed = False
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=12)
        _nets.append(self)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.failed = True
        self.close()
        return False

    def secret(self, name="net.key"):
        """A network secret file in the net's dir, made by `ipop genkey`."""
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            rc, out, err = run_cli(["genkey", "--out", path])
            if rc != 0:
                raise TestFailure("ipop genkey --out %s failed: %s" % (path, err.strip()))
        return path

    def add(self, kit=False, **kw):
        n = (KitPeer if kit else Node)(self, len(self.nodes), **kw)
        self.nodes.append(n)
        return n

    def live(self):
        return [n for n in self.nodes if not n.killed]

    def by_addr(self):
        return {n.address: n for n in self.nodes if n.address}

    def statuses(self, nodes=None, timeout=5):
        """{node: status-dict-or-None}, fetched in parallel."""
        nodes = list(self.live() if nodes is None else nodes)
        res = list(self.pool.map(lambda n: n.status(timeout=timeout), nodes))
        return dict(zip(nodes, res))

    def wait_ready(self, nodes=None, timeout=15):
        """Poll status until every node answers. Returns seconds taken."""
        nodes = list(self.live() if nodes is None else nodes)
        t0 = time.monotonic()
        pending = list(nodes)
        while pending:
            dead = [n for n in pending if not n.alive()]
            if dead:
                for n in dead:
                    print("  %s exited rc=%s before ready; log:\n%s"
                          % (n.name, n.returncode(), n.log_tail()), flush=True)
                raise TestFailure("%d node(s) died during startup" % len(dead))
            st = self.statuses(pending)
            pending = [n for n in pending if st[n] is None]
            if not pending:
                break
            if time.monotonic() - t0 > timeout:
                for n in pending[:5]:
                    print("  %s not ready: %r\n%s" % (n.name, getattr(n, "last_status_err", None),
                                                    n.log_tail(10)), flush=True)
                raise TestFailure("%d node(s) not ready after %ds"
                                  % (len(pending), timeout))
            time.sleep(0.1)
        return time.monotonic() - t0

    def check_alive(self, nodes=None):
        """Raise if a node we did not stop has exited."""
        nodes = self.live() if nodes is None else nodes
        dead = [n for n in nodes if not n.alive()]
        if dead:
            for n in dead:
                print("  UNEXPECTED EXIT %s rc=%s; log tail:\n%s"
                      % (n.desc(), n.returncode(), n.log_tail(40)), flush=True)
            raise TestFailure("%d node(s) exited unexpectedly: %s"
                              % (len(dead), ", ".join(n.name for n in dead)))

    def close(self):
        if self._closed:
            return
        self._closed = True
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                try:
                    os.killpg(n.proc.pid, signal.SIGKILL)
                except OSError:
                    try:
                        n.proc.kill()
                    except OSError:
                        pass
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=5)
                except Exception:
                    pass
        try:
            self.pool.shutdown(wait=False)
        except Exception:
            pass
        keep = os.environ.get("IPOP_KEEP_LOGS") or self.failed
        if keep:
            base = os.environ.get("IPOP_TEST_LOGDIR") or os.path.join(REPO, "build", "test-logs")
            dst = os.path.join(base, "%s-nodes" % self.name)
            try:
                shutil.rmtree(dst, ignore_errors=True)
                os.makedirs(dst, exist_ok=True)
                for f in os.listdir(self.dir):
                    if f.endswith(".log"):
                        shutil.copy(os.path.join(self.dir, f), dst)
                print("node logs kept in %s" % dst, flush=True)
            except OSError as e:
                print("could not keep logs: %r" % e, flush=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self in _nets:
            _nets.remove(self)


# --------------------------------------------------------------------------
# ring


def true_neighbors(addrs, k=2):
    """addrs: iterable of 40-hex addresses. Returns {addr: set(addrs)} with
    the k true successors and k true predecessors of each (mod 2^160),
    deduplicated and excluding the node itself (matters for small N)."""
    s = sorted(set(addrs), key=addr_int)
    n = len(s)
    out = {}
    for i, a in enumerate(s):
        nb = set()
        for j in range(1, k + 1):
            if n > 1:
                nb.add(s[(i + j) % n])
                nb.add(s[(i - j) % n])
        nb.discard(a)
        out[a] = nb
    return out


def conn_roles(c):
    r = c.get("roles")
    if isinstance(r, list) and r:
        return set(r)
    t = c.get("type")
    return {t} if t else set()


def up_conns(st):
    """Addresses of all links in state up."""
    return {str(c.get("address")).lower() for c in (st or {}).get("connections", [])
            if c.get("state") == "up" and c.get("address")}


def near_up(st):
    """Addresses of links with role near and state up."""
    return {str(c.get("address")).lower() for c in (st or {}).get("connections", [])
            if c.get("state") == "up" and c.get("address") and "near" in conn_roles(c)}


def ring_check(net, nodes, statuses=None):
    """Returns (bad, statuses): bad is a list of (node, missing, have)."""
    st = statuses if statuses is not None else net.statuses(nodes)
    addrs = [n.address for n in nodes]
    truth = true_neighbors(addrs)
    bad = []
    for n in nodes:
        s = st.get(n)
        if s is None:
            bad.append((n, truth[n.address], None))
            continue
        have = near_up(s)
        missing = truth[n.address] - have
        if missing:
            bad.append((n, missing, have))
    return bad, st


def up_link(st, addr, path=None):
    """The up link of status st to ring address addr (path "direct" or
    "relayed", or either when None), or None."""
    for c in (st or {}).get("connections", []):
        if c.get("state") == "up" and str(c.get("address")).lower() == addr and \
                (path is None or c.get("path") == path):
            return c
    return None


def conn_summary(st):
    """One line per status: each link's state, direction, path, uri, peer and roles."""
    return "; ".join("%s %s %s %s %s %s" % (c.get("state"), c.get("direction"), c.get("path"), c.get("uri"),
                                            c.get("ip") or str(c.get("address"))[:10],
                                            ",".join(c.get("roles") or []))
                     for c in (st or {}).get("connections", [])) or "(none)"


def _link_desc(st, addr):
    """How a status dict shows its link(s) to addr, in any state."""
    if st is None:
        return "no status"
    ls = [c for c in st.get("connections", []) if str(c.get("address")).lower() == addr]
    if not ls:
        return "no link"
    return "; ".join("%s %s roles=%s %s %s" % (c.get("state"), c.get("type"), ",".join(c.get("roles") or []),
                                               c.get("direction"), c.get("uri")) for c in ls)


def print_ring_bad(net, bad, limit=12, statuses=None):
    ba = net.by_addr()
    for n, missing, have in bad[:limit]:
        if have is None:
            print("  %s: status failed %r" % (n.desc(), getattr(n, "last_status_err", None)),
                  flush=True)
            continue
        print("  %s missing near: %s; has near-up: %s" % (
            n.desc(),
            ", ".join("%s(%s)" % (short(a), ba[a].name if a in ba else "?") for a in sorted(missing)),
            ", ".join("%s(%s)" % (short(a), ba[a].name if a in ba else "?") for a in sorted(have))),
            flush=True)
        if statuses is not None:
            for a in sorted(missing):
                m = ba.get(a)
                print("      link %s->%s: %s | reverse %s->%s: %s" % (
                    n.name, m.desc() if m else short(a), _link_desc(statuses.get(n), a),
                    m.name if m else "?", n.name, _link_desc(statuses.get(m), n.address) if m else "?"),
                    flush=True)
    if len(bad) > limit:
        print("  ... and %d more" % (len(bad) - limit), flush=True)


def wait_ring(net, nodes, timeout, poll=1.0, label="ring"):
    """Poll until ring_check passes. Returns seconds taken; raises with
    details on timeout."""
    t0 = time.monotonic()
    last_report = -10
    while True:
        net.check_alive(nodes)
        bad, st = ring_check(net, nodes)
        el = time.monotonic() - t0
        if not bad:
            return el
        if el - last_report >= 5:
            log("%s: %d/%d nodes not yet consistent (%.1fs)" % (label, len(bad), len(nodes), el))
            last_report = el
        if el > timeout:
            log("%s: NOT consistent after %.1fs: %d/%d nodes wrong:" % (label, el, len(bad), len(nodes)))
            print_ring_bad(net, bad, statuses=st)
            for n, _, _ in bad[:3]:
                print("  log tail of %s:\n%s" % (n.name, n.log_tail(15)), flush=True)
            raise TestFailure("%s not consistent within %ds" % (label, timeout))
        time.sleep(max(0.0, poll - (time.monotonic() - t0 - el)))


def ping_pairs(net, pairs, wait=3, count=1):
    """pairs: list of (src_node, dst_node, target_string). Runs in parallel.
    Returns list of (src, dst, target, ok, hops, rc, out, secs)."""
    def one(p):
        a, b, tgt = p
        t = time.monotonic()
        ok, hops, rc, out = a.ping(tgt, count=count, wait=wait)
        return (a, b, tgt, ok, hops, rc, out, time.monotonic() - t)
    return list(net.pool.map(one, pairs))


def report_pings(results, label):
    fails = [r for r in results if not r[3]]
    hops = [r[4][0] for r in results if r[3] and r[4]]
    secs = [r[7] for r in results]
    if hops:
        log("%s: %d/%d ok; hops mean %.2f max %d; cli wall mean %.3fs max %.3fs"
            % (label, len(results) - len(fails), len(results),
               sum(hops) / len(hops), max(hops), sum(secs) / len(secs), max(secs)))
    else:
        log("%s: %d/%d ok; no hops parsed" % (label, len(results) - len(fails), len(results)))
    ok_nohops = [r for r in results if r[3] and not r[4]]
    if ok_nohops:
        log("  note: %d successful pings printed no hops=N; e.g. %r"
            % (len(ok_nohops), ok_nohops[0][6][:200]))
    for a, b, tgt, ok, hops, rc, out, s in fails[:10]:
        print("  FAIL ping %s -> %s (%s): rc=%s %.2fs: %s"
              % (a.desc(), b.desc(), tgt, rc, s, out[-300:].replace("\n", " | ")),
              flush=True)
    return fails


# --------------------------------------------------------------------------
# attackers

# The holder (TcpHolder): opens n non-blocking connects from the source
# addresses round robin, never sends a byte, and every 0.3 s reopens those
# the target closed; after each pass it writes "held opened" to its info
# file; it closes everything when the stop file appears.
_HOLDER_PY = r"""
import os, resource, select, socket, sys, time
target, port, n, srcs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
stop, info = sys.argv[5], sys.argv[6]
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, n + 200))
socks = {}
def open_one(i):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.bind((srcs[i % len(srcs)], 0))
        s.connect_ex((target, port))
    except OSError:
        s.close()
        return
    socks[i] = s
for i in range(n):
    open_one(i)
opened = n
while not os.path.exists(stop):
    time.sleep(0.3)
    p = select.poll()
    fds = {}
    for i, s in socks.items():
        p.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
        fds[s.fileno()] = i
    for i in [fds[fd] for fd, ev in p.poll(0)]:
        socks.pop(i).close()
        open_one(i)
        opened += 1
    with open(info + ".tmp", "w") as f:
        f.write("%d %d\n" % (len(socks), opened))
    os.replace(info + ".tmp", info)
for s in socks.values():
    s.close()
"""


class TcpHolder:
    """An outsider in namespace ns holding conns TCP connections to
    target:port, spread over the source addresses srcs, saying nothing and
    reopening any the target closes (tests/t_exhaust.py, t_flood.py).  Its
    files live in tmpdir, named by tag; .proc is the Proc to clean up."""

    def __init__(self, ns, target, port, conns, srcs, tmpdir, tag):
        self.conns = conns
        self.stopfile = os.path.join(tmpdir, "holder-stop-" + tag)
        self.infofile = os.path.join(tmpdir, "holder-" + tag)
        for f in (self.stopfile, self.infofile):
            if os.path.exists(f):
                os.unlink(f)
        script = os.path.join(tmpdir, "holder.py")
        with open(script, "w") as f:
            f.write(_HOLDER_PY)
        self.proc = Proc("holder-" + tag, ["ip", "netns", "exec", ns, sys.executable, script, target,
                                           str(port), str(conns), ",".join(srcs), self.stopfile,
                                           self.infofile], os.path.join(tmpdir, "holder-%s.log" % tag))

    def counts(self):
        """(connections held now, opened in all); (0, 0) before its first pass."""
        try:
            with open(self.infofile) as f:
                held, opened = f.read().split()
            return int(held), int(opened)
        except (OSError, ValueError):
            return 0, 0

    def wait_open(self, timeout=20, share=0.9):
        """Seconds until share of the connections are held, or None."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and self.proc.alive():
            if self.counts()[0] >= share * self.conns:
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def stop(self, timeout=10):
        open(self.stopfile, "w").close()
        if self.proc.wait(timeout) is None:
            self.proc.stop()


def main_wrapper(fn):
    """Run test fn(); print PASS/FAIL; exit code 0 only on success."""
    try:
        fn()
    except TestFailure as e:
        for n in list(_nets):
            n.failed = True
        print("FAIL: %s" % e, flush=True)
        _cleanup_all()
        sys.exit(1)
    except SystemExit:
        for n in list(_nets):
            n.failed = True
        _cleanup_all()
        raise
    except BaseException:
        import traceback
        traceback.print_exc()
        for n in list(_nets):
            n.failed = True
        print("FAIL: exception", flush=True)
        _cleanup_all()
        sys.exit(1)
    _cleanup_all()
    log("PASS")
    sys.exit(0)
