#!/usr/bin/env python3
"""User-mode (unprivileged, lwIP + SOCKS5 + forwards) integration test;
needs root to build network namespaces, runs the user-mode nodes as nobody.

Every namespace, bridge and veth this test makes is named "tu*"; leftover
"tu-*" namespaces are removed at start (their processes killed), and all of
it (namespaces, ipop, servers, sshd) is removed on exit, failure, SIGTERM
or SIGINT.  Only processes this test started are ever signalled.

Layout: namespace tu-sw holds bridge tubr0; hosts tu-a .. tu-e
each get a veth (tu-eth, peer tupN on the bridge) with 192.168.95.N/24.
  B  tu-b  root, --mode tap, --ip 10.128.0.2/16 --name bob; python http
           server on 10.128.0.2:8000 (index.html + a 200 MB random file);
           UDP echo server on 10.128.0.2:5353
  A  tu-a  nobody, --mode auto (falls back to user mode), --ip 10.128.0.1/16,
           SOCKS5 on 127.0.0.1:1080, -R 80:127.0.0.1:9000 (http server in
           tu-a), -L 8081:10.128.0.2:8000
  C  tu-c  nobody, --ip 10.128.0.3/16 --socks off, -R 7:127.0.0.1:9007
           (echo server), -R 80:127.0.0.1:9000 (http server in tu-c)
  D  tu-d  nobody, --ip 10.128.0.4/16, SOCKS5 on 127.0.0.1:1080,
           -L 9107:10.128.0.3:7, -L 9180:10.128.0.3:80
  E  tu-e  nobody, --ip 10.128.0.5/16, started in step 9 only: SOCKS5 on
           192.168.95.5:1081 with --socks-auth
The nodes run a private copy of ./ipop taken at start ($IPOP is set to it).

 1. A runs as nobody, status mode "user"; curl in tu-a through A's SOCKS
    gets B's page by IP, as bob.ipop and as bob (--socks5-hostname); an
    unknown name fails with curl exit 97 in < 5 s.
 2. 200 MB download from B through A's SOCKS: sha256 matches; MB/s, A's RSS.
 3. ssh from tu-a to sshd on 10.128.0.2 with ProxyCommand='ipop nc %h %p'.
 4. -R: curl in tu-b to http://10.128.0.1:80/ gets A's local page; kernel
    ping tu-b -> 10.128.0.1 (lwIP answers); -L: curl in tu-a to
    127.0.0.1:8081 gets B's page.
 5. C and D, both user mode: D reaches C's -R services through -L only
    (http page; echo of 100 KB with half-close); then 100 concurrent
    connections through D's SOCKS to C's -R echo port, each echoing a
    distinct 64 KB payload; all 100 must match.
 6. malformed SOCKS against A: wrong version, truncated greeting/request,
    no acceptable method, unknown command, UDP ASSOCIATE (reply 0 with
    BND = 127.0.0.1:relay port, connection kept open), ATYP 4 and unknown ATYP,
    255-byte name, 10 KB garbage (raw and after a greeting), a net outside
    the virtual network, a refused port, a virtual IP nobody holds; then a
    normal curl through SOCKS works and A is alive.
 6b. greeting + CONNECT + the first request bytes in one write (optimistic
    data): the bytes after the CONNECT must reach the destination.
 7. backpressure: a SOCKS client asks for the 200 MB file and reads nothing
    for 5 s: A's VmRSS stays under 64 MB; then it reads on; sha256 matches.
 8. UDP ASSOCIATE (RFC 1928 section 7) from tu-a via A's SOCKS to a UDP echo
    server on 10.128.0.2:5353 (in tu-b): 20 datagrams of 1..1200 bytes, DNS
    style (one at a time, resent after 1 s, at most 3 sends), all back intact
    with the header naming 10.128.0.2:5353; datagrams with FRAG 1, ATYP 3, a
    destination outside the network, or under 10 bytes are dropped; a second
    sender on the relay is ignored; after the TCP control connection closes
    the relay no longer answers, its socket is gone and A's fds are back.
 9. node E (tu-e, nobody, --socks 192.168.95.5:1081 --socks-auth FILE with
    two users): a mode-644 FILE is refused at startup; from tu-a a correct
    login (curl -x socks5://user:pw@...) fetches B's page, the second user
    too (curl --socks5 user:pw@host:port); wrong password, another user's
    password, unknown user and no-auth are refused (curl 7/97); raw RFC 1929
    replies; E stays alive and a correct login works afterwards.
10. SOCKS to the node's own virtual IP: curl in tu-a via A's SOCKS to
    http://10.128.0.1:80/ (A's -R 80) 5 times, and a 4 MB file (sha256);
    A stays alive.
11. A lossy underlay: 2 % of D's UDP dropped in and out (nftables numgen);
    a 1 MB echo D -L 9107 -> C -R 7 comes back intact (lwIP's fast
    retransmits and timeouts, both ways).

Steps after the setup are independent checks: a failure is recorded and the
test goes on; the exit status is non-zero if any failed.  Node logs of a
failed run are kept in build/test-logs/t_user-nodes (or $IPOP_TEST_LOGDIR).
Env: IPOP_USER_FILE_MB (default 200), IPOP_KEEP_LOGS, IPOP_TEST_VERBOSE.
"""
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (TestFailure, sh, nsx, Proc, _pdeathsig, check, log, ipop_bin, Lab, NsNode, ns_add, bridge_add,  # noqa: E402
                 veth_to_bridge, wait_listen, sha256_file, proc_status, rss_mb, n_fds, RssSampler, SSH_OPTS)

NS_PREFIX = "tu-"
SW = "tu-sw"
BR = "tubr0"
UNDERLAY = "192.168.95.%d"
VNET = "10.128.0.%d"
PORT = 4000
FILE_MB = int(os.environ.get("IPOP_USER_FILE_MB", "200"))
RSS_LIMIT_MB = 64
STALL_S = 5
N_CONC = 100
CONC_BYTES = 64 * 1024
LOSS_PCT = 2               # step 11: share of D's UDP dropped, each way
LOSSY_BYTES = 1024 * 1024
SOCKS = "127.0.0.1:1080"
MARKER = "hello-over-ipop-nc"
UDP_PORT = 5353
SOCKS_E = "192.168.95.5:1081"     # node E: --socks-auth, on its underlay address
SELF_BYTES = 4 * 1024 * 1024

# --------------------------------------------------------------------------
# helper programs run inside the namespaces (written to the test dir)

