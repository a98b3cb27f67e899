#!/usr/bin/env python3
"""Namespace mode, as an unprivileged user: `ipop up --mode ns ... -- CMD`
runs CMD in a new user and network namespace whose tap interface carries
the node's virtual IP.  CMD reaches a tap node's web server by its virtual
IP with no proxy settings, and the tap node reaches a server CMD runs.
/dev/net/tun may be mode 0600 on this machine: the test opens it to others
for its duration (what an admin would do to allow namespace mode) and
restores the mode afterwards.  Namespaces are prefixed "tx"."""
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import atexit

if not os.environ.get("XDG_STATE_HOME"):    # nodes' state (remembered peers) not in ~
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="ipop-test-state-")
    atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPOP = os.environ.get("IPOP", os.path.join(ROOT, "ipop"))
NS = ["tx-sw", "tx-a", "tx-b"]
procs = []


def sh(*args, check=True, timeout=30, **kw):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(args), (p.stderr or p.stdout).strip()[-300:]))
    return p


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.kill()
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main():
    tmp = tempfile.mkdtemp(prefix="ipop-t_ns-")
    os.chmod(tmp, 0o711)                # nobody must reach its own subdirectory
    tun_mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    failures = []
    try:
        cleanup()
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
        # B: a tap node (root) with a web server on its virtual IP.
        www = os.path.join(tmp, "www")
        os.mkdir(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("page-from-B\n")
        b_log = open(os.path.join(tmp, "b.log"), "w")
        procs.append(subprocess.Popen(["ip", "netns", "exec", "tx-b", IPOP, "up", "--ip", "10.128.0.2/16",
                                       "--listen", "udp://192.168.97.2:4000", "--secret-file", key,
                                       "--control", os.path.join(tmp, "b.sock")], stderr=b_log))
        procs.append(subprocess.Popen(["ip", "netns", "exec", "tx-b", "python3", "-m", "http.server", "8000",
                                       "--bind", "10.128.0.2", "--directory", www],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # A: namespace mode as nobody, with its own copy of key and binary.
        ndir = os.path.join(tmp, "nobody")
        os.mkdir(ndir, 0o700)
        nkey, nbin = os.path.join(ndir, "net.key"), os.path.join(ndir, "ipop")
        shutil.copy(key, nkey)
        shutil.copy(IPOP, nbin)
        for p in (ndir, nkey, nbin):
            os.chown(p, 65534, 65534)
        os.chmod(nkey, 0o600)
        os.chmod("/dev/net/tun", 0o666)
        script = ("sleep 2; ip -o -4 addr show ipop0; "
                  "python3 -m http.server 7000 --bind 10.128.0.7 --directory /tmp >/dev/null 2>&1 & "
                  "sleep 1; curl -s --max-time 5 http://10.128.0.2:8000/; echo curl=$?; sleep 4; kill $!")
        a_log = os.path.join(tmp, "a.log")
        t0 = time.monotonic()
        a = subprocess.Popen(["ip", "netns", "exec", "tx-a", "setpriv", "--reuid=nobody", "--regid=nogroup",
                              "--clear-groups", nbin, "up", "--mode", "ns", "--ip", "10.128.0.7/16",
                              "--listen", "udp://192.168.97.1:4000", "--bootstrap", "udp://192.168.97.2:4000",
                              "--secret-file", nkey, "--control", os.path.join(ndir, "a.sock"), "--",
                              "sh", "-c", script], stdout=subprocess.PIPE, stderr=open(a_log, "w"), text=True)
        procs.append(a)
        # Meanwhile B fetches from the server the command runs in the namespace.
        got_b = ""
        for _ in range(30):
            time.sleep(0.3)
            r = subprocess.run(["ip", "netns", "exec", "tx-b", "curl", "-s", "--max-time", "2",
                                "http://10.128.0.7:7000/"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout:
                got_b = r.stdout
                break
        out, _ = a.communicate(timeout=30)
        el = time.monotonic() - t0
        print(out)
        print("A's log tail:\n" + "".join(open(a_log).readlines()[-4:]))
        checks = [
            ("inet 10.128.0.7/16" in out, "the command saw ipop0 with 10.128.0.7/16 inside its namespace"),
            ("page-from-B" in out and "curl=0" in out, "the command reached B's server by virtual IP, no proxy"),
            (bool(got_b), "B reached the server the command runs in the namespace (listening works)"),
            (a.returncode == 0, "ipop exited with the command's status (%s) after %.1f s" % (a.returncode, el)),
            ("the command exited" in open(a_log).read(), "ipop said the command ended and left the ring"),
        ]
        for ok, msg in checks:
            print("%s: %s" % ("ok" if ok else "FAILED", msg))
            if not ok:
                failures.append(msg)
    finally:
        os.chmod("/dev/net/tun", tun_mode)
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS" if not failures else "FAIL: %d check(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), sys.exit(1)))
    sys.exit(main())
