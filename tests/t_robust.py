#!/usr/bin/env python3
"""Robustness test.

(a) CLI error handling: bad bootstrap host, garbage bootstrap URI, port in
    use, bad --config, unknown flags, --help, status/ping without a node.
(b) 4-node overlay; fuzz one node's UDP port with 20000 random datagrams and
    2000 mutated plausible packets (seeded with real packets captured from a
    probe node that bootstraps to a Python socket), and a TCP-listening node
    with garbage streams / bogus length prefixes / abrupt hangups. Then the
    nodes must be alive, answer status, have counted drops, and ping.
"""
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import shutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (Net, TestFailure, check, log, soft_check, soft_finish, SOFT_FAILS, run_cli, free_port, sha1_ip,  # noqa: E402
                 wait_ring, ping_pairs, report_pings, main_wrapper, ipop_bin,
                 short)

N_RANDOM = 20000
N_PLAUSIBLE = 2000
N_TCP_CONNS = 300

failures = SOFT_FAILS     # soft_check (lib) records here


def lines(s):
    return [l for l in (s or "").splitlines() if l.strip()]


def expect(args, name, rc_want, one_line=True, mention=None, timeout=10,
           out_has=None):
    """rc_want: int, or 'nonzero'."""
    t = time.monotonic()
    rc, out, err = run_cli(args, timeout=timeout)
    dt = time.monotonic() - t
    el = lines(err)
    desc = "%s: rc=%s in %.2fs, stderr=%r" % (name, rc, dt, "\n".join(el)[-400:])
    if rc is None:
        soft_check(False, desc + " (TIMED OUT after %ds, killed)" % timeout)
        return rc, out, err
    if rc_want == "nonzero":
        ok = rc != 0
    else:
        ok = rc == rc_want
    if one_line:
        ok = ok and len(el) == 1
    if mention:
        ok = ok and any(m in err for m in ([mention] if isinstance(mention, str) else mention))
    if out_has:
        ok = ok and out_has.lower() in (out + err).lower()
    exp = "want rc %s%s%s%s" % (rc_want, ", exactly 1 stderr line" if one_line else "",
                                 ", mentioning %r" % (mention,) if mention else "",
                                 ", output has %r" % out_has if out_has else "")
    soft_check(ok, desc + " [" + exp + "]")
    return rc, out, err


# ---------------------------------------------------------------------------