HELPER = r'''
import hashlib, json, random, socket, socketserver, struct, sys, threading, time
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler


def socks_open(sh, sp, ip, port, timeout=15):
    """SOCKS5 CONNECT to ip:port (IPv4); returns the socket, or raises."""
    s = socket.create_connection((sh, sp), timeout)
    s.settimeout(timeout)
    s.sendall(b"\x05\x01\x00")
    if recvn(s, 2) != b"\x05\x00":
        raise RuntimeError("greeting refused")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", port))
    r = recvn(s, 10)
    if r[1] != 0:
        raise RuntimeError("SOCKS reply %d" % r[1])
    return s


def recvn(s, n):
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise RuntimeError("EOF after %d of %d bytes" % (len(b), n))
        b += x
    return b


def payload(i, n):
    return random.Random(i).randbytes(n)


def cmd_http(bind, port, d):
    class H(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=d, **kw)

        def log_message(self, *a):
            pass

    class S(ThreadingHTTPServer):
        request_queue_size = 512
        daemon_threads = True
        allow_reuse_address = True
    S((bind, int(port)), H).serve_forever()


def cmd_echo(bind, port):
    class E(socketserver.BaseRequestHandler):
        def handle(self):
            s = self.request
            try:
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    s.sendall(b)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    class S(socketserver.ThreadingTCPServer):
        request_queue_size = 512
        daemon_threads = True
        allow_reuse_address = True
    S((bind, int(port)), E).serve_forever()


def cmd_echo1(host, port, size):
    """One echo through a forward, with half-close: send, SHUT_WR, read to EOF."""
    size = int(size)
    p = payload(12345, size)
    t = time.monotonic()
    s = socket.create_connection((host, int(port)), 10)
    s.settimeout(20)
    got = []
    def rd():
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got.append(b)
        except OSError as e:
            got.append(("ERR %r" % e).encode())
    th = threading.Thread(target=rd)
    th.start()
    s.sendall(p)
    s.shutdown(socket.SHUT_WR)
    th.join(30)
    data = b"".join(got)
    print(json.dumps({"ok": data == p, "sent": len(p), "got": len(data),
                      "s": time.monotonic() - t}))


def cmd_conc(sh, sp, ip, port, n, size):
    """n concurrent SOCKS connections, all established before any sends its
    distinct payload; each reads its echo back (exactly len bytes)."""
    n, size, port, sp = int(n), int(size), int(port), int(sp)
    res = [None] * n
    lock = threading.Condition()
    state = {"ready": 0}
    go = threading.Event()
    t0 = time.monotonic()
    def worker(i):
        s = None
        try:
            try:
                s = socks_open(sh, sp, ip, port, timeout=30)
            finally:
                with lock:
                    state["ready"] += 1
                    lock.notify_all()
            go.wait(60)
            p = payload(i, size)
            s.settimeout(60)
            s.sendall(p)
            back = recvn(s, len(p))
            res[i] = "ok" if back == p else "MISMATCH (%d bytes)" % len(back)
        except Exception as e:
            res[i] = "ERR %r" % (e,)
        finally:
            if s is not None:
                s.close()
    ths = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in ths:
        t.start()
    with lock:
        lock.wait_for(lambda: state["ready"] >= n, 60)
    t_conn = time.monotonic() - t0
    go.set()
    for t in ths:
        t.join(120)
    bad = {i: r for i, r in enumerate(res) if r != "ok"}
    print(json.dumps({"n": n, "ok": n - len(bad), "connect_s": t_conn,
                      "total_s": time.monotonic() - t0,
                      "bad": {str(k): str(v) for k, v in list(bad.items())[:10]}}))


def read_close(s, limit=3.0):
    """Read until the peer closes; (data, how): how = eof|reset|timeout."""
    data = b""
    s.settimeout(limit)
    t = time.monotonic()
    while True:
        try:
            b = s.recv(4096)
        except socket.timeout:
            return data, "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return data, "reset"
        if not b:
            return data, "eof"
        data += b
        if time.monotonic() - t > limit:
            return data, "timeout"


def cmd_malformed(sh, sp, vip):
    sp = int(sp)
    out = []
    def case(name, fn):
        t = time.monotonic()
        try:
            ok, detail = fn()
        except Exception as e:
            ok, detail = False, "exception %r" % (e,)
        out.append({"case": name, "ok": ok, "detail": detail, "s": round(time.monotonic() - t, 3)})
    def conn():
        s = socket.create_connection((sh, sp), 5)
        s.settimeout(5)
        return s
    def greet(s):
        s.sendall(b"\x05\x01\x00")
        r = recvn(s, 2)
        if r != b"\x05\x00":
            raise RuntimeError("greeting reply %r" % r)
    def alive_greeting():
        s = conn()
        try:
            greet(s)
        finally:
            s.close()
        return True
    def send_safe(s, b):
        try:
            s.sendall(b)
            return "sent"
        except (BrokenPipeError, ConnectionResetError) as e:
            return "send failed %s" % type(e).__name__
    def expect_closed_no_reply(req, limit=3.0):
        s = conn()
        try:
            how_send = send_safe(s, req)
            data, how = read_close(s, limit)
            return (how in ("eof", "reset") and not data,
                    "%s; got %r then %s" % (how_send, data[:16], how))
        finally:
            s.close()
    def expect_reply(req, want, limit=5.0, greeting=True):
        s = conn()
        try:
            if greeting:
                greet(s)
            s.sendall(req)
            data, how = read_close(s, limit)
            code = data[1] if len(data) >= 2 else None
            ok = code in want and len(data) == 10 and data[0] == 5 and how in ("eof", "reset")
            return ok, "reply %r (code %s, want %s), then %s" % (data[:16], code, want, how)
        finally:
            s.close()
    ip = socket.inet_aton(vip)
    p80 = struct.pack(">H", 80)

    # background: a virtual IP nobody holds; lwIP's connect must give up
    slow = {}
    def unheld():
        t = time.monotonic()
        slow["r"] = expect_reply(b"\x05\x01\x00\x01" + socket.inet_aton(vip.rsplit(".", 1)[0] + ".99")
                                 + p80, (1, 4, 6), limit=20.0)
        slow["s"] = time.monotonic() - t
    bg = threading.Thread(target=unheld)
    bg.start()
    # background: a client that stalls in the greeting must be dropped
    idle = {}
    def idler():
        t = time.monotonic()
        s = conn()
        try:
            s.sendall(b"\x05\x01")
            data, how = read_close(s, 20.0)
            idle["r"] = (how in ("eof", "reset") and not data, "got %r then %s" % (data[:16], how))
        finally:
            s.close()
        idle["s"] = time.monotonic() - t
    bg2 = threading.Thread(target=idler)
    bg2.start()

    case("wrong version (a SOCKS4 CONNECT) -> closed, no reply",
         lambda: expect_closed_no_reply(b"\x04\x01\x00\x50" + ip + b"\x00"))
    def trunc_greeting():
        s = conn()
        s.sendall(b"\x05")
        s.close()
        time.sleep(0.2)
        return alive_greeting(), "sent 1 byte, closed; a new greeting is then answered"
    case("truncated greeting then close -> server fine", trunc_greeting)
    def trunc_request():
        s = conn()
        greet(s)
        s.sendall(b"\x05\x01\x00\x01\x0a")
        s.close()
        time.sleep(0.2)
        return alive_greeting(), "greeting + 5 request bytes, closed; a new greeting is then answered"
    case("truncated request then close -> server fine", trunc_request)
    def no_method():
        s = conn()
        try:
            s.sendall(b"\x05\x01\x02")
            data, how = read_close(s, 3.0)
            return data == b"\x05\xff" and how in ("eof", "reset"), "got %r then %s" % (data, how)
        finally:
            s.close()
    case("greeting without 'no auth' -> 05 ff and closed", no_method)
    case("unknown command 0x09 -> reply 7",
         lambda: expect_reply(b"\x05\x09\x00\x01" + ip + p80, (7,)))
    def udp_assoc_reply():
        s = conn()
        try:
            greet(s)
            s.sendall(b"\x05\x03\x00\x01" + bytes(6))
            r = recvn(s, 10)
            ok = r[:4] == b"\x05\x00\x00\x01" and r[4:8] == socket.inet_aton(sh) and r[8:10] != b"\x00\x00"
            data, how = read_close(s, 1.0)
            ok = ok and how == "timeout" and not data
            return ok, "reply %r, then %s (the association holds the connection open)" % (r, how)
        finally:
            s.close()
    case("UDP ASSOCIATE (cmd 3) -> reply 0, BND = %s:relay port, kept open" % sh, udp_assoc_reply)
    case("ATYP 4 (IPv6) -> reply 8",
         lambda: expect_reply(b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + p80, (8,)))
    case("ATYP 9 (unknown) -> reply 8",
         lambda: expect_reply(b"\x05\x01\x00\x09" + ip + p80, (8,)))
    case("255-byte domain name -> reply 4 or 1",
         lambda: expect_reply(b"\x05\x01\x00\x03\xff" + b"a" * 250 + b".ipop" + p80, (1, 4), limit=8.0))
    case("IPv4 outside the virtual network (192.0.2.1) -> reply 3",
         lambda: expect_reply(b"\x05\x01\x00\x01" + socket.inet_aton("192.0.2.1") + p80, (3,)))
    case("closed port on a live virtual host (%s.2:1) -> reply 5" % vip.rsplit(".", 1)[0],
         lambda: expect_reply(b"\x05\x01\x00\x01" + socket.inet_aton(vip.rsplit(".", 1)[0] + ".2")
                              + struct.pack(">H", 1), (5,), limit=12.0))
    rng = random.Random(7)
    garbage = bytes([0x47]) + rng.randbytes(10 * 1024 - 1)
    def garbage_raw():
        s = conn()
        try:
            how_send = send_safe(s, garbage)
            data, how = read_close(s, 3.0)
            return how in ("eof", "reset") and not data, "%s; got %r then %s" % (how_send, data[:16], how)
        finally:
            s.close()
    case("10 KB garbage -> closed", garbage_raw)
    def garbage_after_greeting():
        s = conn()
        try:
            greet(s)
            how_send = send_safe(s, b"\x05" + garbage[1:])
            data, how = read_close(s, 3.0)
            ok = how in ("eof", "reset") and (not data or (len(data) == 10 and data[1] != 0))
            return ok, "%s; got %r then %s" % (how_send, data[:16], how)
        finally:
            s.close()
    case("greeting + 10 KB garbage -> failure reply or closed", garbage_after_greeting)
    http_get = ("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % vip).encode()
    dst_b = socket.inet_aton(vip.rsplit(".", 1)[0] + ".2") + struct.pack(">H", 8000)
    def pipelined():
        s = conn()
        try:
            s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + dst_b)
            r = recvn(s, 12)
            s.sendall(http_get)
            data, how = read_close(s, 5.0)
            data = r + data
            ok = data[:2] == b"\x05\x00" and data[2:4] == b"\x05\x00" and b" 200 " in data[12:40]
            return ok, "got %r... (%d bytes) then %s" % (data[:30], len(data), how)
        finally:
            s.close()
    case("greeting + CONNECT in one write -> 05 00, reply 0, page", pipelined)
    def bytewise():
        s = conn()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for b in b"\x05\x01\x00" + b"\x05\x01\x00\x01" + dst_b:
                s.sendall(bytes([b]))
                time.sleep(0.01)
            r = recvn(s, 12)
            s.sendall(http_get)
            data, how = read_close(s, 5.0)
            data = r + data
            ok = data[:2] == b"\x05\x00" and data[2:4] == b"\x05\x00" and b" 200 " in data[12:40]
            return ok, "got %r... (%d bytes) then %s" % (data[:30], len(data), how)
        finally:
            s.close()
    case("greeting + CONNECT one byte per write -> reply 0, page", bytewise)
    bg.join(30)
    bg2.join(30)
    ok, detail = idle.get("r", (False, "no result"))
    out.append({"case": "idle after 2 greeting bytes -> closed by the server (timeout)",
                "ok": ok and idle.get("s", 99) < 15, "detail": detail, "s": round(idle.get("s", -1), 3)})
    ok, detail = slow.get("r", (False, "no result"))
    out.append({"case": "virtual IP nobody holds (.99) -> reply 4/6/1 within 20 s", "ok": ok,
                "detail": detail, "s": round(slow.get("s", -1), 3)})
    print(json.dumps(out))


def cmd_optimistic(sh, sp, ip, port):
    """Greeting, CONNECT and the first request bytes in ONE write (what
    clients with optimistic data / TCP fast open do): the bytes after the
    CONNECT request must reach the destination."""
    s = socket.create_connection((sh, int(sp)), 5)
    t = time.monotonic()
    try:
        s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", int(port))
                  + ("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % ip).encode())
        data, how = read_close(s, 5.0)
    finally:
        s.close()
    print(json.dumps({"ok": data[:4] == b"\x05\x00\x05\x00" and b" 200 " in data[12:40],
                      "got": repr(data[:40]), "len": len(data), "how": how, "s": time.monotonic() - t}))


def cmd_stall(sh, sp, ip, port, path, stall):
    """GET path through SOCKS; read the headers and a little, stop reading
    for `stall` s, then read to the end."""
    s = socks_open(sh, int(sp), ip, int(port))
    s.settimeout(60)
    s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, ip)).encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            raise RuntimeError("EOF in headers")
        buf += b
    hdr, body = buf.split(b"\r\n\r\n", 1)
    m = [l for l in hdr.decode(errors="replace").split("\r\n") if l.lower().startswith("content-length:")]
    clen = int(m[0].split(":")[1]) if m else -1
    h = hashlib.sha256(body)
    n = len(body)
    print("STALL %d" % n, flush=True)
    time.sleep(float(stall))
    print("RESUME", flush=True)
    t = time.monotonic()
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    el = time.monotonic() - t
    print(json.dumps({"bytes": n, "content_length": clen, "sha256": h.hexdigest(), "resume_s": el}),
          flush=True)


def cmd_udpecho(bind, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((bind, int(port)))
    while True:
        d, a = u.recvfrom(65535)
        u.sendto(d, a)


def udp_assoc(sh, sp, user=None, pw=None):
    """SOCKS5 UDP ASSOCIATE; returns (tcp socket, relay (host, port))."""
    s = socket.create_connection((sh, int(sp)), 10)
    s.settimeout(10)
    s.sendall(b"\x05\x01\x00")
    if recvn(s, 2) != b"\x05\x00":
        raise RuntimeError("greeting refused")
    s.sendall(b"\x05\x03\x00\x01" + bytes(6))
    r = recvn(s, 10)
    if r[:2] != b"\x05\x00" or r[3] != 1:
        raise RuntimeError("UDP ASSOCIATE reply %r" % r)
    return s, (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])


def udp_hdr(ip, port, frag=0, atyp=1):
    return b"\x00\x00" + bytes([frag, atyp]) + socket.inet_aton(ip) + struct.pack(">H", int(port))


def udp_hdr_name(name, port):
    n = name.encode()
    return b"\x00\x00\x00\x03" + bytes([len(n)]) + n + struct.pack(">H", int(port))


def udp_ask(u, hdr, p, tries=3, wait=1.0):
    """Send hdr + p until an answer carrying p comes back; the answer or None."""
    for _ in range(tries):
        u.send(hdr + p)
        u.settimeout(wait)
        try:
            while True:
                d = u.recv(65535)
                if d.endswith(p):
                    return d
        except socket.timeout:
            continue
    return None


def cmd_udpassoc(sh, sp, ip, port, name):
    """DNS-style exchange through UDP ASSOCIATE: 20 datagrams (1..1200 bytes),
    each sent and answered in turn (resent after 1 s, at most 3 sends);
    datagrams to the host's --name (answered from its address) and to an
    unknown one; datagrams the relay must drop; then the relay after the TCP
    close."""
    port = int(port)
    out = {"sizes": [], "bad": [], "resends": 0}
    t0 = time.monotonic()
    s, relay = udp_assoc(sh, sp)
    out["relay"] = "%s:%d" % relay
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect(relay)
    want_hdr = udp_hdr(ip, port)
    sizes = [1, 2, 3, 8, 17, 33, 64, 100, 128, 255, 256, 300, 511, 512, 700, 900, 1000, 1100, 1199, 1200]
    rtts = []
    for i, n in enumerate(sizes):
        p = payload(1000 + i, n)
        got = None
        for attempt in range(3):
            if attempt:
                out["resends"] += 1
            ts = time.monotonic()
            u.send(want_hdr + p)
            u.settimeout(1.0)
            try:
                while True:
                    d = u.recv(65535)
                    if d[10:] == p or d[:10] != want_hdr:
                        got = d
                        break
                    # a late answer to an earlier resend: ignore it
            except socket.timeout:
                continue
            rtts.append(time.monotonic() - ts)
            break
        if got is None:
            out["bad"].append("%d bytes: no answer after 3 sends" % n)
        elif got[:10] != want_hdr:
            out["bad"].append("%d bytes: header %r, want %r" % (n, got[:10], want_hdr))
        elif got[10:] != p:
            out["bad"].append("%d bytes: data differs (%d bytes back)" % (n, len(got) - 10))
        else:
            out["sizes"].append(n)
    rtts.sort()
    out["rtt_ms_p50"] = round(1000 * rtts[len(rtts) // 2], 3) if rtts else None
    # datagrams the relay must drop; then a valid one still works
    junk = {"frag 1": udp_hdr(ip, port, frag=1) + b"x", "atyp 3": udp_hdr(ip, port, atyp=3) + b"x",
            "outside the network (192.0.2.1)": udp_hdr("192.0.2.1", port) + b"x", "5 bytes": b"\x00" * 5}
    answered = []
    for k, d in junk.items():
        u.send(d)
        u.settimeout(0.5)
        try:
            u.recv(65535)
            answered.append(k)
        except socket.timeout:
            pass
    out["junk_answered"] = answered
    p = payload(79, 50)
    got = udp_ask(u, udp_hdr_name(name, port), p)
    out["by_name"] = "no answer" if got is None else "ok" if got == want_hdr + p else "header %r" % got[:10]
    got = udp_ask(u, udp_hdr_name(name + ".ipop", port), payload(80, 30))
    out["by_name_ipop"] = got == want_hdr + payload(80, 30)
    out["unknown_name_answered"] = udp_ask(u, udp_hdr_name("nosuch-host", port), payload(81, 20), 2) is not None
    out["control_char_name_answered"] = udp_ask(u, udp_hdr_name(name + "\x01", port), payload(82, 20), 1,
                                                0.5) is not None
    p = payload(77, 40)
    u.send(want_hdr + p)
    u.settimeout(2.0)
    try:
        out["after_junk"] = u.recv(65535) == want_hdr + p
    except socket.timeout:
        out["after_junk"] = False
    # a second client socket on the same relay is not our client: ignored
    u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u2.connect(relay)
    u2.send(want_hdr + b"intruder")
    u2.settimeout(1.0)
    try:
        u2.recv(65535)
        out["other_sender_answered"] = True
    except (socket.timeout, ConnectionRefusedError):
        out["other_sender_answered"] = False
    u2.close()
    # end the association: close the TCP control connection
    s.close()
    time.sleep(0.5)
    p = payload(78, 40)
    res = "?"
    for attempt in range(3):
        try:
            u.send(want_hdr + p)
            u.settimeout(1.0)
            u.recv(65535)
            res = "answered"
            break
        except socket.timeout:
            res = "timeout"
        except ConnectionRefusedError:
            res = "refused (ICMP port unreachable)"
            break
    out["after_close"] = res
    out["s"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out))


def cmd_authraw(sh, sp, user, pw):
    """Raw RFC 1929 exchanges: no-auth-only greeting, wrong password, right one."""
    out = {}
    s = socket.create_connection((sh, int(sp)), 5)
    s.settimeout(5)
    s.sendall(b"\x05\x01\x00")
    data, how = read_close(s, 3.0)
    s.close()
    out["noauth"] = "%r then %s" % (data, how)
    out["noauth_ok"] = data == b"\x05\xff" and how in ("eof", "reset")
    def login(u, p):
        s = socket.create_connection((sh, int(sp)), 5)
        s.settimeout(5)
        s.sendall(b"\x05\x02\x00\x02")
        r = recvn(s, 2)
        s.sendall(b"\x01" + bytes([len(u)]) + u.encode() + bytes([len(p)]) + p.encode())
        return s, r, recvn(s, 2)
    s, r1, r2 = login(user, pw + "x")
    data, how = read_close(s, 3.0)
    s.close()
    out["wrong"] = "method %r, auth reply %r, then %r %s" % (r1, r2, data, how)
    out["wrong_ok"] = r1 == b"\x05\x02" and r2[0] == 1 and r2[1] != 0 and how in ("eof", "reset")
    s, r1, r2 = login(user, pw)
    s.close()
    out["right"] = "method %r, auth reply %r" % (r1, r2)
    out["right_ok"] = r1 == b"\x05\x02" and r2 == b"\x01\x00"
    print(json.dumps(out))


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
'''


