#!/usr/bin/env python3
"""Local users on a shared host (issue 18 item 9).

Everything runs in one network namespace, hx-l (loopback only; removed at
start if left over, and on exit, failure, SIGTERM or SIGINT); the control
directory cases run in a private mount namespace with a tmpfs /tmp, so
the host's /tmp/ipop-UID is never touched.  Only processes this test
started are signalled.

 1. Control directory, as nobody with XDG_RUNTIME_DIR unset (default
    control socket /tmp/ipop-65534/ipop.sock): a pre-made ipop-65534
    owned by another user (daemon, mode 0777), a symbolic link to a
    directory anyone may write, and our own directory with mode 0777 each
    make `ipop up` exit with status 1 and one line that names --control,
    and `ipop status` too (it would talk to whoever made the directory);
    our own 0755 directory is tightened to 0700 and the node answers
    `ipop status`; so does a fresh start with no directory.
 2. SOCKS UDP ASSOCIATE on node A (user mode, SOCKS on 127.0.0.1): a
    datagram from 127.0.0.2 (another local address), sent first, is
    dropped and gets no answer; the client's own datagrams from 127.0.0.1
    are echoed by B's UDP echo (-R udp/); with a declared port, another
    port of the client's address is dropped.
 3. A runs with RLIMIT_NOFILE 160: 200 idle SOCKS connections (TCP open,
    no greeting) are held, and a legitimate SOCKS client still gets a
    CONNECT through to B's TCP echo within 5 s; A's descriptors stay
    below baseline + 64 (SOCKS_NEGOTIATING_MAX) + slack; local_evicted > 0.
 3b. Established SOCKS relays (to B's echo) until A runs out of descriptors,
    and 20 more connections waiting in the backlog: A's CPU over 2 s stays
    under 35% of a core (its SOCKS listener rests instead of spinning);
    once they close, SOCKS and status work again.
 4. 100 idle --metrics connections are held: `ipop status` still answers
    (5 of 5), and a new scrape gets HTTP 200.
"""
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import TestFailure, check, log, ipop_bin, Proc, Lab, ns_add, wait_for, up_conns, timed_status  # noqa: E402

NS = "hx-l"
VNET = "10.232.0.%d"
SOCKS_PORT = 1080
METRICS_PORT = 9100
ECHO_T, ECHO_U = 9007, 9053
NOBODY = 65534
OTHER = 1                              # daemon: "another user"
IDLE_SOCKS = 200
IDLE_METRICS = 100
A_NOFILE = 160

lab = None                             # the Local running
tmp = None                             # its dir


def enter_ns():
    """This process (and every thread and child it makes from now on) runs
    in hx-l."""
    ns_add(NS)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/run/netns/" + NS, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:        # CLONE_NEWNET
        raise TestFailure("setns %s: %s" % (NS, os.strerror(ctypes.get_errno())))
    os.close(fd)


# ---- 1. the control directory ---------------------------------------------