def part_a(tmp):
    log("=== (a) CLI error handling")
    ctl = os.path.join(tmp, "a.sock")
    key = os.path.join(tmp, "net.key")
    rc, _, err = run_cli(["genkey", "--out", key])
    check(rc == 0 and oct(os.stat(key).st_mode & 0o777) == "0o600",
          "ipop genkey --out makes a mode-600 key file (rc=%s %s)" % (rc, err.strip()))
    sec = ["--secret-file", key]

    def up(*extra, port=None, creds=sec):
        p = port or free_port()
        return ["up", "--listen", "udp://127.0.0.1:%d" % p, "--control", ctl] + list(creds) + list(extra)

    # credentials: secure by default, key files private, one mode at a time
    expect(up(creds=()), "up without credentials", 2, mention="genkey")
    loose = os.path.join(tmp, "loose.key")
    shutil.copy(key, loose)
    os.chmod(loose, 0o644)
    expect(up(creds=("--secret-file", loose)), "up --secret-file <mode 644>", 1, mention="chmod 600")
    bad = os.path.join(tmp, "bad.key")
    with open(bad, "w") as f:
        f.write("not hex\n")
    os.chmod(bad, 0o600)
    expect(up(creds=("--secret-file", bad)), "up --secret-file <not hex>", 1, mention="64 hex")
    expect(up("--insecure"), "up --secret-file --insecure", 2)
    expect(up("--crl", key), "up --crl without --cert-dir", 2, mention="--cert-dir")
    expect(up(creds=("--cert-dir", os.path.join(tmp, "nodir"))), "up --cert-dir <missing>", 1,
           mention="ca.crt")
    expect(["cert", "issue", "--ca", os.path.join(tmp, "nodir"), "--ip", "10.1.0.1",
            "--out", os.path.join(tmp, "o")], "cert issue with a missing CA", 1, mention="ca.key")
    expect(["ca"], "ipop ca (no subcommand)", 2)

    expect(["--help"], "ipop --help", 0, one_line=False, out_has="usage")
    for sub in ("up", "status", "ping", "genkey", "ca init", "cert issue", "ca revoke"):
        expect(sub.split() + ["--help"], "ipop %s --help" % sub, 0, one_line=False)
    expect(["--no-such-flag"], "ipop --no-such-flag", 2)
    expect(up("--no-such-flag"), "ipop up --no-such-flag", 2)
    expect(["status", "--control", ctl, "--bogus"], "ipop status --bogus", 2)
    expect(["frobnicate"], "ipop frobnicate (unknown command)", 2)

    expect(up("--bootstrap", "udp://no.such.host.invalid:4000"),
           "up --bootstrap udp://no.such.host.invalid:4000", "nonzero",
           mention="no.such.host.invalid", timeout=15)
    expect(up("--bootstrap", "garbage"), "up --bootstrap garbage", 2)
    expect(up("--bootstrap", "udp://127.0.0.1:99999"), "up --bootstrap port 99999", 2)
    expect(["up", "--listen", "http://127.0.0.1:4000", "--control", ctl] + sec,
           "up --listen http://...", 2)
    expect(up("--ip", "10.1.2.300"), "up --ip 10.1.2.300", 2)

    # ports in use
    for proto, typ in (("udp", socket.SOCK_DGRAM), ("tcp", socket.SOCK_STREAM)):
        p = free_port()
        s = socket.socket(socket.AF_INET, typ)
        s.bind(("127.0.0.1", p))
        if typ == socket.SOCK_STREAM:
            s.listen(1)
        try:
            expect(["up", "--listen", "%s://127.0.0.1:%d" % (proto, p), "--control", ctl] + sec,
                   "up --listen %s port in use" % proto, "nonzero", mention=str(p))
        finally:
            s.close()

    # bad config files
    garbage = os.path.join(tmp, "garbage.conf")
    with open(garbage, "wb") as f:
        f.write(os.urandom(3000))
    unreadable = os.path.join(tmp, "unreadable.conf")
    with open(unreadable, "w") as f:
        f.write("listen = udp://127.0.0.1:1\n")
    os.chmod(unreadable, 0)
    for path, what in ((garbage, "garbage bytes"), (os.path.join(tmp, "missing.conf"), "missing file"),
                       (tmp, "a directory"), (unreadable, "mode 000 (root can still read it)")):
        if path == unreadable and os.geteuid() == 0:
            continue  # root reads mode-000 files; not an error case
        expect(up("--config", path), "up --config <%s>" % what, "nonzero", one_line=False)

    # no node on the control socket
    missing = os.path.join(tmp, "nobody.sock")
    expect(["status", "--control", missing, "--json"], "status --json, no node", 3)
    expect(["status", "--control", missing], "status, no node", 3)
    expect(["ping", "--control", missing, "10.1.0.5", "-c", "1", "-W", "1"], "ping, no node", 3)
    # a stale socket file with nobody listening
    stale = os.path.join(tmp, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    expect(["status", "--control", stale, "--json"], "status, stale socket file", 3)


# ---------------------------------------------------------------------------


def capture_real_packets(net):
    """Start probe nodes that bootstrap to Python sockets; return
    (list of udp datagrams, tcp stream bytes) they sent us."""
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up_ = free_port()
    us.bind(("127.0.0.1", up_))
    us.settimeout(0.2)
    ts = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ts.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tp = free_port()
    ts.bind(("127.0.0.1", tp))
    ts.listen(4)
    ts.settimeout(0.2)
    pu = net.add(udp=free_port(), bootstrap=["udp://127.0.0.1:%d" % up_])
    pt = net.add(tcp=free_port(), ip="10.9.9.9", bootstrap=["tcp://127.0.0.1:%d" % tp])
    pu.start()
    pt.start()
    dgrams, stream = [], b""
    conns = []
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        try:
            d, _ = us.recvfrom(65536)
            dgrams.append(d)
        except socket.timeout:
            pass
        try:
            c, _ = ts.accept()
            c.settimeout(0.05)
            conns.append(c)
        except socket.timeout:
            pass
        for c in conns:
            try:
                b = c.recv(65536)
                if b:
                    stream += b
            except (socket.timeout, OSError):
                pass
    for c in conns:
        c.close()
    us.close()
    ts.close()
    for p in (pu, pt):
        p.kill(signal.SIGKILL)
        p.wait(5)
    log("captured %d real udp datagrams (%s) and %d tcp bytes from probe nodes"
        % (len(dgrams), ", ".join(sorted({"len%d/type0x%02x" % (len(d), d[1] if len(d) > 1 else 0)
                                           for d in dgrams}))[:200], len(stream)))
    if dgrams:
        log("  first datagram: %s" % dgrams[0][:48].hex())
    if stream:
        log("  tcp stream head: %s" % stream[:48].hex())
    return dgrams, stream


def drops_total(st):
    d = (st or {}).get("drops")
    if not isinstance(d, dict):
        return None
    return sum(v for v in d.values() if isinstance(v, (int, float)))


def drops_diff(a, b):
    a = (a or {}).get("drops") or {}
    b = (b or {}).get("drops") or {}
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b))
            if b.get(k, 0) != a.get(k, 0)}