# --------------------------------------------------------------------------
# process / namespace helpers (the t_tap style)



# --------------------------------------------------------------------------
# nodes

class Node(NsNode):
    def __init__(self, t, name, ns, idx, user, extra=()):
        NsNode.__init__(self, t, name, ns, VNET % idx)
        self.idx = idx
        self.uip = UNDERLAY % idx
        self.user = user            # True: run as the unprivileged user
        self.extra = list(extra)
        self.bootstrap = None
        if user:
            self.ctl = os.path.join(t.udir, "%s.sock" % name)

    def start(self, bootstrap=None):
        self.bootstrap = bootstrap
        return NsNode.start(self)

    def command(self):
        t = self.lab
        if self.user:
            a = ["setpriv", "--reuid=%d" % t.uid, "--regid=%d" % t.gid, "--clear-groups", "--inh-caps=-all",
                 "--", t.ubin, "up", "--secret-file", t.ukey]
        else:
            a = [ipop_bin(), "up", "--secret-file", t.key]
        a += ["--listen", "udp://%s:%d" % (self.uip, PORT), "--control", self.ctl, "--ip", self.vip + "/16"]
        if self.bootstrap:
            a += ["--bootstrap", self.bootstrap]
        if os.environ.get("IPOP_TEST_VERBOSE"):
            a.append("-v")
        return a + self.extra


