#!/usr/bin/env python3
"""The README's "Three hosts in five minutes", run as written.

Extracts every fenced block whose info string is `sh three-hosts-VARIANT:HOST`
from README.md (VARIANT tap, user or ns; HOST h1, h2, h3, or h3-try for the
commands a user types once the network is up) and runs each host's block in
its own network namespace, the three joined by a bridge, as a user would run
them on three machines:

  tap   as root (`sudo` is the identity): ping between the tap interfaces,
        `ipop resolve`, `ipop status`;
  user  as an unprivileged user (nobody, with a shell and a home in this
        test's mount namespaces): user-mode nodes, each host's own sshd on
        127.0.0.1:22 exposed with -R; h3-try's ssh through `ipop nc` must
        print the remote hosts' names;
  ns    as the unprivileged user, with a /dev/net/tun users may not open
        (mode 0600, in the hosts' private mounts): namespace-mode nodes
        (veth) with each host's own sshd exposed by -R 22; h3-try compiles
        docs/mpi_check.c, copies it with scp under `ipop exec`, and runs it
        with one `mpirun` on all three hosts: every rank on its own host's
        ipop0, `mpi_check: OK`.  The sshds set XDG_RUNTIME_DIR as
        pam_systemd would, so `ipop exec` in a login finds the node.

Then the Troubleshooting section: the user's mistakes in ERROR_CASES are
made on host 1, and the one line each prints must be quoted word for word
in that section, with the documented exit code.

Only `HOST1=...` lines are rewritten (to host 1's bridge address); a block
that needs anything else to run here fails the test, so the README cannot
drift from the program.  Each host runs in a fresh directory that is its
HOME and working directory; net.key is copied from host 1 to the others
once host 1's node is up (and mpi_check.c given to host 3, as the README
says).

Needs root.  Namespaces and interfaces are prefixed "tr"; everything is
removed on exit.  Prints PASS/FAIL lines; exits 1 on any failure."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPOP = os.path.abspath(os.environ.get("IPOP", os.path.join(ROOT, "ipop")))
README = os.environ.get("IPOP_README", os.path.join(ROOT, "README.md"))  # a README to check
SW, HOSTS = "tr-sw", ["tr-h1", "tr-h2", "tr-h3"]
UNDER = "192.168.71.%d"
NOBODY = 65534
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T0 = time.monotonic()
procs = []                   # Popen objects, each its own process group
made_dirs = []               # system directories this test created, removed at the end
results = []


def log(*a):
    print("[%6.1fs] %s" % (time.monotonic() - T0, " ".join(str(x) for x in a)), flush=True)


def report(ok, msg):
    results.append((ok, msg))
    print("%s: %s" % ("PASS" if ok else "FAIL", msg), flush=True)
    return ok


def sh(*args, check=True, timeout=30):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(args), (p.stderr or p.stdout).strip()[-300:]))
    return p


# ---------------------------------------------------------------- README blocks

BLOCK = re.compile(r"^```sh three-hosts-(\w+):(h\d(?:-try)?)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def readme_blocks():
    blocks = {}
    for m in BLOCK.finditer(open(README).read()):
        blocks[(m.group(1), m.group(2))] = m.group(3)
    return blocks


def localize(text, where):
    """Point HOST1= at host 1's bridge address; nothing else is changed."""
    out, n = re.subn(r"^HOST1=\S+", "HOST1=%s" % UNDER % 1, text, flags=re.M)
    if where in ("h2", "h3") and n != 1:
        raise RuntimeError("block %s has no 'HOST1=...' line (needed to map it onto this test's hosts)"
                           % where)
    left = re.findall(r"\b(?:192\.0\.2|198\.51\.100|203\.0\.113)\.\d+\b", out)
    if left:
        raise RuntimeError("block %s uses %s outside HOST1=, which this test cannot map" % (where, left))
    return out


# ---------------------------------------------------------------- namespaces

def cleanup():
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    for ns in HOSTS + [SW]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    while made_dirs:
        try:
            os.rmdir(made_dirs.pop())
        except OSError:
            pass


