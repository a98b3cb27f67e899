#!/usr/bin/env python3
"""Namespace mode, as an unprivileged user (nobody), against a tap node B
that serves a web page on its virtual IP.  Namespaces are prefixed "tx".

 1. /dev/net/tun at mode 0600 (as on this machine, whatever it was):
    `ipop up --mode ns` with no command keeps a namespace whose ipop0 is a
    veth pair (status: mode ns, device veth).  `ipop exec` runs programs in
    it as nobody (uid 65534, not 0): they see ipop0 with the virtual IP,
    ping B, fetch B's page with no proxy, and serve a page B fetches;
    exec passes exit statuses through (7, and 127 for a missing command).
    A UDP_SEGMENT send from the namespace (veth hands it over uncut) arrives
    as its datagrams.
    -R 8022:127.0.0.1:8000 exposes a server of A's host (host namespace,
    127.0.0.1) at A's virtual IP: B fetches a 5 MB file from it intact, and
    a connection to -R 8023 whose service is down is closed, not hung.
    Another user (daemon) cannot enter the namespace, nor can root.
 2. /dev/net/tun at mode 0666 (what an admin would do): `ipop up --mode ns
    ... -- CMD` runs CMD in a namespace whose ipop0 is a tap (status:
    device tap); CMD reaches B and serves B; ipop exits with CMD's status.

/dev/net/tun's mode is restored afterwards."""
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import atexit
import hashlib
import json

if not os.environ.get("XDG_STATE_HOME"):    # nodes' state (remembered peers) not in ~
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="ipop-test-state-")
    atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPOP = os.environ.get("IPOP", os.path.join(ROOT, "ipop"))
NS = ["tx-sw", "tx-a", "tx-b"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", "-u", "XDG_RUNTIME_DIR"]
procs = []
failures = []
# A receiver that prints the sizes of the datagrams it gets, sorted (argv: ip port max).
UDP_RX = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], int(sys.argv[2])))
sizes = []
u.settimeout(8)
try:
    while len(sizes) < int(sys.argv[3]):
        sizes.append(len(u.recv(65535)))
        u.settimeout(3)
except socket.timeout:
    pass
print(" ".join(map(str, sorted(sizes))))
"""
# A plain 500-byte datagram, then 2800 bytes with UDP_SEGMENT 1000 (argv: ip port).
USO_TX = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((sys.argv[1], int(sys.argv[2])))
u.send(b"p" * 500)
u.setsockopt(socket.SOL_UDP, 103, 1000)     # UDP_SEGMENT
u.send(b"s" * 2800)
"""


def sh(*args, check=True, timeout=30, **kw):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(args), (p.stderr or p.stdout).strip()[-300:]))
    return p


def report(ok, msg):
    print("%s: %s" % ("ok" if ok else "FAILED", msg), flush=True)
    if not ok:
        failures.append(msg)