# --------------------------------------------------------------------------
# the test

class UserTest(Lab):
    name, prefix = "t_user", NS_PREFIX
    tools = ("ip", "ping", "curl", "sshd", "ssh", "ssh-keygen", "ss", "setpriv")

    def __init__(self):
        # a private copy of the binary: ./ipop may be rebuilt while this runs
        self.bindir = tempfile.mkdtemp(prefix="ipop-t_user-bin-", dir="/tmp")
        os.chmod(self.bindir, 0o755)
        shutil.copy(ipop_bin(), os.path.join(self.bindir, "ipop"))
        os.environ["IPOP"] = os.path.join(self.bindir, "ipop")
        log("binary: private copy %s (sha1 %s)" % (ipop_bin(), hashlib.sha1(open(ipop_bin(), "rb").read()).hexdigest()[:12]))
        Lab.__init__(self)
        self.udir = None
        self.helper = os.path.join(self.dir, "helper.py")
        with open(self.helper, "w") as f:
            f.write(HELPER)
        os.chmod(self.dir, 0o755)       # helper.py readable for nobody too (not needed now)

    def body(self):
        log("t_user: dir %s, %d MB file" % (self.dir, FILE_MB))
        self.setup_underlay()
        self.step("0 setup", self.setup, fatal=True)
        for name, fn in (("1 socks+names", self.step_socks_names), ("2 200MB download", self.step_download),
                         ("3 ssh via ipop nc", self.step_ssh), ("4 -R/-L/ping", self.step_remote),
                         ("5 two user-mode nodes", self.step_user_pair), ("6 malformed socks", self.step_malformed),
                         ("6b socks data with the CONNECT", self.step_optimistic),
                         ("7 backpressure", self.step_backpressure),
                         ("8 udp associate", self.step_udp_assoc), ("9 socks-auth node", self.step_socks_auth),
                         ("10 socks to own virtual ip", self.step_self_connect),
                         ("11 lossy underlay", self.step_lossy)):
            self.step(name, fn)

    # ---- underlay
    def setup_underlay(self):
        ns_add(SW)
        bridge_add(SW, BR)
        for name, idx in (("tu-a", 1), ("tu-b", 2), ("tu-c", 3), ("tu-d", 4), ("tu-e", 5)):
            ns_add(name)
            veth_to_bridge(SW, BR, name, "tu-eth", "tup%d" % idx, UNDERLAY % idx + "/24")

    # ---- helpers
    def helper_proc(self, name, ns, args):
        p = Proc(name, ["ip", "netns", "exec", ns, sys.executable, self.helper] + list(args),
                 os.path.join(self.dir, "%s.log" % name))
        return p

    def helper_run(self, ns, args, timeout):
        rc, out, err = nsx(ns, [sys.executable, self.helper] + list(args), timeout=timeout,
                           check_rc=False)
        return rc, out, err

    def curl(self, ns, url, socks=None, hostname=False, timeout=15, extra=()):
        """(rc, body, stderr, seconds)."""
        a = ["curl", "-sS", "--max-time", str(timeout)]
        if socks:
            a += ["--socks5-hostname" if hostname else "--socks5", socks]
        a += list(extra) + [url]
        t = time.monotonic()
        rc, out, err = nsx(ns, a, timeout=timeout + 10, check_rc=False)
        return rc, out, err, time.monotonic() - t

    # ---- setup: nodes, servers, files
    def setup(self):
        pw = pwd.getpwnam("nobody")
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        sh([ipop_bin(), "genkey", "--out", self.key])
        os.chmod(self.key, 0o600)
        # the unprivileged user's dir: its own copy of the binary and the key
        self.udir = tempfile.mkdtemp(prefix="ipop-t_user-nobody-", dir="/tmp")
        self.ubin = os.path.join(self.udir, "ipop")
        shutil.copy(ipop_bin(), self.ubin)
        os.chmod(self.ubin, 0o755)
        self.ukey = os.path.join(self.udir, "net.key")
        shutil.copy(self.key, self.ukey)
        os.chown(self.ukey, self.uid, self.gid)
        os.chmod(self.ukey, 0o600)
        os.chown(self.udir, self.uid, self.gid)
        os.chmod(self.udir, 0o700)
        # web roots and the big file
        self.www = {}
        for h in ("a", "b", "c"):
            d = os.path.join(self.dir, "www-" + h)
            os.mkdir(d)
            tok = "page-from-%s-%s" % (h.upper(), os.urandom(6).hex())
            with open(os.path.join(d, "index.html"), "w") as f:
                f.write(tok + "\n")
            self.www[h] = tok
        self.self_file = os.path.join(self.dir, "www-a", "self.bin")
        sh(["sh", "-c", "head -c %d /dev/urandom > '%s'" % (SELF_BYTES, self.self_file)], timeout=30)
        self.self_sha = sha256_file(self.self_file)
        self.big = os.path.join(self.dir, "www-b", "big.bin")
        self.big_bytes = FILE_MB * 1024 * 1024
        sh(["sh", "-c", "head -c %d /dev/urandom > '%s'" % (self.big_bytes, self.big)], timeout=60)
        self.big_sha = sha256_file(self.big)

        boot = "udp://%s:%d" % (UNDERLAY % 2, PORT)
        b = Node(self, "B", "tu-b", 2, user=False, extra=["--mode", "tap", "--name", "bob"])
        a = Node(self, "A", "tu-a", 1, user=True,
                 extra=["-R", "80:127.0.0.1:9000", "-L", "8081:%s:8000" % VNET % 2])
        c = Node(self, "C", "tu-c", 3, user=True,
                 extra=["--socks", "off", "-R", "7:127.0.0.1:9007", "-R", "80:127.0.0.1:9000"])
        d = Node(self, "D", "tu-d", 4, user=True,
                 extra=["-L", "9107:%s:7" % VNET % 3, "-L", "9180:%s:80" % VNET % 3])
        for n in (a, b, c, d):
            self.nodes[n.name] = n
        # local services behind the -R forwards first
        srv = [self.helper_proc("http-a", "tu-a", ["http", "127.0.0.1", "9000", os.path.join(self.dir, "www-a")]),
               self.helper_proc("http-c", "tu-c", ["http", "127.0.0.1", "9000", os.path.join(self.dir, "www-c")]),
               self.helper_proc("echo-c", "tu-c", ["echo", "127.0.0.1", "9007"])]
        t0 = time.monotonic()
        b.start()
        self.wait_status([b], 10)
        for n in (a, c, d):
            n.start(bootstrap=boot)
        self.wait_status([a, b, c, d], 10)
        # B's tap carries 10.128.0.2 now: its http server binds there
        deadline = time.monotonic() + 10
        while True:
            rc, out, _ = nsx("tu-b", ["ip", "-o", "-4", "addr"], check_rc=False)
            if VNET % 2 + "/16" in out:
                break
            check(time.monotonic() < deadline, "tu-b has no %s/16 after 10 s: %s" % (VNET % 2, out))
            time.sleep(0.1)
        srv.append(self.helper_proc("http-b", "tu-b", ["http", VNET % 2, "8000", os.path.join(self.dir, "www-b")]))
        self.udpecho = self.helper_proc("udpecho-b", "tu-b", ["udpecho", VNET % 2, str(UDP_PORT)])
        for p, ns, ap in zip(srv, ("tu-a", "tu-c", "tu-c", "tu-b"),
                             ("127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9007", VNET % 2 + ":8000")):
            check(wait_listen(ns, ap, 10, p), "%s not listening on %s: %s" % (p.name, ap, p.log_tail(5)))
        self.ok("setup: B (tap, root) + A, C, D (nobody) answering status %.2f s after B started; "
                    "%d MB file sha256 %s..." % (time.monotonic() - t0, FILE_MB, self.big_sha[:16]))

    # ---- step 1
    def step_socks_names(self):
        a = self.nodes["A"]
        st = a.status() or {}
        ps = proc_status(a.pid)
        uid = (ps.get("Uid") or "").split()
        name = ps.get("Name", "")
        log("A: pid %d Name=%s Uid=%s; status mode=%r socks=%r interface=%r relays=%r"
            % (a.pid, name, uid, st.get("mode"), st.get("socks"), st.get("interface"), st.get("relays")))
        check(name == "ipop" and uid and all(u == str(self.uid) for u in uid),
              "A is not ipop running as nobody: Name=%r Uid=%r" % (name, uid))
        check(st.get("mode") == "user", "A status mode=%r, want 'user'" % st.get("mode"))
        check(st.get("socks") == SOCKS, "A status socks=%r, want %r" % (st.get("socks"), SOCKS))
        check(st.get("interface") is None, "A status interface=%r, want null" % st.get("interface"))
        lines = [ln for ln in a.proc.log_text().splitlines() if "user mode" in ln]
        self.ok("A runs as uid %s, status mode=user socks=%s; log: %r"
                    % (uid[0], st.get("socks"), lines[0].strip() if lines else None))
        for nm in ("C", "D"):
            s2 = self.nodes[nm].status() or {}
            check(s2.get("mode") == "user", "%s status mode=%r, want 'user'" % (nm, s2.get("mode")))
        self.ok("C, D status mode=user; C socks=%r (--socks off), D socks=%r"
                    % ((self.nodes["C"].status() or {}).get("socks"), (self.nodes["D"].status() or {}).get("socks")))
        # by IP: the ring needs a moment; poll up to 20 s
        t0 = time.monotonic()
        tries = 0
        while True:
            tries += 1
            rc, out, err, el = self.curl("tu-a", "http://%s:8000/" % VNET % 2, socks=SOCKS, timeout=5)
            if rc == 0 and self.www["b"] in out:
                break
            if time.monotonic() - t0 > 20:
                self.dump_logs(["A", "B"], 20)
                raise TestFailure("curl --socks5 %s http://%s:8000/ in tu-a: rc=%s %r (20 s of tries)"
                                  % (SOCKS, VNET % 2, rc, (err or out)[-300:]))
            time.sleep(0.3)
        self.ok("curl --socks5 via A -> http://%s:8000/ ok (%.2f s after nodes up, %d tries, last %.3f s)"
                    % (VNET % 2, time.monotonic() - t0, tries, el))
        # by name, as bob.ipop and as bob; B's name record may lag a moment
        for host in ("bob.ipop", "bob"):
            t0 = time.monotonic()
            tries = 0
            while True:
                tries += 1
                rc, out, err, el = self.curl("tu-a", "http://%s:8000/" % host, socks=SOCKS,
                                             hostname=True, timeout=8)
                if rc == 0 and self.www["b"] in out:
                    break
                if time.monotonic() - t0 > 15:
                    self.dump_logs(["A", "B"], 15)
                    raise TestFailure("curl --socks5-hostname http://%s:8000/: rc=%s %r (15 s of tries)"
                                      % (host, rc, (err or out)[-300:]))
                time.sleep(0.3)
            self.ok("curl --socks5-hostname http://%s:8000/ -> B's page (%d tries, last %.3f s)"
                        % (host, tries, el))
        # an unknown name
        bogus = "nosuch%s.ipop" % os.urandom(3).hex()
        rc, out, err, el = self.curl("tu-a", "http://%s:8000/" % bogus, socks=SOCKS, hostname=True,
                                     timeout=15)
        log("unknown name %s: curl rc=%s in %.2f s: %r" % (bogus, rc, el, err.strip()[-200:]))
        check(rc == 97 and el < 5.0, "unknown name %s: curl rc=%s after %.2f s (want 97 in < 5 s): %r"
              % (bogus, rc, el, err.strip()[-200:]))
        self.ok("unknown name %s: curl exit 97 in %.2f s (%s)" % (bogus, el, err.strip()[-120:]))
        self.check_alive(["A", "B"])

    # ---- step 2
    def a_tx_records(self):
        """Records A's links have sent, all links together."""
        st = self.nodes["A"].status() or {}
        return sum(c.get("tx_packets", 0) for c in st.get("connections", []))

    def step_download(self):
        a = self.nodes["A"]
        rss0 = rss_mb(a.pid)
        tx0 = self.a_tx_records()
        samp = RssSampler(a.pid, 0.1)
        argv = ["ip", "netns", "exec", "tu-a", "curl", "-sS", "--fail", "--max-time", "120",
                "--socks5", SOCKS, "http://%s:8000/big.bin" % VNET % 2]
        h = hashlib.sha256()
        n = 0
        t = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=_pdeathsig)
        try:
            while True:
                b = p.stdout.read(1 << 20)
                if not b:
                    break
                h.update(b)
                n += len(b)
            rc = p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        el = time.monotonic() - t
        err = p.stderr.read().decode(errors="replace")
        samp.stop()
        rmax = samp.max_between()
        got = h.hexdigest()
        if not (rc == 0 and n == self.big_bytes and got == self.big_sha):
            self.dump_logs(["A", "B"], 20)
        check(rc == 0 and n == self.big_bytes and got == self.big_sha,
              "%d MB download via SOCKS: curl rc=%s, %d/%d bytes, sha256 %s vs %s: %r"
              % (FILE_MB, rc, n, self.big_bytes, got[:16], self.big_sha[:16], err.strip()[-300:]))
        # ACK thinning: lwIP acknowledges every second segment; A sends one
        # ACK per input batch and flow instead, so well under one record per
        # four segments of the download (about one per 26 measured).
        tx = self.a_tx_records() - tx0
        segs = n / 1308
        check(tx < segs / 4, "A sent %d records while receiving %d segments: ACKs not thinned "
              "(lwIP alone sends one per two)" % (tx, segs))
        self.ok("%d MB B -> A via SOCKS: %.2f s, %.1f MB/s, sha256 %s... matches; A VmRSS %.1f MB "
                    "before, max %.1f MB during; A sent %d records (%.1f segments each)"
                    % (FILE_MB, el, n / 1e6 / el, got[:16], rss0 or -1, rmax or -1, tx, segs / max(tx, 1)))

    # ---- step 3
    def step_ssh(self):
        srv, ck = self.sshd("tu-b", VNET % 2, ["LogLevel VERBOSE"])
        try:
            check(wait_listen("tu-b", "%s:22" % VNET % 2, 10, srv),
                  "sshd not listening on %s:22: %s" % (VNET % 2, srv.log_tail(10)))
            proxy = "%s nc %%h %%p" % ipop_bin()
            t = time.monotonic()
            rc, out, err = nsx("tu-a", ["ssh"] + SSH_OPTS + ["-i", ck, "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                                                           "-o", "ProxyCommand=" + proxy,
                                        "root@%s" % VNET % 2, "echo", MARKER], timeout=30, check_rc=False)
            el = time.monotonic() - t
            if not (rc == 0 and MARKER in out):
                print("  sshd log:\n%s" % srv.log_tail(20), flush=True)
                self.dump_logs(["A"], 15)
            check(rc == 0 and MARKER in out,
                  "ssh -o ProxyCommand='ipop nc %%h %%p' root@%s: rc=%s out=%r err=%r"
                  % (VNET % 2, rc, out[-200:], err[-300:]))
            self.ok("ssh -o ProxyCommand='ipop nc %%h %%p' root@%s echo (in tu-a, via A's SOCKS): "
                        "printed %r in %.2f s" % (VNET % 2, out.strip(), el))
        finally:
            srv.stop()

    # ---- step 4
    def step_remote(self):
        rc, out, err, el = self.curl("tu-b", "http://%s:80/" % VNET % 1, timeout=10)
        if not (rc == 0 and self.www["a"] in out):
            self.dump_logs(["A"], 15)
        check(rc == 0 and self.www["a"] in out,
              "-R: curl http://%s:80/ in tu-b: rc=%s out=%r err=%r" % (VNET % 1, rc, out[-100:], err[-300:]))
        self.ok("-R 80:127.0.0.1:9000 on A: plain curl in tu-b http://%s:80/ -> A's local page (%.3f s)"
                    % (VNET % 1, el))
        rc, out, err = nsx("tu-b", ["ping", "-n", "-c", "3", "-W", "2", VNET % 1], timeout=20,
                           check_rc=False)
        m = re.search(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/", out)
        check(rc == 0, "kernel ping tu-b -> %s (lwIP): rc=%s\n    %s" % (VNET % 1, rc, (out + err).strip()))
        self.ok("kernel ping tu-b -> %s (A's lwIP) ok, 3/3, avg rtt %s ms" % (VNET % 1, m.group(1) if m else "?"))
        rc, out, err, el = self.curl("tu-a", "http://127.0.0.1:8081/", timeout=10)
        check(rc == 0 and self.www["b"] in out,
              "-L 8081:%s:8000 on A: curl 127.0.0.1:8081 in tu-a: rc=%s out=%r err=%r"
              % (VNET % 2, rc, out[-100:], err[-300:]))
        self.ok("-L 8081:%s:8000 on A: curl in tu-a http://127.0.0.1:8081/ -> B's page (%.3f s)"
                    % (VNET % 2, el))

    # ---- step 5
    def echo_d_to_c(self, nbytes, timeout, what):
        """nbytes echoed from tu-d through D's -L 9107 to C's -R 7, with a
        half-close; the seconds it took (C's and D's logs shown if not)."""
        rc, out, err = self.helper_run("tu-d", ["echo1", "127.0.0.1", "9107", str(nbytes)], timeout=timeout)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {}
        if not r.get("ok"):
            self.dump_logs(["C", "D"], 20)
        check(r.get("ok"), "%s: rc=%s %r %r" % (what, rc, out[-300:], err[-300:]))
        return r["s"]

    def step_user_pair(self):
        dn = self.nodes["D"]
        t0 = time.monotonic()
        tries = 0
        while True:
            tries += 1
            rc, out, err, el = self.curl("tu-d", "http://127.0.0.1:9180/", timeout=5)
            if rc == 0 and self.www["c"] in out:
                break
            if time.monotonic() - t0 > 15:
                self.dump_logs(["C", "D"], 20)
                raise TestFailure("D -L 9180 -> C -R 80: curl rc=%s %r (15 s of tries)"
                                  % (rc, (err or out)[-300:]))
            time.sleep(0.3)
        self.ok("D -L 9180:%s:80 -> C -R 80:127.0.0.1:9000: curl in tu-d -> C's page "
                    "(%d tries, last %.3f s)" % (VNET % 3, tries, el))
        el = self.echo_d_to_c(100000, 40, "D -L 9107 -> C -R 7 echo of 100000 bytes with half-close")
        self.ok("D -L 9107:%s:7 -> C -R 7 echo: 100000 bytes back intact after SHUT_WR (%.3f s)"
                    % (VNET % 3, el))
        # 100 concurrent through D's SOCKS to C's -R echo port
        fd0 = n_fds(dn.pid)
        rc, out, err = self.helper_run("tu-d", ["conc", "127.0.0.1", "1080", VNET % 3, "7",
                                                str(N_CONC), str(CONC_BYTES)], timeout=150)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {}
        st = dn.status() or {}
        if r.get("ok") != N_CONC:
            self.dump_logs(["C", "D"], 25)
        check(r.get("ok") == N_CONC,
              "%d concurrent SOCKS connections D -> %s:7 (C -R echo): %s/%d ok; failures %r; rc=%s err=%r"
              % (N_CONC, VNET % 3, r.get("ok"), N_CONC, r.get("bad"), rc, err[-300:]))
        self.ok("%d concurrent SOCKS connections via D -> %s:7 (C's -R echo): all %d distinct %d KB "
                    "payloads echoed intact; all connected in %.2f s, done in %.2f s; D fds %s -> %s, "
                    "relays now %s" % (N_CONC, VNET % 3, N_CONC, CONC_BYTES // 1024, r["connect_s"],
                                       r["total_s"], fd0, n_fds(dn.pid), st.get("relays")))
        self.check_alive(["C", "D"])

    # ---- step 6
    def step_malformed(self):
        a = self.nodes["A"]
        fd0 = n_fds(a.pid)
        rc, out, err = self.helper_run("tu-a", ["malformed", "127.0.0.1", "1080", VNET % 1], timeout=90)
        try:
            cases = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TestFailure("malformed-SOCKS client produced no result: rc=%s %r %r"
                              % (rc, out[-300:], err[-500:]))
        bad = []
        for c in cases:
            print("    %-4s %-62s %6.3f s  %s" % ("ok" if c["ok"] else "FAIL", c["case"], c["s"], c["detail"]),
                  flush=True)
            if not c["ok"]:
                bad.append("%s (%s)" % (c["case"], c["detail"]))
        self.check_alive(["A"])
        rc, out2, err2, el = self.curl("tu-a", "http://%s:8000/" % VNET % 2, socks=SOCKS, timeout=10)
        alive_ok = rc == 0 and self.www["b"] in out2
        st = a.status() or {}
        info = "A alive, fds %s -> %s, relays %s" % (fd0, n_fds(a.pid), st.get("relays"))
        if bad or not alive_ok:
            self.dump_logs(["A"], 20)
        check(alive_ok, "after the malformed SOCKS cases, curl via SOCKS: rc=%s %r" % (rc, err2[-300:]))
        check(not bad, "%d/%d malformed-SOCKS case(s) failed: %s" % (len(bad), len(cases), "; ".join(bad)))
        self.ok("malformed SOCKS: all %d cases as expected; then curl via SOCKS ok (%.3f s); %s"
                    % (len(cases), el, info))

    # ---- step 6b
    def step_optimistic(self):
        rc, out, err = self.helper_run("tu-a", ["optimistic", "127.0.0.1", "1080", VNET % 2, "8000"],
                                       timeout=30)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TestFailure("optimistic-data client: rc=%s %r %r" % (rc, out[-300:], err[-300:]))
        log("greeting + CONNECT %s:8000 + GET in one write: got %d bytes %s then %s after %.2f s"
            % (VNET % 2, r["len"], r["got"], r["how"], r["s"]))
        check(r["ok"], "SOCKS client data sent in the same write as the CONNECT request is lost: "
              "greeting + CONNECT + 'GET /' in one write to A's SOCKS got only the two SOCKS replies "
              "(%d bytes: %s) and then %s after %.1f s, no HTTP response (the request bytes queued "
              "behind the CONNECT in the SOCKS input buffer are not handed to the relay)"
              % (r["len"], r["got"], r["how"], r["s"]))
        self.ok("greeting + CONNECT + GET in one write: reply 0 and the page (%.3f s)" % r["s"])

    # ---- step 7
    def step_backpressure(self):
        a = self.nodes["A"]
        rss0 = rss_mb(a.pid)
        samp = RssSampler(a.pid, 0.05)
        cl = self.helper_proc("stall-client", "tu-a", ["stall", "127.0.0.1", "1080", VNET % 2, "8000",
                                                       "/big.bin", str(STALL_S)])
        t_stall = t_resume = None
        sendq = None
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and cl.alive():
                txt = cl.log_text()
                if t_stall is None and "STALL" in txt:
                    t_stall = time.monotonic()
                if t_stall is not None and sendq is None and time.monotonic() - t_stall > STALL_S - 1.5:
                    rc, out, _ = nsx("tu-b", ["ss", "-Htn", "state", "established", "sport", "= :8000"],
                                     check_rc=False)
                    sendq = [int(ln.split()[1]) for ln in out.splitlines() if len(ln.split()) > 2]
                if "RESUME" in txt:
                    t_resume = time.monotonic()
                    break
                time.sleep(0.05)
            rc = cl.wait(120)
        finally:
            cl.stop()
            samp.stop()
        txt = cl.log_text()
        m = [ln for ln in txt.splitlines() if ln.startswith("{")]
        r = json.loads(m[-1]) if m else {}
        if t_stall is None or t_resume is None or not r:
            self.dump_logs(["A"], 20)
            raise TestFailure("stall client: rc=%s, output:\n%s" % (rc, cl.log_tail(15)))
        during = samp.max_between(t_stall, t_resume)
        after = samp.max_between(t_resume)
        log("A VmRSS: %.1f MB before, max %.1f MB during the %d s stall, max %.1f MB while reading on; "
            "B's server Send-Q during the stall: %s" % (rss0, during, STALL_S, after or -1, sendq))
        ok_data = r.get("bytes") == self.big_bytes and r.get("sha256") == self.big_sha
        if not ok_data or during is None or during >= RSS_LIMIT_MB:
            self.dump_logs(["A"], 20)
        check(during is not None and during < RSS_LIMIT_MB,
              "A's VmRSS reached %.1f MB while the SOCKS client read nothing for %d s (limit %d MB)"
              % (during or -1, STALL_S, RSS_LIMIT_MB))
        check(ok_data, "after the stall: %s/%d bytes, sha256 %s vs %s"
              % (r.get("bytes"), self.big_bytes, str(r.get("sha256"))[:16], self.big_sha[:16]))
        self.ok("backpressure: client read nothing for %d s: A VmRSS %.1f MB before, max %.1f MB "
                    "during (< %d), max %.1f MB after; B's socket Send-Q %s bytes; then %d MB completed "
                    "in %.2f s, sha256 matches" % (STALL_S, rss0, during, RSS_LIMIT_MB, after or -1, sendq,
                                                   FILE_MB, r["resume_s"]))
        self.check_alive(["A", "B"])

    # ---- step 8
    def step_udp_assoc(self):
        a = self.nodes["A"]
        check(self.udpecho.alive(), "UDP echo server in tu-b died: %s" % self.udpecho.log_tail(5))
        fd0 = n_fds(a.pid)
        rc, out, err = self.helper_run("tu-a", ["udpassoc", "127.0.0.1", "1080", VNET % 2, str(UDP_PORT), "bob"],
                                       timeout=120)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.dump_logs(["A"], 20)
            raise TestFailure("UDP ASSOCIATE client: rc=%s %r %r" % (rc, out[-300:], err[-500:]))
        time.sleep(0.3)
        rport = r["relay"].rsplit(":", 1)[1]
        _, ssu, _ = nsx("tu-a", ["ss", "-Huan"], check_rc=False)
        still = [ln.split()[3] for ln in ssu.splitlines()
                 if len(ln.split()) > 3 and ln.split()[3].endswith(":" + rport)]
        fd1 = n_fds(a.pid)
        log("UDP ASSOCIATE: relay %s, %d/20 datagrams back (resends %d, p50 %s ms), bad %s; junk answered %s; "
            "after junk %s; other sender answered %s; after TCP close: %s, relay socket %s; A fds %s -> %s"
            % (r["relay"], len(r["sizes"]), r["resends"], r["rtt_ms_p50"], r["bad"], r["junk_answered"],
               r["after_junk"], r["other_sender_answered"], r["after_close"], still or "gone", fd0, fd1))
        bad = []
        if r["relay"].split(":")[0] != "127.0.0.1":
            bad.append("BND.ADDR %s, want the SOCKS server's 127.0.0.1" % r["relay"])
        if len(r["sizes"]) != 20 or r["bad"]:
            bad.append("%d/20 datagrams came back intact with source %s:%d in the header; bad: %s"
                       % (len(r["sizes"]), VNET % 2, UDP_PORT, "; ".join(r["bad"])))
        if r["junk_answered"]:
            bad.append("datagrams the relay must drop were answered: %s" % r["junk_answered"])
        if r["by_name"] != "ok" or not r["by_name_ipop"]:
            bad.append("a datagram to B's --name (bob, bob.ipop): %s, %s; want the answer from %s:%d"
                       % (r["by_name"], r["by_name_ipop"], VNET % 2, UDP_PORT))
        if r["unknown_name_answered"] or r["control_char_name_answered"]:
            bad.append("a datagram to an unknown name or one with a control character was answered")
        if not r["after_junk"]:
            bad.append("after the dropped datagrams a valid one got no answer")
        if r["other_sender_answered"]:
            bad.append("a datagram from a second client socket was relayed and answered")
        if r["after_close"] == "answered":
            bad.append("the relay still answers after the TCP control connection closed")
        if still:
            bad.append("relay UDP socket %s still open in tu-a after the TCP close" % still)
        if fd0 is not None and fd1 is not None and fd1 > fd0:
            bad.append("A's fds %d -> %d after the association ended" % (fd0, fd1))
        if bad:
            self.dump_logs(["A"], 20)
        self.check_alive(["A", "B"])
        check(not bad, "UDP ASSOCIATE: " + "; ".join(bad))
        self.ok("UDP ASSOCIATE via A's SOCKS -> %s:%d (udp echo in tu-b): relay %s; 20/20 datagrams "
                    "of 1..1200 bytes back intact, header source %s:%d (%d resends, p50 rtt %s ms); "
                    "by B's --name too (bob, bob.ipop; an unknown name and a control character dropped); "
                    "frag/atyp 3/outside-net/short datagrams dropped; a second sender ignored; after the "
                    "TCP close: %s, relay socket gone; A fds %s -> %s"
                    % (VNET % 2, UDP_PORT, r["relay"], VNET % 2, UDP_PORT, r["resends"], r["rtt_ms_p50"],
                       r["after_close"], fd0, fd1))

    # ---- step 9
    def step_socks_auth(self):
        boot = "udp://%s:%d" % (UNDERLAY % 2, PORT)
        pws = {"alice": "al-" + os.urandom(8).hex(), "bob": "b0b:" + os.urandom(6).hex()}
        af = os.path.join(self.udir, "socks.auth")
        with open(af, "w") as f:
            f.write("".join("%s:%s\n" % kv for kv in pws.items()))
        os.chown(af, self.uid, self.gid)
        os.chmod(af, 0o600)
        # the same file readable by others must be refused at startup
        af2 = os.path.join(self.udir, "socks644.auth")
        shutil.copy(af, af2)
        os.chown(af2, self.uid, self.gid)
        os.chmod(af2, 0o644)
        e0 = Node(self, "E0", "tu-e", 5, user=True, extra=["--socks", SOCKS_E, "--socks-auth", af2]).start()
        rc0 = e0.proc.wait(5)
        if rc0 is None:
            e0.proc.stop()
        txt0 = e0.proc.log_text().strip().splitlines()
        check(rc0 not in (None, 0), "--socks-auth with a mode 644 file: node %s (want a startup error): %s"
              % ("still running after 5 s" if rc0 is None else "rc=%s" % rc0, txt0[-3:]))
        self.ok("--socks-auth FILE with mode 644: refused at startup, rc=%s: %r"
                    % (rc0, txt0[-1][-150:] if txt0 else ""))
        e = Node(self, "E", "tu-e", 5, user=True, extra=["--socks", SOCKS_E, "--socks-auth", af])
        self.nodes["E"] = e
        e.start(bootstrap=boot)
        self.wait_status([e], 10)
        st = e.status() or {}
        url = "http://%s:8000/" % VNET % 2
        t0 = time.monotonic()
        tries = 0
        while True:
            tries += 1
            rc, out, err, el = self.curl("tu-a", url, timeout=5,
                                         extra=["-x", "socks5://alice:%s@%s" % (pws["alice"], SOCKS_E)])
            if rc == 0 and self.www["b"] in out:
                break
            if time.monotonic() - t0 > 20 or not e.alive():
                self.dump_logs(["E"], 20)
                raise TestFailure("curl -x socks5://alice:***@%s %s in tu-a: rc=%s %r (20 s of tries)"
                                  % (SOCKS_E, url, rc, (err or out)[-300:]))
            time.sleep(0.3)
        self.ok("node E (nobody, --socks %s --socks-auth, 2 users, status socks=%r): "
                    "curl in tu-a -x socks5://alice:PW@%s -> B's page (%d tries, last %.3f s)"
                    % (SOCKS_E, st.get("socks"), SOCKS_E, tries, el))
        bad = []
        # the brief's form: --socks5 user:pass@host:port (the password holds a ':')
        rc, out, err, el = self.curl("tu-e", url, socks="bob:%s@%s" % (pws["bob"], SOCKS_E), timeout=10)
        if not (rc == 0 and self.www["b"] in out):
            bad.append("second user: curl --socks5 bob:PW@%s rc=%s %r" % (SOCKS_E, rc, err[-200:]))
        for what, extra in (("wrong password", ["-x", "socks5://alice:%sX@%s" % (pws["alice"], SOCKS_E)]),
                            ("other user's password", ["-x", "socks5://alice:%s@%s" % (pws["bob"], SOCKS_E)]),
                            ("unknown user", ["-x", "socks5://mallory:%s@%s" % (pws["alice"], SOCKS_E)]),
                            ("no auth (curl offers only 'no auth')", ["-x", "socks5://%s" % SOCKS_E])):
            rc, out, err, el = self.curl("tu-a", url, timeout=10, extra=extra)
            log("socks-auth %s: curl rc=%s in %.2f s: %r" % (what, rc, el, err.strip()[-120:]))
            if rc not in (7, 97) or self.www["b"] in out:
                bad.append("%s: curl rc=%s (want 7 or 97), page %s" % (what, rc, self.www["b"] in out))
        rc, out, err = self.helper_run("tu-a", ["authraw", SOCKS_E.split(":")[0], SOCKS_E.split(":")[1],
                                                "alice", pws["alice"]], timeout=30)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {}
            bad.append("raw RFC 1929 client: rc=%s %r %r" % (rc, out[-200:], err[-300:]))
        for k in ("noauth", "wrong", "right"):
            if r and not r.get(k + "_ok"):
                bad.append("raw %s: %s" % (k, r.get(k)))
        if r:
            log("raw RFC 1929: no-auth greeting -> %s; wrong password -> %s; right -> %s"
                % (r["noauth"], r["wrong"], r["right"]))
        # A (no --socks-auth) still takes 'no auth'; a client that offers only user/pass is refused
        rc, out, err, el = self.curl("tu-a", url, socks=SOCKS, timeout=10)
        if not (rc == 0 and self.www["b"] in out):
            bad.append("A without --socks-auth: plain curl via SOCKS rc=%s" % rc)
        if bad:
            self.dump_logs(["E"], 20)
        self.check_alive(["E"])
        rc, out, err, el = self.curl("tu-a", url, timeout=10,
                                     extra=["-x", "socks5://alice:%s@%s" % (pws["alice"], SOCKS_E)])
        if not (rc == 0 and self.www["b"] in out):
            bad.append("after the refusals a correct login fails: rc=%s %r" % (rc, err[-200:]))
        check(not bad, "--socks-auth: " + "; ".join(bad))
        self.ok("--socks-auth on E: second user (password with ':') ok; wrong password, other user's "
                    "password, unknown user, no-auth all refused by curl (rc 7/97); raw: no-auth greeting "
                    "-> 05 ff, wrong password -> %s; right -> 01 00; E alive, a correct login "
                    "works after the refusals" % (r.get("wrong", "?").split("auth reply ")[-1]))

    # ---- step 10
    def step_lossy(self):
        """lwIP's retransmissions (fast retransmit puts a segment back before
        the tail of the unacknowledged queue, a timeout moves the queue to
        unsent): LOSS_PCT % of D's UDP dropped both ways (nftables numgen),
        then a LOSSY_BYTES echo D -L 9107 -> C -R 7 must come back intact."""
        nft = ("add table inet tuloss\n"
               "add chain inet tuloss in { type filter hook input priority 0; }\n"
               "add chain inet tuloss out { type filter hook output priority 0; }\n"
               "add rule inet tuloss in meta l4proto udp numgen random mod 100 < %d drop\n"
               "add rule inet tuloss out meta l4proto udp numgen random mod 100 < %d drop\n"
               % (LOSS_PCT, LOSS_PCT))
        nsx("tu-d", ["nft", "-f", "-"], input=nft)
        try:
            el = self.echo_d_to_c(LOSSY_BYTES, 120, "echo of %d bytes over a %d %% lossy underlay"
                                  % (LOSSY_BYTES, LOSS_PCT))
        finally:
            nsx("tu-d", ["nft", "delete", "table", "inet", "tuloss"], check_rc=False)
        self.ok("D -L 9107 -> C -R 7 with %d %% of D's UDP dropped each way: %d bytes back intact (%.2f s)"
                % (LOSS_PCT, LOSSY_BYTES, el))
        self.check_alive(["C", "D"])

    def step_self_connect(self):
        a = self.nodes["A"]
        url = "http://%s:80/" % VNET % 1
        els = []
        for i in range(5):
            rc, out, err, el = self.curl("tu-a", url, socks=SOCKS, timeout=10)
            if not (rc == 0 and self.www["a"] in out):
                self.dump_logs(["A"], 25)
                raise TestFailure("curl --socks5 %s %s in tu-a (A's own virtual IP, its -R 80), try %d: "
                                  "rc=%s %r; A alive=%s" % (SOCKS, url, i + 1, rc, (err or out)[-300:],
                                                            a.alive()))
            els.append(el)
        out_f = os.path.join(self.dir, "self.out")
        t = time.monotonic()
        rc, _, err = nsx("tu-a", ["curl", "-sS", "--fail", "--max-time", "30", "--socks5", SOCKS, "-o", out_f,
                                  url + "self.bin"], timeout=40, check_rc=False)
        el = time.monotonic() - t
        got = sha256_file(out_f) if os.path.exists(out_f) else None
        if rc != 0 or got != self.self_sha:
            self.dump_logs(["A"], 25)
        self.check_alive(["A"])
        check(rc == 0 and got == self.self_sha, "%d MB from A's own virtual IP via A's SOCKS: rc=%s sha256 %s "
              "vs %s: %r" % (SELF_BYTES >> 20, rc, str(got)[:16], self.self_sha[:16], err[-200:]))
        rc, out, err, el2 = self.curl("tu-a", "http://%s:8000/" % VNET % 2, socks=SOCKS, timeout=10)
        check(rc == 0 and self.www["b"] in out, "after the self-connections, curl via SOCKS to B: rc=%s" % rc)
        self.ok("SOCKS to A's own virtual IP: 5x curl --socks5 %s %s -> A's -R page (max %.3f s); "
                    "%d MB self.bin in %.2f s, sha256 matches; A alive, SOCKS to B still ok"
                    % (SOCKS, url, max(els), SELF_BYTES >> 20, el))

    # ---- cleanup
    def close_more(self):
        if self.udir:
            shutil.rmtree(self.udir, ignore_errors=True)
        shutil.rmtree(self.bindir, ignore_errors=True)


if __name__ == "__main__":
    UserTest.main()