# Runs as root in a private mount namespace: a tmpfs on /tmp, then each
# case as nobody.  Prints one JSON line per case.
CTLDIR = r'''
import json, os, shutil, subprocess, sys, time
ipop_src, nobody, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(ipop_src, "rb") as f:
    binary = f.read()                   # (it may live in the /tmp we hide)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "hxtmp", "/tmp"], check=True)
ipop = "/tmp/ipop-bin"
with open(ipop, "wb") as f:
    f.write(binary)
os.chmod(ipop, 0o755)
os.mkdir("/tmp/k", 0o755)
os.chown("/tmp/k", nobody, nobody)
env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
env["XDG_STATE_HOME"] = "/tmp/k/state"
asnobody = ["setpriv", "--reuid=%d" % nobody, "--regid=%d" % nobody, "--clear-groups"]
subprocess.run(asnobody + [ipop, "genkey", "--out", "/tmp/k/net.key"], check=True, env=env)
d = "/tmp/ipop-%d" % nobody

def reset():
    if os.path.islink(d) or os.path.isfile(d):
        os.unlink(d)
    elif os.path.isdir(d):
        shutil.rmtree(d)
    if os.path.isdir("/tmp/elsewhere"):
        shutil.rmtree("/tmp/elsewhere")

def up(name):
    argv = asnobody + [ipop, "up", "--secret-file", "/tmp/k/net.key", "--mode", "none",
                       "--listen", "udp://127.0.0.1:4190"]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    answered, t0 = False, time.monotonic()
    while time.monotonic() - t0 < 5 and p.poll() is None:
        r = subprocess.run(asnobody + [ipop, "status"], env=env, capture_output=True)
        if r.returncode == 0:
            answered = True
            break
        time.sleep(0.1)
    if p.poll() is None:
        p.terminate()
        p.wait(5)
        rc = None
    else:
        rc = p.returncode
    err = p.stderr.read().decode(errors="replace")
    mode = oct(os.lstat(d).st_mode & 0o7777) if os.path.lexists(d) else None
    st = subprocess.run(asnobody + [ipop, "status"], env=env, capture_output=True, text=True)
    print(json.dumps({"case": name, "rc": rc, "stderr": err, "answered": answered, "mode": mode,
                      "status_rc": st.returncode, "status_err": st.stderr}), flush=True)

reset(); os.mkdir(d); os.chown(d, other, other); os.chmod(d, 0o777); up("other_user")
reset(); os.mkdir("/tmp/elsewhere"); os.chmod("/tmp/elsewhere", 0o777); os.symlink("/tmp/elsewhere", d); up("symlink")
reset(); os.mkdir(d); os.chown(d, nobody, nobody); os.chmod(d, 0o777); up("ours_0777")
reset(); os.mkdir(d); os.chown(d, nobody, nobody); os.chmod(d, 0o755); up("ours_0755")
reset(); up("none")
'''


def step_ctl_dir():
    log("step 1: the control directory, as nobody without XDG_RUNTIME_DIR")
    script = os.path.join(tmp, "ctldir.py")
    with open(script, "w") as f:
        f.write(CTLDIR)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, script,
                        ipop_bin(), str(NOBODY), str(OTHER)], capture_output=True, text=True, timeout=120)
    cases = {}
    for line in r.stdout.splitlines():
        try:
            c = json.loads(line)
            cases[c["case"]] = c
        except ValueError:
            pass
    check(len(cases) == 5, "the control directory cases did not all run: rc=%d %s" % (r.returncode, r.stderr[-500:]))
    for name in ("other_user", "symlink", "ours_0777"):
        c = cases[name]
        lines = [ln for ln in c["stderr"].splitlines() if ln.strip()]
        lab.check(c["rc"] == 1 and len(lines) == 1 and "--control" in lines[0],
                  "%s: exit %s, %d line(s): %s" % (name, c["rc"], len(lines), " | ".join(lines)[:200]))
        lines = [ln for ln in c["status_err"].splitlines() if ln.strip()]
        lab.check(c["status_rc"] == 1 and len(lines) == 1 and "--control" in lines[0],
                  "%s: `ipop status` will not talk there either: exit %s, %d line(s)"
                  % (name, c["status_rc"], len(lines)))
    for name in ("ours_0755", "none"):
        c = cases[name]
        lab.check(c["answered"] and c["mode"] == "0o700",
                  "%s: the node starts and answers status; directory mode %s" % (name, c["mode"]))


# ---- nodes A and B ---------------------------------------------------------

