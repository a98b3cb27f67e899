#!/usr/bin/env python3
"""Open MPI across firewalled sites with no root on the hosts (issue 21,
parts 2, 5 and 6): mpirun, run on one host, starts the ranks on the others
itself, over ssh through the overlay, into ipop's namespaces.  Needs root to
build the lab (network namespaces, nftables); every process on the hosts
runs as nobody.

Every namespace this test makes is named "tm-*" (bridges and veths "tm*");
leftovers are removed at start, and everything (namespaces, processes, the
mode of /dev/net/tun) is put back on exit, failure, SIGTERM or SIGINT.

The lab, the IPOP paper's Figure 4 ("internet" 203.0.113.0/24 is the bridge
tmbr0 in tm-net; routers as in tests/t_natlab.py, lib.nat_rules):

    tm-pub  203.0.113.10  public bootstrap node (--mode none, no virtual IP)
    tm-rc   203.0.113.21  full cone NAT     LAN 10.1.0.0/24: tm-h1, tm-h2
    tm-rs   203.0.113.22  symmetric NAT     LAN 10.2.0.0/24: tm-h3
    tm-rt   203.0.113.23  outbound TCP only (UDP from the LAN dropped)
                                            LAN 10.3.0.0/24: tm-h4

No router lets anything in that its LAN did not start.  Host hN runs, as
nobody (setpriv), from a directory of its own holding its copy of the binary
and the key (HOME there, XDG_RUNTIME_DIR unset):

    ipop up --mode ns --ip 10.77.0.N/24 --listen udp://LAN:400N ...
            --bootstrap udp://203.0.113.10:4000 --bootstrap tcp://...

and, inside that node's user and network namespace (`ipop exec`), an sshd of
its own, as nobody, on VIP port 2222 (host key, config, pid file and
authorized_keys in its directory; UsePAM no, StrictModes no).  Then, on h1
inside its namespace, one

    mpirun -np 4 --host 10.77.0.1,...,10.77.0.4 --mca plm_rsh_agent "ssh -F CFG"
           --mca plm_rsh_no_tree_spawn 1 --mca btl tcp,self --mca pml ob1
           --mca btl_tcp_if_include ipop0 --mca oob_tcp_if_include ipop0
           --mca orte_tmpdir_base DIR mpi_check 10

(CFG: Port 2222, the user's key, BatchMode, no known-hosts file.  Inside a
namespace ipop0 and lo are the only interfaces, so `--host` and the rsh
agent alone are enough; the rest keeps the job on ipop0 and TCP by name,
its session files in the test's directory, and every orted started by
mpirun itself.)

runs docs/mpi_check.c (compiled here with mpicc): every rank reports its
host and ipop0 address, an MPI_Allreduce of known values, and 10 MB from
rank 0 (h1, the cone site) to rank 3 (h4, the TCP-only site) and back with
the checksum checked at both ends; the rate and the job's wall time are
reported.  mpirun's exit status, the four ranks' hosts and "mpi_check: OK"
are checked, and that every process in the hosts' namespaces during the job
(sshd, orted, the ranks) runs as nobody.

The job runs twice: with /dev/net/tun at mode 0600 (the usual; ns mode falls
back to a veth: `status --json` says mode "ns", interface.device "veth"),
then at 0666 (the tun path, device "tap"); then, as a baseline for the
numbers, with the nodes as root in tap mode (no namespace; the job as
nobody all the same).  Each run starts the nodes afresh and takes
about 3 s here.

nobody's account is a system account (shell nologin, nss-systemd calls it
locked) that sshd would not log in; a grid user's account is not.  So the
in-namespace programs run with /etc/passwd and /etc/shadow bind-mounted over
by copies in which nobody has /bin/sh, a home in its directory and an
unlocked entry, and with a hostname of their own (Open MPI tells hosts
apart by it) -- in a user+mount+UTS namespace of their own, nested in the
node's, and back to nobody's uid in one more (see in_ns()).

This is one of two ways to launch: the sshd runs as the user inside each
namespace.  The README's way (each host's own sshd exposed with
-R 22:127.0.0.1:22, orted started with `ipop exec`) is what t_readme runs.

Node, sshd and mpirun logs of a failed run are kept in
build/test-logs/t_mpi-nodes (or $IPOP_TEST_LOGDIR).
Env: IPOP_MPI_RUNS (e.g. "0666": which runs; default "0600,0666"),
IPOP_MPI_MB (default 10), IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE.
"""
import concurrent.futures
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (REPO, sh, nsx, Proc, check, log, ipop_bin, Lab, NsNode, ns_add, bridge_add,  # noqa: E402
                 veth_to_bridge, nat_rules, up_link, conn_summary, ssh_keygen, sshd_config, sshd_bin,
                 wait_for, proc_status)