def mutate(rng, base):
    b = bytearray(base)
    if len(b) < 2:
        b += bytes(2 - len(b))
    b[0] = 0x01
    b[1] = rng.randint(0, 20)
    op = rng.randint(0, 5)
    if op == 0 and len(b) > 0:          # truncate
        b = b[:rng.randint(0, len(b))]
    elif op == 1:                        # flip some bytes
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif op == 2:                        # append garbage
        b += os.urandom(rng.randint(1, 400))
    elif op == 3:                        # truncate header only
        b = b[:rng.randint(1, 24)]
    elif op == 4:                        # bogus big fields
        for _ in range(3):
            if len(b) > 6:
                i = rng.randrange(2, len(b) - 4)
                b[i:i + 4] = struct.pack(">I", rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 65535, 1500, 20]))
    # op 5: keep (replay with random type)
    return bytes(b)


def fuzz_udp(rng, port, templates):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    sent = errs = 0
    t = time.monotonic()
    for i in range(N_RANDOM + N_PLAUSIBLE):
        if i < N_RANDOM:
            d = os.urandom(rng.randint(0, 1500))
        else:
            d = mutate(rng, rng.choice(templates))
        try:
            socks[i % len(socks)].sendto(d, ("127.0.0.1", port))
            sent += 1
        except OSError:
            errs += 1
        if i % 100 == 99:
            time.sleep(0.002)  # pace so we test the parser, not the kernel queue
    for s in socks:
        s.close()
    log("udp fuzz: sent %d datagrams (%d random + %d plausible), %d send errors, %.2fs"
        % (sent, N_RANDOM, N_PLAUSIBLE, errs, time.monotonic() - t))


def fuzz_tcp(rng, port, stream):
    stats = {"ok": 0, "connect_fail": 0, "other_err": 0}
    lock = threading.Lock()

    def payload(kind, r):
        if kind == 0:
            return os.urandom(r.randint(0, 4096))
        if kind == 1:
            return struct.pack(">I", r.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 24, 65536, 1501])) + os.urandom(r.randint(0, 64))
        if kind == 2:
            return struct.pack(">H", r.choice([0xFFFF, 0, 1, 2, 1500])) + os.urandom(r.randint(0, 64))
        if kind == 3:
            return b"\x00\x00" * r.randint(1, 200)
        if kind == 4 and stream:
            return mutate(r, stream[:r.randint(1, len(stream))]) if r.random() < 0.5 else \
                stream[:r.randint(0, len(stream))]
        if kind == 5:
            # plausible length prefix then a truncated body
            body = bytes([1, r.randint(0, 20)]) + os.urandom(r.randint(0, 60))
            return struct.pack(">H", len(body) + r.randint(1, 100)) + body
        return os.urandom(r.randint(1, 64))

    def one(i):
        r = random.Random(rng.random() + i)
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            with lock:
                stats["connect_fail"] += 1
            return
        try:
            s.settimeout(2)
            s.sendall(payload(i % 7, r))
            if r.random() < 0.3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            elif r.random() < 0.3:
                try:
                    s.settimeout(0.3)
                    s.recv(100)
                except OSError:
                    pass
            with lock:
                stats["ok"] += 1
        except OSError:
            with lock:
                stats["other_err"] += 1
        finally:
            s.close()

    t = time.monotonic()
    # idle connections held open while the others run (slowloris-ish)
    idle = []
    for _ in range(30):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            stats["connect_fail"] += 1
    threads = []
    for k in range(8):
        th = threading.Thread(target=lambda k=k: [one(i) for i in range(k, N_TCP_CONNS, 8)])
        th.start()
        threads.append(th)
    for th in threads:
        th.join(60)
    time.sleep(0.5)
    for s in idle:
        s.close()
    log("tcp fuzz: %d connections (+30 idle): %r, %.2fs" % (N_TCP_CONNS, stats, time.monotonic() - t))