def wait_for(fn, timeout, every=0.2):
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > end:
            return v
        time.sleep(every)


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.kill()
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def lab(tmp):
    """tx-a and tx-b on a bridge; B a tap node (root) serving a page."""
    sh("ip", "netns", "add", "tx-sw")
    sh("ip", "-n", "tx-sw", "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", "tx-sw", "link", "set", "br0", "up")
    for i, ns in ((1, "tx-a"), (2, "tx-b")):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "txv%d" % i, "netns", "tx-sw", "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", "tx-sw", "link", "set", "txv%d" % i, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", "192.168.97.%d/24" % i, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    key = os.path.join(tmp, "net.key")
    sh(IPOP, "genkey", "--out", key)
    www = os.path.join(tmp, "www")
    os.mkdir(www)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("page-from-B\n")
    procs.append(subprocess.Popen(["ip", "netns", "exec", "tx-b", IPOP, "up", "--ip", "10.128.0.2/16",
                                   "--listen", "udp://192.168.97.2:4000", "--secret-file", key,
                                   "--control", os.path.join(tmp, "b.sock")],
                                  stderr=open(os.path.join(tmp, "b.log"), "w")))
    procs.append(subprocess.Popen(["ip", "netns", "exec", "tx-b", "python3", "-m", "http.server", "8000",
                                   "--bind", "10.128.0.2", "--directory", www],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    # nobody's own directory, key and binary, as a user would have them
    ndir = os.path.join(tmp, "nobody")
    os.mkdir(ndir, 0o700)
    nkey, nbin = os.path.join(ndir, "net.key"), os.path.join(ndir, "ipop")
    shutil.copy(key, nkey)
    shutil.copy(IPOP, nbin)
    for p in (ndir, nkey, nbin):
        os.chown(p, 65534, 65534)
    os.chmod(nkey, 0o600)
    return ndir, nkey, nbin


def b_fetches(url, timeout):
    def get():
        r = subprocess.run(["ip", "netns", "exec", "tx-b", "curl", "-s", "--max-time", "2", url],
                           capture_output=True, text=True)
        return r.stdout if r.returncode == 0 and r.stdout else ""
    return wait_for(get, timeout, 0.3)


def up_args(nbin, nkey, ctl, vip, extra=()):
    return ["ip", "netns", "exec", "tx-a"] + NOBODY + [
        "HOME=" + os.path.dirname(ctl), nbin, "up", "--mode", "ns", "--ip", vip,
        "--listen", "udp://192.168.97.1:4000", "--bootstrap", "udp://192.168.97.2:4000",
        "--secret-file", nkey, "--control", ctl] + list(extra)


def status(nbin, ctl):
    r = subprocess.run(["ip", "netns", "exec", "tx-a"] + NOBODY + [nbin, "status", "--json", "--control", ctl],
                       capture_output=True, text=True, timeout=10)
    try:
        return json.loads(r.stdout) if r.returncode == 0 else None
    except ValueError:
        return None


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


# B's side of the hostile member's connections (argv: what to do, port).
HOSTILE = """
import socket, struct, sys, time
what, port = sys.argv[1], int(sys.argv[2])
def conn():
    return socket.create_connection(("10.128.0.7", port), 5)
if what == "hang":          # a request while the node's connect to the service hangs
    c = conn(); c.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); c.settimeout(15)
    t = time.monotonic()
    try:
        print("closed" if c.recv(100) == b"" else "answered", round(time.monotonic() - t, 1))
    except OSError as e:
        print("closed", round(time.monotonic() - t, 1))
elif what == "rst":         # half close, then a reset, to a service that stays silent
    c = conn(); c.shutdown(socket.SHUT_WR); time.sleep(0.2)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close(); print("done")
elif what == "hold":        # as many connections as will stay open
    held = []
    for i in range(40):
        c = conn(); c.settimeout(1); held.append(c)
    time.sleep(1.5)
    alive = 0
    for c in held:
        try:
            alive += c.recv(1) != b""
        except socket.timeout:
            alive += 1
        except OSError:
            pass
    print(alive)
"""


def hostile_member(pid, nbin, ctl):
    """A member's connections to -R ports: to a service whose connect hangs
    (SYNs dropped: -R 8024 to port 9), half closed then reset (-R 8025 to a
    service that never answers), and 40 held at once: the node neither
    spins nor keeps more than FWD_PIPES_PER_SOURCE (32) from one source."""
    sh("ip", "netns", "exec", "tx-a", "nft", "-f", "-", input="add table ip tx\n"
       "add chain ip tx out { type filter hook output priority 0; }\n"
       "add rule ip tx out tcp dport 9 drop\n")
    silent = subprocess.Popen(["ip", "netns", "exec", "tx-a", "python3", "-c",
                               "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
                               "socket.SO_REUSEADDR,1); s.bind(('127.0.0.1',8002)); s.listen(64); c=[]\n"
                               "while True: c.append(s.accept())"])
    procs.append(silent)
    hang = subprocess.Popen(["ip", "netns", "exec", "tx-b", "python3", "-c", HOSTILE, "hang", "8024"],
                            stdout=subprocess.PIPE, text=True)
    procs.append(hang)
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(2)       # a window to measure the node's CPU in while the connect hangs
    busy = (cpu_s(pid) - c0) / (time.monotonic() - t0)
    out, _ = hang.communicate(timeout=20)
    report(busy < 0.2 and out.startswith("closed") and 9 <= float(out.split()[1]) <= 14,
           "-R 8024, the service's connect hanging, a request sent: the node at %.0f %% CPU meanwhile, "
           "the connection closed after %s s (deadline 10 s)" % (100 * busy, out.split()[1:] or out))
    r = subprocess.run(["ip", "netns", "exec", "tx-b", "python3", "-c", HOSTILE, "rst", "8025"],
                       capture_output=True, text=True, timeout=20)
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(2)
    busy = (cpu_s(pid) - c0) / (time.monotonic() - t0)
    report(r.returncode == 0 and busy < 0.2, "-R 8025, half closed then reset, the service silent: the node "
           "at %.0f %% CPU afterwards" % (100 * busy))
    r = subprocess.run(["ip", "netns", "exec", "tx-b", "python3", "-c", HOSTILE, "hold", "8025"],
                       capture_output=True, text=True, timeout=60)
    st = status(nbin, ctl) or {}
    refused = ((st.get("drops") or {}).get("fwd_refused"))
    report(r.stdout.strip() and int(r.stdout.split()[0]) <= 32 and refused,
           "40 connections held from one member to -R 8025: %s stay open (at most 32 per source), "
           "fwd_refused %s" % (r.stdout.strip(), refused))
    silent.kill()
    sh("ip", "netns", "exec", "tx-a", "nft", "delete", "table", "ip", "tx")


def step_veth_exec(tmp, ndir, nkey, nbin):
    print("== 1. tun 0600: ns mode with no command, ipop exec, veth", flush=True)
    os.chmod("/dev/net/tun", 0o600)
    ctl = os.path.join(ndir, "a.sock")
    a_log = os.path.join(tmp, "a1.log")
    host_www = os.path.join(tmp, "host-www")
    os.mkdir(host_www)
    blob = os.urandom(5 << 20)
    with open(os.path.join(host_www, "blob"), "wb") as f:
        f.write(blob)
    procs.append(subprocess.Popen(["ip", "netns", "exec", "tx-a", "python3", "-m", "http.server", "8000",
                                   "--bind", "127.0.0.1", "--directory", host_www],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    a = subprocess.Popen(up_args(nbin, nkey, ctl, "10.128.0.7/16", ["-R", "8022:127.0.0.1:8000",
                                                                    "-R", "8023:127.0.0.1:8001",
                                                                    "-R", "8024:127.0.0.1:9",
                                                                    "-R", "8025:127.0.0.1:8002"]),
                         stdout=subprocess.DEVNULL, stderr=open(a_log, "w"))
    procs.append(a)
    st = wait_for(lambda: status(nbin, ctl), 15)
    iface = (st or {}).get("interface") or {}
    report(st and st.get("mode") == "ns" and iface.get("device") == "veth",
           "status: mode %r, device %r (want ns, veth)" % ((st or {}).get("mode"), iface.get("device")))

    def ex(*cmd, user=NOBODY, timeout=20):
        return subprocess.run(["ip", "netns", "exec", "tx-a"] + user + [nbin, "exec", "--control", ctl, "--"]
                              + list(cmd), capture_output=True, text=True, timeout=timeout)
    r = ex("sh", "-c", "id -u; ip -o -4 addr show ipop0")
    report(r.returncode == 0 and r.stdout.split()[:1] == ["65534"] and "inet 10.128.0.7/16" in r.stdout,
           "exec: a program runs as nobody (uid 65534) and sees ipop0 with 10.128.0.7/16: %r %r"
           % (r.stdout.strip()[:120], r.stderr.strip()[-200:]))
    r = wait_for(lambda: (lambda x: x if x.returncode == 0 else None)(ex("ping", "-n", "-c", "1", "-W", "2",
                                                                         "10.128.0.2")), 20, 0.5)
    report(r is not None, "exec: nobody pings B's virtual IP from the namespace")
    r = wait_for(lambda: (lambda x: x if "page-from-B" in x.stdout else None)(
        ex("curl", "-s", "--max-time", "3", "http://10.128.0.2:8000/")), 20, 0.3)
    report(r is not None, "exec: curl reaches B's page by virtual IP, no proxy")
    srv = subprocess.Popen(["ip", "netns", "exec", "tx-a"] + NOBODY + [
        nbin, "exec", "--control", ctl, "--", "python3", "-m", "http.server", "7000", "--bind", "10.128.0.7",
        "--directory", ndir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(srv)
    got = b_fetches("http://10.128.0.7:7000/", 20)
    report("a.sock" in got, "B fetches a listing from a server started with ipop exec (listening works)")
    srv.kill()
    got = os.path.join(tmp, "got-blob")

    def fetch_blob():
        r = subprocess.run(["ip", "netns", "exec", "tx-b", "curl", "-s", "--max-time", "10", "-o", got,
                            "http://10.128.0.7:8022/blob"], capture_output=True, text=True)
        return r.returncode == 0 and os.path.exists(got) and os.path.getsize(got) == len(blob)
    ok = wait_for(fetch_blob, 20, 0.5)
    same = ok and hashlib.sha256(open(got, "rb").read()).digest() == hashlib.sha256(blob).digest()
    report(bool(same), "-R 8022:127.0.0.1:8000: B fetches a 5 MB file from A's host's server at A's virtual IP, "
           "intact")
    t0 = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", "tx-b", "curl", "-s", "--max-time", "10",
                        "http://10.128.0.7:8023/"], capture_output=True, text=True)
    report(r.returncode in (52, 56) and time.monotonic() - t0 < 5,
           "-R 8023 to a service that is down: the connection is closed (curl %d) in %.1f s"
           % (r.returncode, time.monotonic() - t0))
    # a UDP_SEGMENT send (as QUIC stacks make): 2800 bytes cut at 1000 arrive as 3 datagrams
    rx = subprocess.Popen(["ip", "netns", "exec", "tx-b", "python3", "-c", UDP_RX, "10.128.0.2", "7001", "4"],
                          stdout=subprocess.PIPE, text=True)
    procs.append(rx)
    wait_for(lambda: "10.128.0.2:7001" in sh("ip", "netns", "exec", "tx-b", "ss", "-Hlun", check=False).stdout, 5,
             0.05)
    r = ex("python3", "-c", USO_TX, "10.128.0.2", "7001")
    try:
        got, _ = rx.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        rx.kill()
        got = rx.communicate()[0]
    report(r.returncode == 0 and got.split() == ["500", "800", "1000", "1000"],
           "a UDP_SEGMENT send from the namespace (2800 bytes at 1000) arrives as 3 datagrams, a plain one "
           "as 1: sizes %s (sender: %s)" % (got.split(), (r.stderr or "ok").strip()[-120:]))
    r = ex(nbin, "exec", "--control", ctl, "--", "sh", "-c", "ip -o -4 addr show ipop0 | wc -l")
    report(r.returncode == 0 and r.stdout.strip() == "1",
           "exec from inside the namespace (an ssh login's ipop exec under mpirun) runs there too: %r %r"
           % (r.stdout.strip(), r.stderr.strip()[-120:]))
    hostile_member(a.pid, nbin, ctl)
    r = ex("sh", "-c", "exit 7")
    report(r.returncode == 7, "exec passes the command's exit status through (%d, want 7)" % r.returncode)
    r = ex("no-such-command-here")
    report(r.returncode == 127, "exec of a missing command exits 127 (%d): %s" % (r.returncode, r.stderr.strip()))
    mark = os.path.join(tmp, "entered-by-daemon")
    os.chmod(tmp, 0o777)
    r = ex("touch", mark, user=["setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups"])
    os.chmod(tmp, 0o711)
    report(r.returncode != 0 and not os.path.exists(mark),
           "another user (daemon) cannot enter nobody's namespace (exit %d: %s)" % (r.returncode,
                                                                                 r.stderr.strip()[-120:]))
    # root may reach the socket, but is refused: its process in nobody's user
    # namespace would keep uid 0 under nobody's ptrace
    mark = os.path.join(tmp, "entered-by-root")
    r = ex("touch", mark, user=[])
    report(r.returncode == 1 and not os.path.exists(mark) and "for its owner" in r.stderr,
           "root cannot enter nobody's namespace either (exit %d: %s)" % (r.returncode, r.stderr.strip()[-120:]))
    a.send_signal(signal.SIGTERM)
    try:
        rc = a.wait(timeout=15)
    except subprocess.TimeoutExpired:
        rc = None
    report(rc == 0, "the node leaves on SIGTERM and exits 0 (%r)" % rc)
    print("A's log tail:\n" + "".join(open(a_log).readlines()[-3:]))


def step_tap_command(tmp, ndir, nkey, nbin):
    print("== 2. tun 0666: ns mode with a command, tap", flush=True)
    os.chmod("/dev/net/tun", 0o666)
    ctl = os.path.join(ndir, "a2.sock")
    script = ("ip -o -4 addr show ipop0; "
              "python3 -m http.server 7000 --bind 10.128.0.8 --directory /tmp >/dev/null 2>&1 & "
              "for i in $(seq 50); do curl -s --max-time 2 http://10.128.0.2:8000/ && break; sleep 0.2; done; "
              "echo curl=$?; for i in $(seq 100); do [ -e %s ] && break; sleep 0.1; done; kill $!"
              % os.path.join(ndir, "b-done"))
    a_log = os.path.join(tmp, "a2.log")
    t0 = time.monotonic()
    a = subprocess.Popen(up_args(nbin, nkey, ctl, "10.128.0.8/16") + ["--", "sh", "-c", script],
                         stdout=subprocess.PIPE, stderr=open(a_log, "w"), text=True)
    procs.append(a)
    st = wait_for(lambda: status(nbin, ctl), 15)
    report(((st or {}).get("interface") or {}).get("device") == "tap", "status: device tap with /dev/net/tun open")
    got_b = b_fetches("http://10.128.0.8:7000/", 20)
    open(os.path.join(ndir, "b-done"), "w").close()
    out, _ = a.communicate(timeout=30)
    el = time.monotonic() - t0
    print(out)
    report("inet 10.128.0.8/16" in out, "the command saw ipop0 with 10.128.0.8/16 inside its namespace")
    report("page-from-B" in out and "curl=0" in out, "the command reached B's server by virtual IP, no proxy")
    report(bool(got_b), "B reached the server the command runs in the namespace (listening works)")
    report(a.returncode == 0, "ipop exited with the command's status (%s) after %.1f s" % (a.returncode, el))
    report("the command exited" in open(a_log).read(), "ipop said the command ended and left the ring")


def main():
    tmp = tempfile.mkdtemp(prefix="ipop-t_ns-")
    os.chmod(tmp, 0o711)                # nobody must reach its own subdirectory
    tun_mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    try:
        cleanup()
        ndir, nkey, nbin = lab(tmp)
        step_veth_exec(tmp, ndir, nkey, nbin)
        step_tap_command(tmp, ndir, nkey, nbin)
    except Exception as e:              # a broken step is a failure, not a traceback
        report(False, "step failed: %s: %s" % (type(e).__name__, e))
    finally:
        os.chmod("/dev/net/tun", tun_mode)
        cleanup()
        if failures:
            for f in ("a1.log", "a2.log", "b.log"):
                p = os.path.join(tmp, f)
                if os.path.exists(p):
                    print("---- %s (tail)\n%s" % (f, "".join(open(p).readlines()[-15:])))
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS" if not failures else "FAIL: %d check(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), sys.exit(1)))
    sys.exit(main())