PREFIX = "tm"
NET, BR = "tm-net", "tmbr0"
PUB_NS, PUB_IP, PUB_PORT = "tm-pub", "203.0.113.10", 4000
VNET = "10.77.0"
SSH_PORT = 2222
MB = int(os.environ.get("IPOP_MPI_MB", "10"))
NOBODY, NOGROUP = 65534, 65534
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
TUN = "/dev/net/tun"
NODE_UP_S, SSH_UP_S, MPIRUN_S = 20, 60, 90


RUNS = [r.strip() for r in os.environ.get("IPOP_MPI_RUNS", "0600,0666,root").split(",") if r.strip()]
NS_DEV = {"0600": "veth", "0666": "tap", "root": "tap"}     # what `status --json` must say for each run
MODE = {"0600": "ns", "0666": "ns", "root": "tap"}          # and the node's mode


class Site:
    def __init__(self, name, kind, wan, lan, hosts):
        self.name, self.kind, self.wan, self.lan = name, kind, wan, lan
        self.router = "tm-r" + name
        self.hosts = hosts


SITES = [Site("c", "F", "203.0.113.21", "10.1.0", ["h1", "h2"]),
         Site("s", "S", "203.0.113.22", "10.2.0", ["h3"]),
         Site("t", "T", "203.0.113.23", "10.3.0", ["h4"])]
KIND = {"F": "full cone", "S": "symmetric", "T": "TCP only"}
HOSTS = [h for s in SITES for h in s.hosts]


class Node(NsNode):
    """An ipop node as nobody, from its own directory d (binary, key, state,
    home): the public node (mode none) or a host (mode ns)."""
    status_timeout = 8

    def __init__(self, lab, name, ns, d, ip, port, vip=None):
        NsNode.__init__(self, lab, name, ns, vip)
        self.d, self.ip, self.port = d, ip, port
        self.ctl = os.path.join(d, "ctl.sock")

    def start(self):
        if not self.vip:
            self.address = None         # a new ring address each start: status() learns it
        return NsNode.start(self)

    def env(self, cwd=None):
        """env argv: nobody's environment, in cwd (default: its directory)."""
        return ["env", "-C", cwd or self.d, "-u", "XDG_RUNTIME_DIR", "HOME=%s/home" % self.d,
                "XDG_STATE_HOME=%s/state" % self.d]

    def command(self):
        a = AS_NOBODY + self.env() + [
            os.path.join(self.d, "ipop"), "up", "--listen", "udp://%s:%d" % (self.ip, self.port),
            "--listen", "tcp://%s:%d" % (self.ip, self.port), "--secret-file", os.path.join(self.d, "net.key"),
            "--control", self.ctl] + (["-v"] if os.environ.get("IPOP_TEST_VERBOSE") else ["--log-level", "info"])
        if not self.vip:
            return a + ["--mode", "none"]
        if self.lab.run_mode == "root":          # the baseline: a tap node, root's, no namespace
            a = a[a.index("env"):]
        a += ["--mode", MODE[self.lab.run_mode], "--ip", self.vip + "/24",
              "--bootstrap", "udp://%s:%d" % (PUB_IP, PUB_PORT), "--bootstrap", "tcp://%s:%d" % (PUB_IP, PUB_PORT)]
        return a

    def exec_prefix(self, cwd=None):
        """argv prefix that runs a command in this node's user and network
        namespaces, as nobody, in cwd: `ipop exec` (the root run: in the
        host's namespace, where the tap is)."""
        prefix = ["ip", "netns", "exec", self.ns] + AS_NOBODY + self.env(cwd)
        if self.lab.run_mode == "root":
            return prefix
        return prefix + [os.path.join(self.d, "ipop"), "exec", "--control", self.ctl, "--"]

    def ns_inode(self):
        """(net namespace of a command run by exec_prefix(), e.g. "net:[4026532714]",
        or None; what went wrong)."""
        argv = self.exec_prefix() + ["readlink", "/proc/self/ns/net"]
        rc, out, err = sh(argv, check_rc=False, timeout=10)
        ok = rc == 0 and out.startswith("net:")
        return (out.strip() if ok else None), (err or out or "timeout").strip()[-200:]


