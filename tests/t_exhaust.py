#!/usr/bin/env python3
"""TCP listener exhaustion (issue 18 item 5): an outsider holds thousands of
TCP connections to a node's listener and never says a word.

Every namespace this test makes is named "hx-*" (bridge hxbr0, veths hx*);
leftover "hx-*" namespaces are removed at start, and everything is removed
on exit, failure, SIGTERM or SIGINT.  Only processes this test started are
ever signalled.

Layout: namespace hx-sw holds bridge hxbr0; hosts on 192.168.231.0/24:
  A  hx-a  .1   the victim: README flags (default listeners udp+tcp :4000),
                --mode tap --ip 10.231.0.1/16; a TCP echo server on its
                virtual IP
  B  hx-b  .2   an existing member, bootstraps from A; a client streams
                through A's echo server for the whole test (the flow)
  C  hx-c  .3   the joiner: bootstraps tcp://A:4000, through the listener
                under attack
  X  hx-x  .9 and .100-.119: the attacker, 2000 TCP connections spread over
                21 source addresses, held open; any the node closes are
                opened again (every 0.3 s)

 1. A, B and the flow come up; the flow's rate before the attack.
 2. Flood at the default fd limit: while held, `ipop status` on A answers
    in < 2 s (5 tries), C joins within 5 s (an up link to A, and an overlay
    ping to A), the flow goes on (no 2 s stall; its rate is recorded), A's
    CPU over 3 s stays under 35% of a core, A's status shows
    pending_evicted > 0 and A holds at most ~128+ its baseline descriptors.
 3. A restarted with RLIMIT_NOFILE 100 (soft and hard: it cannot raise it),
    the flood reaches the fd limit (fd_limit drops > 0): A's CPU over 3 s
    stays under 35% (before the fix it spun), A's status answers in < 2 s
    (before: no answer in 5 s), A stays alive; then
    the attacker closes everything and within 10 s A's status answers
    promptly, C joins (its link to A up, overlay ping), and A's fds are back.
    The listener rested at the limit: at most 4 failed accepts a second
    (without the rest: thousands, each evicting a stream).
Env: IPOP_EXHAUST_CONNS (default 2000), IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE,
IPOP_LAB_PREFIX (namespace prefix instead of "hx-").
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (check, log, ipop_bin, nsx, Proc, Lab, ns_add, bridge_add, veth_to_bridge,  # noqa: E402
                 wait_for, up_conns, timed_status, TcpHolder)

PREFIX = os.environ.get("IPOP_LAB_PREFIX", "hx-")
SW = PREFIX + "sw"
BR = "hxbr0"
UNDER = "192.168.231.%d"
VNET = "10.231.0.%d"
HOSTS = {"a": 1, "b": 2, "c": 3, "x": 9}
ATTACK_EXTRA = range(100, 120)         # the attacker's further source addresses
CONNS = int(os.environ.get("IPOP_EXHAUST_CONNS", "2000"))
ECHO_PORT = 7000
# What the attack adds to A's CPU (of one core, averaged over 3 s), over the
# same 3 s before it: A also forwards the unpaced flow, whose cost follows
# the machine (37 % of a core in all on a fresh machine, 14 % here), and a
# spinning listener adds a whole core.
CPU_ADDED_MAX = 0.25
LOW_NOFILE = 100
TCK = os.sysconf("SC_CLK_TCK")

lab = None                             # the Exhaust running
tmp = None                             # its dir

ECHO = r'''
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(8)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

# The flow: 16 KB out, the same back, again and again; the byte count so
# far goes to a file after every round trip.
FLOW = r'''
import socket, sys, time
out = sys.argv[3]
buf = b"x" * 16384
total = 0
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
        s.settimeout(5)
        while True:
            s.sendall(buf)
            got = 0
            while got < len(buf):
                d = s.recv(65536)
                if not d:
                    raise OSError("closed")
                got += len(d)
            total += got
            with open(out + ".tmp", "w") as f:
                f.write("%d %f\n" % (total, time.monotonic()))
            import os
            os.replace(out + ".tmp", out)
    except OSError:
        time.sleep(0.2)
'''


def setup_lab():
    ns_add(SW)
    bridge_add(SW, BR)
    for name, i in HOSTS.items():
        ns_add(PREFIX + name)
        veth_to_bridge(SW, BR, PREFIX + name, "hx-eth", "hxp" + name, UNDER % i + "/24")
    for i in ATTACK_EXTRA:
        nsx(PREFIX + "x", ["ip", "addr", "add", UNDER % i + "/24", "dev", "hx-eth"])


def ctl(name):
    return os.path.join(tmp, name + ".sock")


def start_node(name, bootstrap=None, nofile=None):
    i = HOSTS[name]
    argv = ["ip", "netns", "exec", PREFIX + name]
    if nofile:
        argv += ["prlimit", "--nofile=%d:%d" % (nofile, nofile)]
    argv += [ipop_bin(), "up", "--secret-file", lab.secret(), "--ip", VNET % i + "/16",
             "--mode", "tap", "--control", ctl(name)]
    if bootstrap:
        argv += ["--bootstrap", bootstrap]
    if os.environ.get("IPOP_TEST_VERBOSE"):
        argv.append("-v")
    return Proc(name, argv, os.path.join(tmp, name + ".log"))


def ipop_pid(p):
    """The ipop process itself (ip netns exec and prlimit exec into it)."""
    return p.pid


def status(name, timeout=5):
    return timed_status(ctl(name), timeout, PREFIX + name)


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])        # utime + stime


def cpu_share(pid, seconds=3.0):
    a, t = cpu_ticks(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_ticks(pid) - a) / TCK / (time.monotonic() - t)


def n_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def flow_bytes():
    try:
        with open(os.path.join(tmp, "flow.out")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def flow_rate(seconds=3.0):
    """Bytes/s of the flow over seconds, and its longest stall (s)."""
    t0, b0 = time.monotonic(), flow_bytes()
    last, stall, last_t = b0, 0.0, t0
    while time.monotonic() - t0 < seconds:
        time.sleep(0.1)
        b = flow_bytes()
        now = time.monotonic()
        if b != last:
            last, last_t = b, now
        stall = max(stall, now - last_t)
    return (flow_bytes() - b0) / (time.monotonic() - t0), stall


def drops(st, key):
    return int(((st or {}).get("drops") or {}).get(key, 0))


def attack_start(tag):
    srcs = [UNDER % i for i in [HOSTS["x"]] + list(ATTACK_EXTRA)]
    h = TcpHolder(PREFIX + "x", UNDER % HOSTS["a"], 4000, CONNS, srcs, tmp, tag)
    check(h.wait_open(20) is not None, "the attacker could not open its connections")
    return h


def join_c():
    """Start C (bootstrap over TCP to A); seconds until its link to A is up
    and an overlay ping to A answers, or None."""
    c = start_node("c", bootstrap="tcp://%s:4000" % (UNDER % HOSTS["a"]))

    def joined():
        st, _ = status("c", timeout=3)
        if not up_conns(st):
            return False
        r = subprocess.run(["ip", "netns", "exec", PREFIX + "c", ipop_bin(), "ping", "--control",
                            ctl("c"), VNET % HOSTS["a"], "-c", "1", "-W", "1"],
                           capture_output=True, timeout=5)
        return r.returncode == 0
    dt = wait_for(joined, 10, poll=0.1)
    return c, dt


def status_prompt(name, tries=5):
    worst = 0.0
    for _ in range(tries):
        st, dt = status(name, timeout=5)
        if st is None:
            return None, dt
        worst = max(worst, dt)
        time.sleep(0.2)
    return st, worst


def step_flood(a):
    log("step 2: %d held connections at the default fd limit" % CONNS)
    base_fds = n_fds(ipop_pid(a))
    rate0, _ = flow_rate()
    cpu0 = cpu_share(ipop_pid(a))
    log("  flow before: %.0f KB/s; A's fds: %d, CPU %.0f%%" % (rate0 / 1024, base_fds, 100 * cpu0))
    atk = attack_start("default")
    st, worst = status_prompt("a")
    lab.check(st is not None and worst < 2.0,
              "A's status answers during the flood (slowest of 5: %.2f s)" % worst)
    c, dt = join_c()
    lab.check(dt is not None and dt <= 5.0, "C joins through A's TCP listener within 5 s (%s s)"
              % ("%.2f" % dt if dt is not None else "never"))
    rate, stall = flow_rate()
    # What this proves is that the flow goes on (no stall); how much of its
    # throughput it keeps is t_flood step 4's check, on a paced flow with
    # attacked and quiet seconds interleaved: this unpaced flow's rate
    # before the attack against one sample during it swung 39-94 % with the
    # machine's load, not the attack's.
    lab.check(stall < 2.0 and rate > 0,
              "the flow goes on: %.0f KB/s (%.0f%% of before, recorded), longest stall %.1f s"
              % (rate / 1024, 100.0 * rate / max(rate0, 1), stall))
    cpu = cpu_share(ipop_pid(a))
    lab.check(cpu - cpu0 < CPU_ADDED_MAX, "A's CPU during the flood: %.0f%% of a core (%.0f%% before it)"
              % (100 * cpu, 100 * cpu0))
    fds = n_fds(ipop_pid(a))
    lab.check(fds < base_fds + 128 + 16, "A holds %d descriptors (baseline %d, unproven cap 128)"
              % (fds, base_fds))
    st, _ = status("a")
    lab.check(drops(st, "pending_evicted") > 0, "A counts evicted unauthenticated streams (%d)"
              % drops(st, "pending_evicted"))
    lab.check(a.alive(), "A is alive")
    atk.stop()
    c.stop()


def step_fd_limit():
    log("step 3: A restarted with RLIMIT_NOFILE %d, the same flood" % LOW_NOFILE)
    a = start_node("a", nofile=LOW_NOFILE)
    check(wait_for(lambda: status("a")[0], 10) is not None, "A did not start:\n" + a.log_tail())
    check(wait_for(lambda: up_conns(status("a")[0]), 15) is not None, "B did not link A again")
    base_fds = n_fds(ipop_pid(a))
    cpu0 = cpu_share(ipop_pid(a))
    t_attack = time.monotonic()
    atk = attack_start("lowfd")
    time.sleep(0.5)         # (let the flood reach the limit before measuring)
    cpu = cpu_share(ipop_pid(a))
    lab.check(cpu - cpu0 < CPU_ADDED_MAX, "A's CPU at the fd limit: %.0f%% of a core, %.0f%% before it (no spin)"
              % (100 * cpu, 100 * cpu0))
    st, dt = status("a", timeout=5)
    lab.check(st is not None and dt < 2.0, "A's status answers at the fd limit (%s in %.2f s)"
              % ("answered" if st else "no answer", dt))
    lab.check(a.alive(), "A is alive at the fd limit")
    atk.stop()
    flood_s = time.monotonic() - t_attack
    dt = wait_for(lambda: status("a")[0], 10, poll=0.2)
    lab.check(dt is not None, "A's status answers after the attacker left (%s s)"
              % ("%.2f" % dt if dt is not None else "never"))
    st, worst = status_prompt("a")
    lab.check(st is not None and worst < 2.0, "... promptly (slowest of 5: %.2f s)" % worst)
    fl = drops(st, "fd_limit")
    lab.check(0 < fl <= 5 * flood_s + 5, "the flood reached the fd limit, and the listener rested "
              "there: %d failed accepts in %.1f s (4 a second at most)" % (fl, flood_s))
    c, dt = join_c()
    lab.check(dt is not None and dt <= 5.0, "C joins A after the flood within 5 s (%s s)"
              % ("%.2f" % dt if dt is not None else "never"))
    ok = wait_for(lambda: n_fds(ipop_pid(a)) <= base_fds + 4, 10) is not None
    lab.check(ok, "A's descriptors back to %d (baseline %d)" % (n_fds(ipop_pid(a)), base_fds))
    c.stop()
    a.stop()


class Exhaust(Lab):
    name, prefix, tools = "t_exhaust", PREFIX, ("ip", "prlimit")

    def __init__(self):
        global lab, tmp
        Lab.__init__(self)
        lab, tmp = self, self.dir

    def body(self):
        setup_lab()
        self.step("1 A, B, the flow", self.step_flow, fatal=True)
        a = self.a
        self.step("2 flood", lambda: step_flood(a))
        a.stop()
        self.step("3 fd limit", step_fd_limit)

    def step_flow(self):
        log("step 1: A, B, the flow")
        a = self.a = start_node("a")
        check(wait_for(lambda: status("a")[0], 10) is not None, "A did not start:\n" + a.log_tail())
        start_node("b", bootstrap="udp://%s:4000" % (UNDER % HOSTS["a"]))
        check(wait_for(lambda: up_conns(status("a")[0]), 15) is not None, "B did not link A")
        for name, src in (("echo", ECHO), ("flow", FLOW)):
            with open(os.path.join(tmp, name + ".py"), "w") as f:
                f.write(src)
        Proc("echo", ["ip", "netns", "exec", PREFIX + "a", sys.executable,
                      os.path.join(tmp, "echo.py"), VNET % HOSTS["a"], str(ECHO_PORT)], os.path.join(tmp, "echo.log"))
        Proc("flow", ["ip", "netns", "exec", PREFIX + "b", sys.executable, os.path.join(tmp, "flow.py"),
                      VNET % HOSTS["a"], str(ECHO_PORT), os.path.join(tmp, "flow.out")], os.path.join(tmp, "flow.log"))
        check(wait_for(lambda: flow_bytes() > 1 << 20, 20) is not None, "the flow did not start")


if __name__ == "__main__":
    Exhaust.main()
