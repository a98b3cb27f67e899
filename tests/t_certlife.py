#!/usr/bin/env python3
"""Certificate lifetime: expiry and revocation reach live links and the DHT
(issue 18, item 10).

A certificate network of real `ipop up` nodes on loopback, all inside one
network namespace "hl-cl" (the test re-runs itself there), made with
`ipop ca init` / `ipop cert issue`; every node runs with --crl FILE.

 a. Expiry: node E's certificate is issued with `--valid-for 25s`.  E's
    status shows the end (cert_expires) and the warning (cert_expiring),
    and its log warns.  Once E is linked, its peers must close every link
    to E within the 2 s check period of the end (BYE reason 8, EXPIRED),
    and E's dials must be refused from then on (its peers count `refused`
    or E logs that they refused its credentials) with no link coming up.
 b. Revocation and the DHT: node R publishes "note:rogue" (lease 1 h) and
    its name record "name:rogue".  R is revoked (`ipop ca revoke`, the list
    copied atomically, SIGHUP to the others): every other node must then
    answer "not found" for both keys within 5 s (before, the holders kept
    serving them until the lease ended, readers seeing "refused"), and a
    holder logs that it dropped them.
 c. A corrupt list on SIGHUP: a list whose first line is a valid serial and
    whose second is not replaces the good one.  Each node logs one warning
    (not one a tick), and the old revocations stay in force: R, restarted,
    is refused and links to nobody.  (Before, the first line had already
    overwritten R's serial in the list in force.)

Needs root (a network namespace).  Prints PASS/FAIL lines; exits 1 on any
failure; the namespace and its processes are removed on exit.
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (Net, TestFailure, check, free_port, ipop_bin, lab_start, log,  # noqa: E402
                 main_wrapper, remove_netns, run_cli, sh, up_conns)

NS = "hl-cl"
VALID_S = 25            # E's certificate lifetime
CHECK_PERIOD_S = 2      # LINK_SEC_TICK_MS
SLACK_S = 4


def cli_ok(args, what):
    rc, out, err = run_cli(args, timeout=30)
    check(rc == 0, "%s: rc=%s %s" % (what, rc, (out + err).strip()[-300:]))
    return out


def wait_for(cond, timeout, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return time.monotonic() - t0
        time.sleep(step)
    return None


def log_text(node):
    try:
        with open(node.logpath, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def refused(node):
    st = node.status() or {}
    return int((st.get("drops") or {}).get("refused", 0))


def linked_to(nodes, addr):
    """The nodes that hold an up link to addr."""
    return [n for n in nodes if addr in up_conns(n.status() or {})]


def never_linked(nodes, addr, window_s):
    """Watch for window_s (over a check period): the nodes ever seen linked to addr."""
    seen = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < window_s:
        seen.update(n.label for n in linked_to(nodes, addr))
        time.sleep(0.2)
    return sorted(seen)


def dht(node, op, key, value=None, ttl=None):
    args = ["dht", op, key] + ([value] if value is not None else [])
    args += (["--ttl", str(ttl)] if ttl else []) + ["--control", node.ctl]
    return run_cli(args, timeout=15)


def write_atomic(path, text):
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


class Lab:
    def __init__(self, net):
        self.net = net
        self.ca = os.path.join(net.dir, "ca")
        self.crl = os.path.join(net.dir, "crl.txt")
        self.failures = []

    def result(self, ok, msg):
        print("  %s %s" % ("ok  " if ok else "FAIL", msg), flush=True)
        if not ok:
            self.failures.append(msg)

    def issue(self, name, ip, extra=()):
        d = os.path.join(self.net.dir, "cert-" + name)
        cli_ok(["cert", "issue", "--ca", self.ca, "--ip", ip, "--name", name, "--out", d] + list(extra),
               "cert issue " + name)
        return d

    def node(self, name, ip, certdir, boot=None, crl=None):
        kw = dict(udp=free_port(), creds=["--cert-dir", certdir, "--crl", crl or self.crl])
        if boot:
            kw["bootstrap"] = [boot.udp_uri]
        n = self.net.add(**kw)
        n.label, n.vip = name, ip
        return n.start()


def setup(lab):
    cli_ok(["ca", "init", "--out", lab.ca], "ca init")
    write_atomic(lab.crl, "# no revocations yet\n")
    n1 = lab.node("one", "10.5.0.1", lab.issue("one", "10.5.0.1"))
    lab.net.wait_ready([n1])
    others = [lab.node(nm, ip, lab.issue(nm, ip), boot=n1)
              for nm, ip in (("two", "10.5.0.2"), ("three", "10.5.0.3"), ("four", "10.5.0.4"))]
    own = os.path.join(lab.net.dir, "crl-rogue.txt")       # R's list: its restart must not meet the bad one
    write_atomic(own, "")
    r = lab.node("rogue", "10.5.0.6", lab.issue("rogue", "10.5.0.6"), boot=n1, crl=own)
    stable = [n1] + others
    lab.net.wait_ready(stable + [r])
    for n in stable + [r]:
        n.status()
    t = wait_for(lambda: all(len(up_conns(n.status() or {})) >= 2 for n in stable + [r]), 20)
    check(t is not None, "the five nodes did not link up within 20 s")
    log("ring of 5 up in %.1f s" % t)
    return stable, r


def case_a(lab, stable):
    log("=== a: a peer whose certificate expires is closed and cannot re-link")
    d = lab.issue("short", "10.5.0.5", ["--valid-for", "%ds" % VALID_S])
    e = lab.node("short", "10.5.0.5", d, boot=stable[0])
    lab.net.wait_ready([e])
    st = e.status() or {}
    end = st.get("cert_expires")
    lab.result(isinstance(end, int) and abs(end - (time.time() + VALID_S)) < 10 and st.get("cert_expiring") is True,
               "E's status: cert_expires %s (%.0f s from now), cert_expiring %s"
               % (end, (end or 0) - time.time(), st.get("cert_expiring")))
    t = wait_for(lambda: "certificate expires in" in log_text(e), 5)
    lab.result(t is not None, "E's log warns that its certificate expires soon")
    t = wait_for(lambda: linked_to(stable, e.address), VALID_S - 3)
    check(t is not None and time.time() < end - 1, "E did not link before its certificate ended (test too slow?)")
    peers = linked_to(stable, e.address)
    log("E linked to %s, %.1f s before its certificate ends" % ([p.label for p in peers], end - time.time()))
    before = sum(refused(n) for n in stable)
    deadline = end + 1 + CHECK_PERIOD_S + SLACK_S - time.time()     # X.509 times are whole seconds
    still = []

    def closed():
        still[:] = [p.label for p in linked_to(stable, e.address)]
        return time.time() >= end and not still
    t = wait_for(closed, max(deadline, 1))
    lab.result(t is not None, "every link to E closed %.1f s after its certificate ended (allowed %d s)%s"
               % (time.time() - end, 1 + CHECK_PERIOD_S + SLACK_S, "; still up at %s" % still if still else ""))
    said = [p.label for p in peers if re.search(r"closing .*certificate has expired", log_text(p))]
    lab.result(bool(said) and "reason 8" in log_text(e),
               "peers logged 'closing ...: its certificate has expired' (%s); E saw BYE reason 8" % said)
    t = wait_for(lambda: sum(refused(n) for n in stable) > before or
                 "refused this node's credentials" in log_text(e), 15)
    relinked = never_linked(stable, e.address, CHECK_PERIOD_S + 1)
    lab.result(t is not None and not relinked,
               "E's dials after the end are refused (refused %d -> %d) and nobody links it over %d s (%s)"
               % (before, sum(refused(n) for n in stable), CHECK_PERIOD_S + 1, relinked))
    e.kill()


def case_b(lab, stable, r):
    log("=== b: a revoked owner's DHT records are dropped when the list reloads")
    got = dht(r, "put", "note:rogue", "hello", ttl=3600)
    check(got[0] == 0, "R's put note:rogue: %r" % (got,))
    t = wait_for(lambda: all(dht(n, "get", "note:rogue")[0] == 0 and dht(n, "get", "name:rogue")[0] == 0
                             for n in stable), 10, step=0.5)
    check(t is not None, "note:rogue and name:rogue not readable everywhere before the revocation")
    log("note:rogue and name:rogue readable from all 4 others")
    cli_ok(["ca", "revoke", "--ca", lab.ca, "--cert", os.path.join(lab.net.dir, "cert-rogue", "node.crt")],
           "ca revoke")
    with open(os.path.join(lab.ca, "crl.txt")) as f:
        lab.good_crl = f.read()
    write_atomic(lab.crl, lab.good_crl)
    for n in stable:
        n.send(1)       # SIGHUP
    t0 = time.monotonic()
    answers = {}

    def gone():
        for n in stable:
            for key in ("note:rogue", "name:rogue"):
                answers[(n.label, key)] = dht(n, "get", key)
        return all(rc == 1 and "not found" in err for rc, _, err in answers.values())
    t = wait_for(gone, 5, step=0.3)
    bad = {k: (v[0], (v[1] + v[2]).strip()[-60:]) for k, v in answers.items()
           if not (v[0] == 1 and "not found" in v[2])}
    lab.result(t is not None, "after the reload every other node answers 'not found' for note:rogue (lease 1 h) "
               "and name:rogue (%.1f s after SIGHUP); otherwise: %s" % (time.monotonic() - t0, bad))
    said = [n.label for n in stable if "owner's certificate is revoked" in log_text(n)]
    lab.result(bool(said), "holders logged dropping the revoked owner's records: %s" % said)
    t = wait_for(lambda: not linked_to(stable, r.address), 5)
    lab.result(t is not None, "R's links are closed")


def case_c(lab, stable, r):
    log("=== c: a corrupt list on SIGHUP keeps the revocations in force")
    bad = "4f" * 16 + "  # a new, valid line first\nthis is not a serial\n" + lab.good_crl
    write_atomic(lab.crl, bad)
    for n in stable:
        n.send(1)
    t_hup = time.monotonic()

    def warned():
        return all("keeping the previous list" in log_text(n) for n in stable)
    t = wait_for(warned, 5)
    lab.result(t is not None, "each node warned about the bad list (%s)"
               % [n.label for n in stable if "keeping the previous list" in log_text(n)])
    r.kill()
    r.wait(5)
    before, mark = sum(refused(n) for n in stable), len(log_text(r))
    r.killed = False
    r.start()
    lab.net.wait_ready([r])
    t = wait_for(lambda: sum(refused(n) for n in stable) > before or
                 "refused this node's credentials" in log_text(r)[mark:], 15)
    linked = never_linked(stable, r.address, CHECK_PERIOD_S + 1)
    lab.result(t is not None and not linked,
               "R, restarted, is refused (refused %d -> %d) and links to nobody over %d s: %s"
               % (before, sum(refused(n) for n in stable), CHECK_PERIOD_S + 1, linked))
    rest = 2 * CHECK_PERIOD_S + 1 - (time.monotonic() - t_hup)
    if rest > 0:
        time.sleep(rest)    # two more checks of the unchanged bad file: they must stay quiet
    counts = {n.label: log_text(n).count("keeping the previous list") for n in stable}
    lab.result(all(c == 1 for c in counts.values()), "one warning per node for the bad file, not one per tick: %s"
               % counts)


def inner():
    with Net("t_certlife") as net:
        lab = Lab(net)
        stable, r = setup(lab)
        case_a(lab, stable)
        case_b(lab, stable, r)
        case_c(lab, stable, r)
        net.check_alive(stable)
        if lab.failures:
            raise TestFailure("%d check(s) failed: %s" % (len(lab.failures), "; ".join(lab.failures)))


def outer():
    def cleanup():
        remove_netns(NS, quiet=True)
    lab_start("t_certlife", cleanup, ["ip"], lambda: remove_netns(NS, quiet=True))
    sh(["ip", "netns", "add", NS])
    sh(["ip", "-n", NS, "link", "set", "lo", "up"])
    env = dict(os.environ, IPOP=ipop_bin())
    p = subprocess.run(["ip", "netns", "exec", NS, sys.executable, os.path.abspath(__file__), "--inner"], env=env)
    cleanup()
    sys.exit(p.returncode)


if __name__ == "__main__":
    if "--inner" in sys.argv:
        main_wrapper(inner)
    else:
        outer()