class MpiLab(Lab):
    name, prefix = "t_mpi", PREFIX + "-"
    tools = ("ip", "nft", "sysctl", "ping", "sshd", "ssh", "ssh-keygen", "mpirun", "mpicc", "setpriv",
             "unshare")
    hint = "apt-get install openssh-server openssh-client openmpi-bin libopenmpi-dev nftables util-linux"

    def __init__(self):
        Lab.__init__(self)
        os.chmod(self.dir, 0o711)           # nobody reaches its own directories in it
        self.tun_mode = stat.S_IMODE(os.stat(TUN).st_mode)
        self.netns_inodes = set()           # the hosts' namespaces (for the final sweep)
        self.sshds = {}
        self.run_mode = None                # the run under way: a tun mode, or "root"
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def body(self):
        log("t_mpi: dir %s, runs %s (tun modes), %d MB" % (self.dir, ",".join(RUNS), MB))
        self.sweep(marker="/ipop-t_mpi-")   # an earlier, SIGKILLed run's processes
        self.step("setup", self.setup_lab, fatal=True)
        self.step("prepare", self.prepare, fatal=True)
        for mode in RUNS:
            self.step("tun %s" % mode if mode != "root" else "root, tap mode (baseline)",
                      lambda: self.run_job(mode))

    # ---- the lab
    def setup_lab(self):
        ns_add(NET, PUB_NS, *([s.router for s in SITES] + ["tm-" + h for h in HOSTS]))
        bridge_add(NET, BR)
        veth_to_bridge(NET, BR, PUB_NS, "tm-eth", "tmp-pub", PUB_IP + "/24")
        for s in SITES:
            r = s.router
            veth_to_bridge(NET, BR, r, "tmwan", "tmp-" + s.name, s.wan + "/24")
            bridge_add(r, "tmlan")
            sh(["ip", "-n", r, "addr", "add", s.lan + ".1/24", "dev", "tmlan"])
            fwd = []
            for i, h in enumerate(s.hosts):
                ip = "%s.%d" % (s.lan, 2 + i)
                veth_to_bridge(r, "tmlan", "tm-" + h, "tm-eth", "tml-" + h, ip + "/24")
                sh(["ip", "-n", "tm-" + h, "route", "add", "default", "via", s.lan + ".1"])
                fwd.append((str(self.port(h)), ip))      # the full cone's mapping: a port per host
            nsx(r, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            nsx(r, ["nft", "-f", "-"], input=nat_rules(s.kind, s.lan + ".0/24", s.wan, "tmwan", "tmlan", fwd))
        for h in HOSTS:
            rc, out, err = nsx("tm-" + h, ["ping", "-n", "-c", "1", "-W", "3", PUB_IP], check_rc=False, timeout=15)
            check(rc == 0, "lab: tm-%s cannot ping %s: %s" % (h, PUB_IP, (out + err).strip()[-200:]))
        self.ok("4 hosts at 3 sites (%s) reach the public node through their NATs"
                % ", ".join("%s: %s" % (KIND[s.kind], "+".join(s.hosts)) for s in SITES))

    @staticmethod
    def port(h):
        return 4000 + int(h[1:])

    @staticmethod
    def vip(h):
        return "%s.%d" % (VNET, int(h[1:]))

    def site(self, h):
        return next(s for s in SITES if h in s.hosts)

    # ---- each host's directory, owned by nobody
    def prepare(self):
        key = self.secret()
        job = os.path.join(self.dir, "job")          # the same path on every host (one file system)
        os.makedirs(job)
        self.prog = os.path.join(job, "mpi_check")
        sh(["mpicc", "-O2", "-o", self.prog, os.path.join(REPO, "docs", "mpi_check.c")], timeout=120)
        users = os.path.join(self.dir, "user")        # the user's client key, in every home
        os.makedirs(users)
        self.client_key = os.path.join(users, "id_ed25519")
        ssh_keygen(self.client_key)
        with open("/etc/passwd") as f:
            passwd = [ln for ln in f if not ln.startswith("nobody:")]
        self.nodes["pub"] = Node(self, "pub", PUB_NS, self.host_dir("pub", key, passwd), PUB_IP, PUB_PORT)
        for h in HOSTS:
            s = self.site(h)
            ip = "%s.%d" % (s.lan, 2 + s.hosts.index(h))
            self.nodes[h] = Node(self, h, "tm-" + h, self.host_dir(h, key, passwd), ip, self.port(h), self.vip(h))
        chown_tree(job)
        self.ok("directories for nobody on 5 nodes; %s compiled with mpicc" % os.path.basename(self.prog))

    def host_dir(self, name, key, passwd):
        d = os.path.join(self.dir, name)
        for sub in ("home", "state", "ssh"):
            os.makedirs(os.path.join(d, sub))
        shutil.copy(ipop_bin(), os.path.join(d, "ipop"))
        shutil.copy(key, os.path.join(d, "net.key"))
        os.chmod(os.path.join(d, "net.key"), 0o600)
        if name != "pub":
            sd = os.path.join(d, "ssh")
            ssh_keygen(os.path.join(sd, "host_ed25519"))
            shutil.copy(self.client_key, os.path.join(sd, "id_ed25519"))
            shutil.copy(self.client_key + ".pub", os.path.join(sd, "authorized_keys"))
            sshd_config(os.path.join(sd, "sshd_config"), self.vip(name), os.path.join(sd, "host_ed25519"),
                        os.path.join(sd, "authorized_keys"), os.path.join(sd, "sshd.pid"), port=SSH_PORT,
                        user="nobody")
            with open(os.path.join(sd, "config"), "w") as f:
                f.write("Host *\n  Port %d\n  IdentityFile %s\n  IdentitiesOnly yes\n  BatchMode yes\n"
                        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  ConnectTimeout 5\n"
                        "  LogLevel ERROR\n" % (SSH_PORT, os.path.join(sd, "id_ed25519")))
            # nobody as a user that sshd logs in (see the docstring)
            with open(os.path.join(d, "passwd"), "w") as f:
                f.writelines(passwd + ["nobody:x:%d:%d:nobody:%s/home:/bin/sh\n" % (NOBODY, NOGROUP, d)])
            with open(os.path.join(d, "shadow"), "w") as f:
                f.write("nobody:*::0:99999:7:::\n")
        chown_tree(d)
        os.chmod(d, 0o700)
        return d

    # ---- running things inside a host's namespace
    def in_ns(self, h, argv, cwd=None):
        """argv run in host h's node namespaces as nobody, through a nested
        user+mount+UTS namespace that gives it h's hostname and nobody a
        login-able passwd/shadow entry, then one more user namespace that
        maps nobody's uid back (so sshd and mpirun run as a plain user)."""
        nd = self.nodes[h]
        inner = ('mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/shadow && hostname "$0" && '
                 'shift 2 && exec unshare --user --map-user=%d --map-group=%d -- "$@"' % (NOBODY, NOGROUP))
        return nd.exec_prefix(cwd) + ["unshare", "--user", "--map-root-user", "--mount", "--uts", "sh", "-c", inner,
                                   "tm-" + h, os.path.join(nd.d, "passwd"), os.path.join(nd.d, "shadow")] + argv

    def ssh_cfg(self, h):
        return os.path.join(self.nodes[h].d, "ssh", "config")

    def start_sshd(self, h):
        nd = self.nodes[h]
        cfg = os.path.join(nd.d, "ssh", "sshd_config")
        rc, out, err = sh([sshd_bin(), "-t", "-f", cfg], check_rc=False)
        check(rc == 0, "sshd -t rejects %s: %s" % (cfg, (err or out).strip()))
        self.sshds[h] = Proc("sshd-" + h, self.in_ns(h, [sshd_bin(), "-f", cfg, "-D", "-e"]),
                             os.path.join(self.dir, "sshd-%s.log" % h))

    def ssh_ok(self, src, dst):
        rc, out, err = sh(self.in_ns(src, ["ssh", "-F", self.ssh_cfg(src), self.vip(dst), "hostname"]),
                          timeout=20, check_rc=False)
        return rc == 0 and out.strip() == "tm-" + dst, (err or out or "timeout").strip()[-160:]

    # ---- one run
    def run_job(self, mode):
        self.run_mode = mode
        if mode != "root":
            os.chmod(TUN, int(mode, 8))
        try:
            self.start_nodes(mode)
            self.start_sshds()
            self.wait_ssh()
            self.mpirun(mode)
        finally:
            os.chmod(TUN, self.tun_mode)
            self.stop_all()

    def start_nodes(self, mode):
        t0 = time.monotonic()
        for nd in self.nodes.values():
            shutil.rmtree(os.path.join(nd.d, "state"), ignore_errors=True)     # each run from scratch
            os.makedirs(os.path.join(nd.d, "state"))
            os.chown(os.path.join(nd.d, "state"), NOBODY, NOGROUP)
        self.nodes["pub"].start()
        self.wait_status([self.nodes["pub"]], NODE_UP_S)
        hosts = [self.nodes[h] for h in HOSTS]
        for nd in hosts:
            nd.start()
        self.wait_status(hosts, NODE_UP_S)
        t1, inodes, errs = time.monotonic(), {}, {}
        while len(inodes) < len(hosts) and time.monotonic() - t1 < NODE_UP_S:
            self.check_alive(hosts)
            for nd in hosts:
                if nd.name not in inodes:
                    inodes[nd.name], errs[nd.name] = nd.ns_inode()
                    if inodes[nd.name] is None:
                        del inodes[nd.name]
            if len(inodes) < len(hosts):
                time.sleep(0.1)
        self.netns_inodes.update(inodes.values())
        check(len(inodes) == len(hosts), "no command runs in the namespace of %s %d s after it answered: %s"
              % (",".join(n.name for n in hosts if n.name not in inodes), NODE_UP_S,
                 "; ".join("%s: %s" % (k, v) for k, v in errs.items() if k not in inodes)))
        sts = {nd.name: nd.status() or {} for nd in hosts}
        devs = {k: (st.get("mode"), (st.get("interface") or {}).get("device")) for k, st in sts.items()}
        self.check(all(v == (MODE[mode], NS_DEV[mode]) for v in devs.values()),
                   "every node's status says mode %s, device %s: %s" % (MODE[mode], NS_DEV[mode], devs))
        self.ok("the public node and 4 %s-mode hosts, as %s, up in %.1f s (device %s)"
                % (MODE[mode], "root" if mode == "root" else "nobody", time.monotonic() - t0,
                   ",".join(sorted(set(str(v[1]) for v in devs.values())))))

    def start_sshds(self):
        for h in HOSTS:
            self.start_sshd(h)
        want = "Server listening on %s port %d"
        el = wait_for(lambda: all(want % (self.vip(h), SSH_PORT) in p.log_text() or not p.alive()
                                  for h, p in self.sshds.items()), 10, 0.1)
        bad = [h for h, p in self.sshds.items() if want % (self.vip(h), SSH_PORT) not in p.log_text()]
        check(el is not None and not bad, "sshd did not start in the namespace of %s: %s"
              % (",".join(bad), "; ".join("%s: %s" % (h, self.sshds[h].log_tail(4).strip()) for h in bad)))
        self.ok("an sshd as nobody listens on each host's virtual IP, port %d, inside its namespace" % SSH_PORT)

    def wait_ssh(self):
        """Until h1 logs in to every other host over the overlay (what mpirun needs)."""
        t0, pending, last = time.monotonic(), [h for h in HOSTS if h != "h1"], {}
        while pending and time.monotonic() - t0 < SSH_UP_S:
            res = dict(zip(pending, self.pool.map(lambda h: self.ssh_ok("h1", h), pending)))
            last.update(res)
            pending = [h for h in pending if not res[h][0]]
            if pending:
                self.check_alive([self.nodes[h] for h in HOSTS])
                time.sleep(0.5)
        el = time.monotonic() - t0
        if pending:
            for h in ["h1"] + pending:
                log("  %s's links: %s" % (h, conn_summary(self.nodes[h].status())))
            self.dump_logs(["h1"] + pending, 15)
        check(not pending, "h1 cannot ssh to %s within %d s over the overlay: %s"
              % (",".join(pending), SSH_UP_S, "; ".join("%s: %s" % (h, last[h][1]) for h in pending)))
        self.ok("h1 logs in to h2, h3, h4 by ssh over the overlay %.1f s after sshd started" % el)

    def links(self):
        """Each host's up links to the others: path and transport (- for none:
        its packets are routed over the ring)."""
        rows = []
        for h in HOSTS:
            st = self.nodes[h].status()
            cs = [(o, up_link(st, self.nodes[o].address)) for o in ["pub"] + HOSTS if o != h]
            rows.append("%s: %s" % (h, " ".join("%s=%s" % (o, "%s/%s" % (c.get("path"), str(c.get("uri")).split(":")[0])
                                                            if c else "-") for o, c in cs)))
        return "; ".join(rows)

    def mpirun(self, mode):
        argv = ["mpirun", "-np", "4", "--host", ",".join(self.vip(h) for h in HOSTS),
                "--mca", "plm_rsh_agent", "ssh -F %s" % self.ssh_cfg("h1"), "--mca", "plm_rsh_no_tree_spawn", "1",
                "--mca", "btl", "tcp,self", "--mca", "pml", "ob1",
                "--mca", "btl_tcp_if_include", "ipop0", "--mca", "oob_tcp_if_include", "ipop0",
                "--mca", "orte_tmpdir_base", os.path.dirname(self.prog), self.prog, str(MB)]
        log("mpirun on h1: %s" % " ".join("'%s'" % a if " " in a else a for a in argv))
        watch = NsWatch(self.netns_inodes)
        t = time.monotonic()
        try:
            p = subprocess.run(self.in_ns("h1", argv, cwd=os.path.dirname(self.prog)), capture_output=True,
                               text=True, errors="replace", timeout=MPIRUN_S, stdin=subprocess.DEVNULL)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = None, _text(e.stdout), _text(e.stderr)
        el = time.monotonic() - t
        watch.stop()
        self.note("%s: links after the job: %s" % (self.step_name, self.links()))
        with open(os.path.join(self.dir, "mpirun-%s.log" % mode), "w") as f:
            f.write("$ %s\nrc=%s after %.1f s\n--- stdout\n%s--- stderr\n%s" % (argv, rc, el, out, err))
        ranks = dict((int(r), (host, vip)) for r, host, vip in
                     re.findall(r"^rank (\d+) of 4: host (\S+) ipop0 (\S+)$", out, re.M))
        want = {i: ("tm-" + h, self.vip(h)) for i, h in enumerate(HOSTS)}
        rate = re.search(r"in ([\d.]+) s: ([\d.]+) MB/s", out)
        job = re.search(r"job: ([\d.]+) s", out)
        if rc != 0 or "mpi_check: OK" not in out or ranks != want:
            self.fail("mpirun rc=%s after %.1f s (limit %d s); ranks %s (want %s); output:\n%s\n  stderr:\n%s"
                      % (rc, el, MPIRUN_S, ranks, want, indent(out, 20), indent(err, 25)))
            return
        self.ok("mpirun on h1 started 4 ranks on h1..h4 (%s) itself; allreduce right, %d MB round trip "
                "h1 -> h4 -> h1 with matching checksums; mpirun exit 0"
                % (", ".join("%d=%s" % (i, want[i][1]) for i in range(4)), MB))
        self.note("%s: mpirun wall %.1f s (job %.2f s inside); %d MB rank 0 -> 3 -> 0 at %s MB/s (%s s)"
                  % (self.step_name, el, float(job.group(1)) if job else -1, MB, rate.group(2) if rate else "?",
                     rate.group(1) if rate else "?"))
        uids = {}
        for (comm, _), uid in watch.seen.items():
            if not (mode == "root" and comm == "ipop"):     # the baseline's nodes are root's
                uids.setdefault(comm, set()).add(uid)
        self.check({"sshd", "orted"} <= set(uids) and all(u == {NOBODY} for u in uids.values()),
                   "the processes in the hosts' namespaces during the job, all nobody's: %s"
                   % (", ".join("%s (uid %s)" % (c, ",".join(map(str, sorted(u))))
                                      for c, u in sorted(uids.items()))))

    # ---- stopping
    def stop_all(self):
        for p in self.sshds.values():
            p.stop(2)
        self.sshds = {}
        for nd in self.nodes.values():
            nd.stop(3)
        self.sweep(inodes=self.netns_inodes)

    def sweep(self, inodes=(), marker=None):
        """SIGKILL nobody's processes in the hosts' namespaces (inodes), or
        whose command line or working directory holds marker: what sshd
        started (its sessions, orted, ranks) is in no process group of ours."""
        marker = marker or self.dir
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                if os.readlink("/proc/%s/ns/net" % pid) not in inodes:
                    if real_uid(pid) != NOBODY:
                        continue
                    with open("/proc/%s/cmdline" % pid, "rb") as f:
                        cmd = f.read().decode(errors="replace")
                    if marker not in cmd and not os.readlink("/proc/%s/cwd" % pid).startswith(marker):
                        continue
                os.kill(int(pid), 9)
            except (OSError, ValueError, KeyError):
                pass

    def close_more(self):
        try:
            os.chmod(TUN, self.tun_mode)
        except OSError:
            pass
        self.sweep(inodes=self.netns_inodes)
        self.pool.shutdown(wait=False)


class NsWatch:
    """Samples (comm, pid) -> real uid of the processes in the net namespaces
    inodes every 0.1 s in a thread, reading /proc only."""

    def __init__(self, inodes):
        self.inodes, self.seen = set(inodes), {}
        self._stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while not self._stop.is_set():
            for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
                try:
                    if os.readlink("/proc/%s/ns/net" % pid) in self.inodes:
                        with open("/proc/%s/comm" % pid) as f:
                            comm = f.read().strip()
                        self.seen[(comm, pid)] = real_uid(pid)
                except (OSError, ValueError, KeyError):
                    pass
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        self.th.join(3)


def real_uid(pid):
    return int(proc_status(int(pid))["Uid"].split()[0])


def chown_tree(d):
    for root, dirs, files in os.walk(d):
        for x in [root] + [os.path.join(root, y) for y in dirs + files]:
            os.chown(x, NOBODY, NOGROUP)


def _text(b):
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def indent(text, n):
    return "\n".join("    | " + ln for ln in text.strip().splitlines()[-n:]) or "    | (nothing)"


if __name__ == "__main__":
    MpiLab.main()