ECHO = r'''
import socket, sys, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", int(sys.argv[1]))); t.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", int(sys.argv[2])))
def udp():
    while True:
        d, a = u.recvfrom(65536)
        u.sendto(d, a)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = t.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def ctl(name):
    return os.path.join(tmp, name + ".sock")


def start_a(nofile=None):
    argv = ["prlimit", "--nofile=%d:%d" % (nofile, nofile)] if nofile else []
    argv += [ipop_bin(), "up", "--secret-file", lab.secret(), "--mode", "user", "--ip", VNET % 1 + "/16",
             "--listen", "udp://127.0.0.1:4101", "--socks", "127.0.0.1:%d" % SOCKS_PORT,
             "--metrics", "127.0.0.1:%d" % METRICS_PORT, "--control", ctl("a")]
    p = Proc("a", argv, os.path.join(tmp, "a.log"))
    check(wait_for(lambda: status("a")[0], 10) is not None, "A did not start:\n" + p.log_tail())
    return p


def start_b():
    argv = [ipop_bin(), "up", "--secret-file", lab.secret(), "--mode", "user", "--ip", VNET % 2 + "/16",
            "--listen", "udp://127.0.0.1:4102", "--bootstrap", "udp://127.0.0.1:4101", "--socks", "off",
            "-R", "7:127.0.0.1:%d" % ECHO_T, "-R", "udp/53:127.0.0.1:%d" % ECHO_U, "--control", ctl("b")]
    return Proc("b", argv, os.path.join(tmp, "b.log"))


def status(name, timeout=5):
    return timed_status(ctl(name), timeout)


def recvn(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            raise OSError("closed after %d of %d bytes" % (len(b), n))
        b += d
    return b


def socks_greet(s):
    s.sendall(b"\x05\x01\x00")
    if recvn(s, 2) != b"\x05\x00":
        raise OSError("greeting refused")


def udp_assoc(port=0):
    s = socket.create_connection(("127.0.0.1", SOCKS_PORT), 5)
    s.settimeout(5)
    socks_greet(s)
    s.sendall(b"\x05\x03\x00\x01" + bytes(4) + struct.pack(">H", port))
    r = recvn(s, 10)
    if r[:2] != b"\x05\x00":
        raise OSError("UDP ASSOCIATE reply %r" % r)
    return s, (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])


def udp_hdr(ip, port):
    return b"\x00\x00\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", port)


def udp_sock(addr, port=0):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((addr, port))
    u.settimeout(0.5)
    return u


def udp_ask(u, relay, payload, tries=6):
    """Send through the relay until the echo comes back; the reply's data."""
    for _ in range(tries):
        u.sendto(udp_hdr(VNET % 2, 53) + payload, relay)
        try:
            d, _ = u.recvfrom(65536)
            return d[10:]
        except socket.timeout:
            pass
    return None


def step_udp_associate():
    log("step 2: SOCKS UDP ASSOCIATE takes datagrams only from the client")
    tcp, relay = udp_assoc()
    intruder = udp_sock("127.0.0.2")
    intruder.sendto(udp_hdr(VNET % 2, 53) + b"intruder", relay)
    time.sleep(0.3)
    client = udp_sock("127.0.0.1")
    got = udp_ask(client, relay, b"client-1")
    lab.check(got == b"client-1", "the client's own datagram is echoed (%r)" % got)
    intruder.sendto(udp_hdr(VNET % 2, 53) + b"intruder-2", relay)
    try:
        d, _ = intruder.recvfrom(65536)
        lab.check(False, "another local address got an answer: %r" % d[:40])
    except socket.timeout:
        lab.check(True, "datagrams from 127.0.0.2 get no answer")
    client.settimeout(0.5)
    try:
        d, _ = client.recvfrom(65536)
        lab.check(False, "the client received a stray datagram: %r" % d[:40])
    except socket.timeout:
        lab.check(True, "the client receives nothing it did not send")
    tcp.close()
    client.close()
    # a declared port: another port of the client's own address is dropped
    declared = udp_sock("127.0.0.1")
    tcp, relay = udp_assoc(declared.getsockname()[1])
    other = udp_sock("127.0.0.1")
    got_other = udp_ask(other, relay, b"other-port", tries=2)
    got = udp_ask(declared, relay, b"declared")
    lab.check(got_other is None and got == b"declared",
              "with a declared port: that port is echoed (%r), another port dropped (%r)" % (got, got_other))
    tcp.close()


def n_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def socks_echo(timeout=5.0):
    """A SOCKS CONNECT to B's TCP echo; True if bytes come back in time."""
    try:
        s = socket.create_connection(("127.0.0.1", SOCKS_PORT), timeout)
        s.settimeout(timeout)
        socks_greet(s)
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(VNET % 2) + struct.pack(">H", 7))
        r = recvn(s, 10)
        if r[1] != 0:
            return False
        s.sendall(b"hello-through-socks")
        ok = recvn(s, 19) == b"hello-through-socks"
        s.close()
        return ok
    except OSError:
        return False


def drops(st, key):
    return int(((st or {}).get("drops") or {}).get(key, 0))


def step_idle_socks(a):
    log("step 3: %d idle SOCKS connections, A at RLIMIT_NOFILE %d" % (IDLE_SOCKS, A_NOFILE))
    base = n_fds(a.pid)
    idle = []
    for _ in range(IDLE_SOCKS):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", SOCKS_PORT))
        idle.append(s)
    time.sleep(0.5)
    t0 = time.monotonic()
    ok = socks_echo()
    lab.check(ok, "a legitimate SOCKS client gets through to B's echo (%.2f s)" % (time.monotonic() - t0))
    fds = n_fds(a.pid)
    lab.check(fds <= base + 64 + 8, "A holds %d descriptors (baseline %d, negotiating cap 64)" % (fds, base))
    st, _ = status("a")
    lab.check(drops(st, "local_evicted") > 0, "A counts evicted SOCKS clients (%d)" % drops(st, "local_evicted"))
    for s in idle:
        s.close()


def socks_held(timeout=1.0):
    """An established SOCKS relay to B's echo (kept open), or None."""
    try:
        s = socket.create_connection(("127.0.0.1", SOCKS_PORT), timeout)
        s.settimeout(timeout)
        socks_greet(s)
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(VNET % 2) + struct.pack(">H", 7))
        if recvn(s, 10)[1] != 0:
            s.close()
            return None
        return s
    except OSError:
        return None


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def step_socks_fd_limit(a):
    log("step 3b: established SOCKS relays up to A's fd limit (%d)" % A_NOFILE)
    held = []
    while len(held) < A_NOFILE:
        s = socks_held()
        if s is None:
            break
        held.append(s)
    waiting = []
    for _ in range(20):             # these wait in the listener's backlog
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", SOCKS_PORT))
        waiting.append(s)
    time.sleep(0.5)
    c0, t0 = cpu_ticks(a.pid), time.monotonic()
    time.sleep(2.0)
    cpu = (cpu_ticks(a.pid) - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
    lab.check(len(held) < A_NOFILE and cpu < 0.35, "%d relays reach A's fd limit; A's CPU there: %.0f%% "
              "of a core (no spin)" % (len(held), 100 * cpu))
    for s in held + waiting:
        s.close()
    ok = wait_for(socks_echo, 10) is not None
    st, _ = status("a")
    lab.check(ok and st is not None and drops(st, "fd_limit") > 0,
              "after they close, SOCKS and status work again (fd_limit drops: %d)" % drops(st, "fd_limit"))


def step_idle_metrics():
    log("step 4: %d idle --metrics connections" % IDLE_METRICS)
    idle = []
    for _ in range(IDLE_METRICS):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", METRICS_PORT))
        idle.append(s)
    time.sleep(0.5)
    answered, worst = 0, 0.0
    for _ in range(5):
        st, dt = status("a", timeout=5)
        answered += st is not None
        worst = max(worst, dt)
        time.sleep(0.1)
    lab.check(answered == 5 and worst < 2.0, "ipop status answers %d of 5 (slowest %.2f s)" % (answered, worst))
    code = None
    try:
        s = socket.create_connection(("127.0.0.1", METRICS_PORT), 3)
        s.settimeout(3)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        code = s.recv(64).split(b" ")[1]
        s.close()
    except (OSError, IndexError):
        pass
    lab.check(code == b"200", "a new scrape gets HTTP %r" % code)
    for s in idle:
        s.close()


class Local(Lab):
    name, prefix, tools = "t_local", NS, ("ip", "prlimit", "setpriv", "unshare", "mount")

    def __init__(self):
        global lab, tmp
        Lab.__init__(self)
        os.chmod(self.dir, 0o755)
        lab, tmp = self, self.dir

    def body(self):
        enter_ns()
        self.step("1 control directory", step_ctl_dir)
        self.step("2 nodes A and B", self.start_nodes, fatal=True)
        self.step("2 UDP ASSOCIATE", step_udp_associate)
        self.step("3 idle SOCKS", lambda: step_idle_socks(self.a))
        self.step("3 SOCKS at the fd limit", lambda: step_socks_fd_limit(self.a))
        self.step("4 idle metrics", step_idle_metrics)

    def start_nodes(self):
        with open(os.path.join(tmp, "echo.py"), "w") as f:
            f.write(ECHO)
        Proc("echo", [sys.executable, os.path.join(tmp, "echo.py"), str(ECHO_T), str(ECHO_U)],
             os.path.join(tmp, "echo.log"))
        self.a = start_a(nofile=A_NOFILE)
        start_b()
        check(wait_for(lambda: up_conns(status("a")[0]), 15) is not None, "B did not link A")
        check(wait_for(socks_echo, 15) is not None, "no SOCKS path from A to B's echo")


if __name__ == "__main__":
    Local.main()