def underlay():
    cleanup()
    sh("ip", "netns", "add", SW)
    sh("ip", "-n", SW, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", SW, "link", "set", "br0", "up")
    for i, ns in enumerate(HOSTS, 1):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "trv%d" % i, "netns", SW, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", SW, "link", "set", "trv%d" % i, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", UNDER % i + "/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def q(s):
    return "'" + s.replace("'", "'\\''") + "'"


class Host:
    """One machine: a namespace, a home directory, a user."""

    def __init__(self, tmp, variant, i, user):
        self.i, self.ns, self.name = i, HOSTS[i - 1], "tr-h%d" % i
        self.user = user                    # None: root, else the unprivileged uid
        self.dir = os.path.join(tmp, variant, "h%d" % i)
        self.run = os.path.join(self.dir, ".run")
        os.makedirs(self.run, 0o700)
        self.ctl = os.path.join(self.run, "ipop.sock")
        self.passwd = None
        if user is not None:
            # the grid account: nobody, given a shell and this host's home
            self.passwd = os.path.join(tmp, "%s-h%d.passwd" % (variant, i))
            with open("/etc/passwd") as f, open(self.passwd, "w") as o:
                for line in f:
                    if line.split(":")[0] == "nobody":
                        line = "nobody:x:%d:%d:nobody:%s:/bin/sh\n" % (NOBODY, NOBODY, self.dir)
                    o.write(line)
            os.chmod(self.passwd, 0o644)
            for d in (self.dir, self.run):
                os.chown(d, user, user)
            os.chmod(self.dir, 0o755)

    def give(self, path, name=None, mode=0o600):
        dst = os.path.join(self.dir, name or os.path.basename(path))
        shutil.copy(path, dst)
        os.chmod(dst, mode)
        if self.user is not None:
            os.chown(dst, self.user, self.user)
        return dst

    def argv(self, script, tun=False, as_root=False, tun_mode=None):
        """Run shell text in this host: own namespace, hostname, mounts, user."""
        pre = ["hostname %s" % self.name]
        if self.passwd:
            pre.append("mount --bind %s /etc/passwd" % q(self.passwd))
        if tun or tun_mode:
            # what `chmod 0666 /dev/net/tun` does, in this host's mounts only
            # (tun_mode: the other way round, a tun device users may not open)
            dev = os.path.join(self.dir, ".dev")
            pre += ["mkdir -p %s" % q(dev), "mount -t tmpfs -o mode=755 tmpfs %s" % q(dev),
                    "mknod -m %s %s/tun c 10 200" % (tun_mode or "666", q(dev)),
                    "mount --bind %s/tun /dev/net/tun" % q(dev)]
        env = ["HOME=" + self.dir, "PATH=%s:%s" % (os.path.dirname(self.bin), PATH),
               "XDG_RUNTIME_DIR=" + self.run, "LANG=C.UTF-8"]
        if self.user is not None and not as_root:
            env += ["USER=nobody", "LOGNAME=nobody"]
            run = "exec setpriv --reuid=%d --regid=%d --clear-groups --inh-caps=-all env -i %s bash -c %s" % (
                self.user, self.user, " ".join(q(e) for e in env), q(script))
        else:
            env += ["USER=root", "LOGNAME=root"]
            run = "exec env -i %s bash -c %s" % (" ".join(q(e) for e in env), q(script))
        inner = "set -e; %s; cd %s; %s" % ("; ".join(pre), q(self.dir), run)
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", inner]

    def start(self, tag, script, **kw):
        logf = open(os.path.join(self.dir, "..", "%s-%s.log" % (tag, self.name)), "w")
        p = subprocess.Popen(self.argv(script, **kw), stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        p.logpath = logf.name
        procs.append(p)
        return p

    def status(self):
        try:
            r = subprocess.run([IPOP, "status", "--json", "--control", self.ctl], capture_output=True,
                               text=True, timeout=5, stdin=subprocess.DEVNULL)
            return json.loads(r.stdout) if r.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None


def tail(p, n=15):
    try:
        return "".join(open(p.logpath, errors="replace").readlines()[-n:])
    except OSError:
        return "(no log)"


def stop(p, timeout=8, sig=signal.SIGTERM):
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except OSError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def wait_for(cond, timeout, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


# ---------------------------------------------------------------- one variant

def prelude(variant):
    # `sudo` is the identity for the root variant (the test runs as root);
    # the user's shell would be interactive, so errors stop a try block.
    return ("sudo() { \"$@\"; }\n" if variant == "tap" else "") + "set -e\n"


def run_variant(tmp, variant, blocks, ubin):
    user = None if variant == "tap" else NOBODY
    hosts = [Host(tmp, variant, i, user) for i in (1, 2, 3)]
    for h in hosts:
        h.bin = ubin
    text = {w: prelude(variant) + localize(blocks[(variant, w)], w) for w in ("h1", "h2", "h3")}
    sshds = []
    try:
        tun_mode = "600" if variant == "ns" else None
        if variant == "ns":
            hosts[2].give(os.path.join(ROOT, "docs", "mpi_check.c"), mode=0o644)
        if variant != "tap":
            sshds = start_sshds(tmp, hosts, everywhere=(variant == "ns"))
        nodes = [hosts[0].start(variant, text["h1"], tun_mode=tun_mode)]
        # host 1 made net.key and its node is up: "copy net.key to hosts 2 and 3"
        key = os.path.join(hosts[0].dir, "net.key")
        up1 = wait_for(lambda: os.path.exists(key) and hosts[0].status() is not None
                       or nodes[0].poll() is not None, 20)
        if not report(up1 and nodes[0].poll() is None and os.path.exists(key),
                      "%s: host 1's block made net.key and its node answers `ipop status`" % variant):
            print(tail(nodes[0]))
            return
        for h in hosts[1:]:
            h.give(key)
        for h, w in zip(hosts[1:], ("h2", "h3")):
            nodes.append(h.start(variant, text[w], tun_mode=tun_mode))
        joined = wait_for(lambda: all((h.status() or {}).get("joined") for h in hosts)
                          or any(p.poll() is not None for p in nodes), 30)
        dead = [i + 1 for i, p in enumerate(nodes) if p.poll() is not None]
        if not report(joined and not dead, "%s: all three nodes started from the README's blocks and joined "
                      "the ring%s" % (variant, " (host(s) %s exited)" % dead if dead else "")):
            for p in nodes:
                print(tail(p))
            return
        # the user's second terminal on host 3
        try_text = prelude(variant) + "set -x\n" + localize(blocks[(variant, "h3-try")], "h3-try")
        t = hosts[2].start(variant + "-try", try_text)
        try:
            t.wait(90)
        except subprocess.TimeoutExpired:
            stop(t)
        out = open(t.logpath, errors="replace").read()
        print("---- %s h3-try output\n%s----" % (variant, out), flush=True)
        report(t.returncode == 0, "%s: every command of the h3-try block succeeded (exit %s)" % (variant, t.returncode))
        if variant == "ns":
            ranks = set(re.findall(r"^rank \d+ of 3: host (tr-h\d) ipop0 (10\.128\.0\.\d)$", out, re.M))
            report(ranks == {("tr-h%d" % i, "10.128.0.%d" % i) for i in (1, 2, 3)},
                   "ns: one mpirun on host 3 ran a rank on each host, in its namespace (ipop0 = its virtual "
                   "IP): %s" % sorted(ranks))
            m = re.search(r"^transfer: .* ([\d.]+) MB/s; .*\(match\)$", out, re.M)
            report(re.search(r"^mpi_check: OK$", out, re.M) is not None and m is not None,
                   "ns: MPI_Allreduce and a 10 MB round trip with matching checksums (%s MB/s): mpi_check: OK"
                   % (m.group(1) if m else "?"))
            st = hosts[0].status() or {}
            report((st.get("interface") or {}).get("device") == "veth",
                   "ns: with /dev/net/tun at 0600, host 1's ipop0 is a veth (status: %s)"
                   % (st.get("interface") or {}).get("device"))
        elif variant == "tap":
            report(out.count(" 0% packet loss") >= 2, "tap: kernel ping from host 3 to hosts 1 and 2 over ipop0, no loss")
            report(re.search(r"^10\.128\.0\.1$", out, re.M) is not None, "tap: `ipop resolve h1` printed 10.128.0.1")
        else:
            report("3 received" in out or "0% loss" in out, "user: `ipop ping` from host 3 to host 1 answered")
            report(re.search(r"^tr-h1$", out, re.M) and re.search(r"^tr-h2$", out, re.M),
                   "user: ssh -o ProxyCommand='ipop nc %h %p' reached host 1's and host 2's sshd (-R 22) "
                   "and ran `hostname` there")
            report(re.search(r"^hello from host 3$", out, re.M) and
                   os.path.exists(os.path.join(hosts[1].dir, "hello.txt")),
                   "user: scp through `ipop nc` put hello.txt in host 2's home, and ssh to "
                   "h2 (by its --name, through ipop nc) read it back")
        for p in nodes:         # Ctrl-C in each host's terminal
            stop(p, sig=signal.SIGINT)
        report(all(p.returncode == 0 for p in nodes),
               "%s: the nodes left on Ctrl-C (SIGINT to the terminal's process group) with exit 0 (%s)" % (variant, [p.returncode for p in nodes]))
    finally:
        for p in sshds:
            stop(p)


def start_sshds(tmp, hosts, everywhere=False):
    """Each host's own sshd on 127.0.0.1:22 (what -R 22:127.0.0.1:22 exposes),
    and the user's ssh key on host 3, accepted by hosts 1 and 2 (everywhere:
    the key on every host, accepted by every host, as mpirun wants)."""
    kd = os.path.join(tmp, "sshkeys")
    os.makedirs(kd, exist_ok=True)
    ck = os.path.join(kd, "id_ed25519")
    if not os.path.exists(ck):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ck)
    out = []
    for h in hosts:
        sd = os.path.join(h.dir, ".ssh")
        os.makedirs(sd, 0o700, exist_ok=True)
        os.chown(sd, NOBODY, NOBODY)
        if h.i == 3 or everywhere:
            h.give(ck, ".ssh/id_ed25519")
            # what the user's first `ssh` would ask: accept the new host key
            with open(os.path.join(sd, "config"), "w") as f:
                f.write("StrictHostKeyChecking accept-new\nBatchMode yes\nConnectTimeout 15\n")
            os.chown(os.path.join(sd, "config"), NOBODY, NOBODY)
            if not everywhere:
                continue
        h.give(ck + ".pub", ".ssh/authorized_keys")
        hk = os.path.join(h.dir, ".sshd_host_key")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hk)
        cfg = os.path.join(h.dir, ".sshd_config")
        with open(cfg, "w") as f:
            f.write("\n".join(["Port 22", "ListenAddress 127.0.0.1", "HostKey " + hk, "PidFile none",
                               "UsePAM no", "StrictModes no", "PasswordAuthentication no",
                               "KbdInteractiveAuthentication no", "AllowUsers nobody", "PrintMotd no",
                               "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
                               "SetEnv XDG_RUNTIME_DIR=" + h.run, ""]))
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.isdir("/run/sshd"):      # sshd's privilege separation directory
            os.makedirs("/run/sshd", 0o755)
            made_dirs.append("/run/sshd")
        out.append(h.start("sshd", "exec %s -D -e -f %s" % (sshd, q(cfg)), as_root=True))
    for h, p in zip([h for h in hosts if h.i != 3 or everywhere], out):
        ok = wait_for(lambda: "127.0.0.1:22 " in sh("ip", "netns", "exec", h.ns, "ss", "-Hltn",
                                                    check=False).stdout or p.poll() is not None, 10)
        if not ok or p.poll() is not None:
            raise RuntimeError("sshd on %s did not start: %s" % (h.name, tail(p)))
    return out


# ---------------------------------------------------------------- troubleshooting

# (what the user did, shell setup, the command, its documented exit code).
# The command runs as the unprivileged user on host 1 in its home, with a
# /dev/net/tun it may not open; the first "ipop: " line it prints must
# appear word for word in the README's Troubleshooting section (after the
# home directory is written as the README's /run/user/1000).
ERROR_CASES = [
    ("tap without root", "", "ipop up --mode tap --secret-file net.key --ip 10.128.0.1/16", 1),
    ("key readable by others", "chmod 644 net.key",
     "ipop up --secret-file net.key --ip 10.128.0.1/16", 1),
    ("privileged port", "", "ipop up --secret-file net.key --mode none --listen udp://127.0.0.1:22", 1),
    ("port 4000 taken", "python3 -c 'import socket,time; s=socket.socket(2,2); s.bind((\"0.0.0.0\",4000)); "
     "time.sleep(20)' >/dev/null 2>&1 & sleep 1", "ipop up --secret-file net.key --mode user --ip 10.128.0.1/16", 1),
    ("SOCKS port taken", "python3 -c 'import socket,time; s=socket.socket(); s.bind((\"127.0.0.1\",1080)); "
     "s.listen(); time.sleep(20)' >/dev/null 2>&1 & sleep 1", "ipop up --secret-file net.key --mode user --ip 10.128.0.1/16", 1),
    ("second node on the control socket",
     "ipop up --secret-file net.key --mode none --listen udp://127.0.0.1:4001 >/dev/null 2>&1 & sleep 1",
     "ipop up --secret-file net.key --mode none --listen udp://127.0.0.1:4002", 1),
    ("no node", "", "ipop status", 3),
    ("nc without SOCKS", "", "ipop nc 10.128.0.2 22", 1),
    ("nc without a port", "", "ipop nc 10.128.0.2", 2),
    ("nc with a name and no node", "", "ipop nc h2 22", 1),
    ("no credentials", "", "ipop up --ip 10.128.0.1/16", 2),
    ("public SOCKS", "", "ipop up --secret-file net.key --mode user --ip 10.128.0.1/16 --socks 0.0.0.0:1080", 2),
    ("a command without ns", "", "ipop up --secret-file net.key --mode user --ip 10.128.0.1/16 -- true", 2),
    ("exec into a user-mode node",
     "ipop up --secret-file net.key --mode user --ip 10.128.0.1/16 --socks off >/dev/null 2>&1 & sleep 1",
     "ipop exec -- true", 1),
    ("ip auto without net", "", "ipop up --secret-file net.key --ip auto", 2),
    ("unknown option", "", "ipop up --secret-file net.key --bogus", 2),
    ("bad MTU", "", "ipop up --secret-file net.key --mode user --ip 10.128.0.1/16 --mtu 2000", 2),
]


def run_errors(tmp, ubin):
    text = open(README).read()
    sec = text[text.index("## Troubleshooting"):text.index("## Exit codes")]
    h = Host(tmp, "errors", 1, NOBODY)
    h.bin = ubin
    sh(ubin, "genkey", "--out", os.path.join(h.dir, "net.key"))
    os.chown(os.path.join(h.dir, "net.key"), NOBODY, NOBODY)
    for what, setup, cmd, code in ERROR_CASES:
        # the mistake, then undo it: the key's mode, whatever ran in the background
        script = ("%s\n%s\nrc=$?; chmod 600 net.key; kill $(jobs -p) 2>/dev/null; wait; exit $rc\n"
                  % (setup, cmd))
        p = subprocess.run(h.argv(script, tun=False, tun_mode="600"), capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("ipop: ")]
        line = lines[0].replace(h.run, "/run/user/1000") if lines else ""
        ok = bool(line) and ("`%s`" % line) in sec and p.returncode == code
        if not report(ok, "troubleshooting: %s: `%s` exits %s (documented: %d) with a line the README "
                      "quotes" % (what, cmd.split(";")[0], p.returncode, code)):
            print("    printed: %r\n    stderr: %s" % (line, (p.stdout + p.stderr).strip()[-300:]))


# ---------------------------------------------------------------- main

def main():
    if os.geteuid() != 0:
        print("FAIL: t_readme needs root (network namespaces; the user variants run as nobody)")
        return 1
    for tool in ("ip", "unshare", "setpriv", "mknod", "ssh", "sshd", "ssh-keygen", "ss", "ping"):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            print("FAIL: %s not installed" % tool)
            return 1
    blocks = readme_blocks()
    need = [(v, w) for v in ("tap", "user", "ns") for w in ("h1", "h2", "h3")] + \
           [("tap", "h3-try"), ("user", "h3-try")]
    missing = [k for k in need if k not in blocks]
    if not report(not missing, "README.md has the three-hosts blocks %s" % (
            "(missing: %s)" % ", ".join("%s:%s" % k for k in missing) if missing else "for tap, user and ns")):
        return 1
    tmp = tempfile.mkdtemp(prefix="tr-readme-", dir="/tmp")
    os.chmod(tmp, 0o711)
    try:
        bdir = os.path.join(tmp, "bin")
        os.mkdir(bdir, 0o755)
        ubin = os.path.join(bdir, "ipop")
        shutil.copy(IPOP, ubin)
        os.chmod(ubin, 0o755)
        for variant in ("tap", "user", "ns", "errors"):
            log("== %s" % variant)
            underlay()
            try:
                if variant == "errors":
                    run_errors(tmp, ubin)
                else:
                    run_variant(tmp, variant, blocks, ubin)
            except Exception as e:  # a README block the test cannot run is a failure too
                report(False, "%s: %s" % (variant, e))
            finally:
                cleanup()
                procs.clear()
    finally:
        cleanup()
        if os.environ.get("IPOP_TEST_KEEP"):
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = [m for ok, m in results if not ok]
    print("%s: t_readme, %d checks, %d failed" % ("FAIL" if bad else "PASS", len(results), len(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), sys.exit(1)))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        cleanup()
        sys.exit(1)