def part_b(rng):
    log("=== (b) fuzzing a live 4-node overlay")
    with Net("t_robust") as net:
        n0 = net.add(udp=free_port(), tcp=free_port(), ip="10.1.0.1")
        n1 = net.add(udp=free_port(), bootstrap=[n0.udp_uri])
        n2 = net.add(tcp=free_port(), bootstrap=[n0.tcp_uri])
        n3 = net.add(udp=free_port(), ip="10.1.0.3", bootstrap=[n0.udp_uri])
        core = [n0, n1, n2, n3]
        n0.start()
        net.wait_ready([n0])
        for n in core[1:]:
            n.start()
        net.wait_ready(core)
        check(n3.address == sha1_ip("10.1.0.3"), "n3 address %s != sha1(10.1.0.3)" % n3.address)
        el = wait_ring(net, core, timeout=30, label="4-node ring")
        log("4-node ring consistent in %.1fs" % el)

        def all_pairs(count):
            pairs = []
            for a in core:
                for b in core:
                    if a is not b:
                        pairs.append((a, b, b.ip if b.ip else b.address))
            return ping_pairs(net, pairs, wait=3, count=count)

        fails = report_pings(all_pairs(1), "baseline pings")
        check(not fails, "baseline pings failed")

        # misc CLI against a live node
        rc, out, err = run_cli(["status", "--control", n0.ctl], timeout=10)
        soft_check(rc == 0 and out.strip(), "human status rc=%s, %d lines" % (rc, len(lines(out))))
        soft_check(rc == 0 and n0.address[:8] in out,
                   "human status mentions the node address prefix %s" % n0.address[:8])
        ok, hops, rc, out = n0.ping("10.1.0.3", count=3, interval=0.2, wait=2)
        nrep = len([l for l in out.splitlines() if "reply from" in l])
        soft_check(ok and nrep == 3, "ping -c 3 -i 0.2 by ip: rc=%s, %d reply lines" % (rc, nrep))
        if nrep:
            log("  sample: %s" % [l for l in out.splitlines() if "reply from" in l][0])
        rc, out, err = run_cli(["ping", "--control", n0.ctl, "not-a-target", "-c", "1", "-W", "1"])
        soft_check(rc == 2, "ping with malformed target -> rc=%s (want 2): %r" % (rc, (out + err).strip()[:200]))
        unknown = "%040x" % rng.getrandbits(160)
        t = time.monotonic()
        rc, out, err = run_cli(["ping", "--control", n0.ctl, unknown, "-c", "1", "-W", "1"], timeout=15)
        soft_check(rc == 1, "ping to a nonexistent address -> rc=%s (want 1) in %.2fs"
                   % (rc, time.monotonic() - t))

        dgrams, stream = capture_real_packets(net)
        templates = list(dgrams)
        for t_ in range(21):
            templates.append(bytes([1, t_]) + os.urandom(rng.randint(0, 80)))
            templates.append(bytes([1, t_]) + bytes.fromhex(n1.address) + bytes.fromhex(n0.address)
                             + os.urandom(rng.randint(0, 120)))

        before = net.statuses(core)
        for n in (n1, n2):
            log("drops before on %s: %r" % (n.name, before[n].get("drops")))
        check(drops_total(before[n1]) is not None, "status has no 'drops' object: %r" % before[n1])

        fuzz_udp(rng, n1.udp, templates)
        fuzz_tcp(rng, n2.tcp, stream)
        time.sleep(1.0)

        net.check_alive(core)
        log("all 4 nodes alive after fuzzing")
        after = net.statuses(core)
        for n in core:
            check(after[n] is not None, "%s status does not answer after fuzzing" % n.name)
        d1 = drops_diff(before[n1], after[n1])
        d2 = drops_diff(before[n2], after[n2])
        log("drops rose on udp target %s by %d: %r" % (n1.name, sum(d1.values()), d1))
        log("drops rose on tcp target %s by %d: %r" % (n2.name, sum(d2.values()), d2))
        soft_check(drops_total(after[n1]) > drops_total(before[n1]),
                   "udp fuzz target's drops counters rose")
        if not drops_total(after[n2]) > drops_total(before[n2]):
            log("  note: tcp fuzz target's drops did not rise (not asserted)")

        el = wait_ring(net, core, timeout=15, label="ring after fuzz")
        fails = report_pings(all_pairs(2), "pings after fuzz")
        soft_check(not fails, "all 12 ordered pairs ping after fuzzing")
        net.check_alive(core)
        if failures:
            net.failed = True


def main():
    ipop_bin()
    seed = int(os.environ.get("IPOP_TEST_SEED", str(int(time.time() * 1000) % 1000000)))
    rng = random.Random(seed)
    log("t_robust seed=%d" % seed)
    tmp = tempfile.mkdtemp(prefix="ipop-robust-", dir="/tmp")
    try:
        part_a(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    part_b(rng)
    soft_finish()


if __name__ == "__main__":
    main_wrapper(main)
