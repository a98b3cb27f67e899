#!/usr/bin/env python3
"""Hostile peers against connect-to-me and the IP map (issue 18, items 6
and 8), played by the kit (tests/kit_peer.c).  Loopback only, no root.

Item 6, connect-to-me as a reflector.  V (10.77.0.1) and B link; the kit K
(a member) routes V forged connect-to-me messages whose sender lists
endpoints where this test listens (UDP and TCP): 127.0.0.1:P, a scope V
lives in (it listens and was given bootstraps there), and 0.0.0.0:Q, which
the kernel delivers to 127.0.0.1:Q but nobody's endpoint is.
 1. 50 unasked replies (each from another made-up node) -> V dials nothing
    (0 datagrams, 0 connections at either address); ctm_unasked counts them.
 2. one request from a made-up node listing both -> V dials 127.0.0.1:P
    (the test sees its handshakes) and never 0.0.0.0:Q (dial_scope counts).
 3. 300 requests, each from another made-up node, listing 127.0.0.1:P2 ->
    V dials at most RING_ANSWER_BURST (16) plus 8 a second of them (counted
    in datagrams: a dial sends at most 6 handshakes), rationed ones are
    counted (ctm_rationed); V still answers B (its ring stays linked).
Item 8, IP map churn.  V (10.128.0.1/16, user mode) serves a UDP echo
through -R; L (10.128.0.2, user mode) reaches it through -L; K floods V.
 4. K sends INNER_IP packets from random sources, half outside 10.128/16,
    each from another made-up ring address, ~5000 a second for 6 s:
    V drops the outside ones (off_net_source), caps the lookups the rest
    begin (lookups_full), its IP map stays small (<= 100 entries: each
    found no record and is forgotten) and its DHT requests in flight
    <= 100 (of 1024); meanwhile a new flow from L through -L is echoed
    within 3 s, and the same holds with one sender (no rotation).
Every check prints PASS or FAIL; exit status non-zero if any failed.
"""
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import Net, free_port, log, main_wrapper, TestFailure  # noqa: E402
from lib import udp_echo_server as echo_server  # noqa: E402
from lib import soft_result as result, wait_value as wait_for, linked, node_drops as drops, soft_finish  # noqa: E402

ANSWER_BURST, ANSWER_PER_S, HS_PER_DIAL = 16, 8, 6


class Trap:
    """A UDP socket and a TCP listener on 127.0.0.1:port that count what
    arrives: datagrams and accepted connections."""

    def __init__(self):
        self.port = free_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen(64)
        self.datagrams = self.conns = 0
        self.stop = False
        for fn in (self._udp, self._tcp):
            threading.Thread(target=fn, daemon=True).start()

    def _udp(self):
        self.udp.settimeout(0.2)
        while not self.stop:
            try:
                self.udp.recvfrom(4096)
                self.datagrams += 1
            except socket.timeout:
                pass

    def _tcp(self):
        self.tcp.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.tcp.accept()
                self.conns += 1
                c.close()
            except socket.timeout:
                pass

    def eps(self, ip):
        return "udp:%s:%d tcp:%s:%d" % (ip, self.port, ip, self.port)

    def close(self):
        self.stop = True
        time.sleep(0.3)
        self.udp.close()
        self.tcp.close()


def reflector_cases():
    traps = []
    try:
        with Net("hostile-ring") as net:
            v = net.add(udp=free_port(), tcp=free_port(), ip="10.77.0.1")
            v.start()
            net.wait_ready([v])
            b = net.add(udp=free_port(), ip="10.77.0.2", bootstrap=[v.udp_uri])
            b.start()
            k = net.add(kit=True, udp=free_port(), ip="10.77.0.3", bootstrap=[v.udp_uri]).start()
            if not wait_for(lambda: linked(v, "10.77.0.2") and linked(v, "10.77.0.3"), 10):
                raise TestFailure("V did not link B and the kit")
            # 1. unasked replies
            may, never = Trap(), Trap()
            traps += [may, never]
            k.cmd("ctm-flood reply 10.77.0.1 50 1 %s %s" % (may.eps("127.0.0.1"), never.eps("0.0.0.0")))
            wait_for(lambda: drops(v).get("ctm_unasked", 0) >= 50, 3)
            time.sleep(4)          # V's deferred dials (250 ms), its UDP retries and TCP fallback
            got = (may.datagrams, may.conns, never.datagrams, never.conns)
            result(got == (0, 0, 0, 0), "case 1: 50 unasked replies made V dial nothing "
                   "(datagrams, connections at 127.0.0.1 and at 0.0.0.0: %s)" % (got,))
            result(drops(v).get("ctm_unasked", 0) >= 50, "case 1: V counted them (ctm_unasked %s)"
                   % drops(v).get("ctm_unasked"))
            # 2. one request: the scope V lives in, and not 0.0.0.0
            may2, never2 = Trap(), Trap()
            traps += [may2, never2]
            k.cmd("ctm-flood req 10.77.0.1 1 1 %s %s" % (never2.eps("0.0.0.0"), may2.eps("127.0.0.1")))
            wait_for(lambda: may2.datagrams, 3)
            time.sleep(1)
            result(may2.datagrams > 0, "case 2: V dials back a requester on loopback, where it lives "
                   "(%d datagrams)" % may2.datagrams)
            result(never2.datagrams == 0 and never2.conns == 0, "case 2: V never dials 0.0.0.0 "
                   "(%d datagrams, %d connections; dial_scope %s)"
                   % (never2.datagrams, never2.conns, drops(v).get("dial_scope")))
            # 3. a flood of requests from made-up nodes
            flood = Trap()
            traps.append(flood)
            n_req = 300
            t0 = time.monotonic()
            k.cmd("ctm-flood req 10.77.0.1 %d 1 %s" % (n_req, flood.eps("127.0.0.1")))
            wait_for(lambda: drops(v).get("ctm_rationed", 0) >= n_req - ANSWER_BURST - 8, 5)
            time.sleep(5)          # the dials' retries end (3 s), TCP fallbacks
            dt = time.monotonic() - t0
            # the flood arrives within a fraction of a second: its dials are the burst
            # plus a few refills; each sends at most HS_PER_DIAL handshakes
            dials_max = ANSWER_BURST + ANSWER_PER_S * 1
            rationed = drops(v).get("ctm_rationed", 0)
            log("case 3: %d requests: %d datagrams, %d connections at 127.0.0.1 in %.1f s; ctm_rationed %d"
                % (n_req, flood.datagrams, flood.conns, dt, rationed))
            result(flood.datagrams <= dials_max * HS_PER_DIAL,
                   "case 3: %d forged requests made at most %d dials (%d datagrams <= %d)"
                   % (n_req, dials_max, flood.datagrams, dials_max * HS_PER_DIAL))
            result(flood.conns <= dials_max, "case 3: TCP fallbacks bounded too (%d <= %d)"
                   % (flood.conns, dials_max))
            result(rationed >= n_req - dials_max, "case 3: V counted the rationed ones (%d)" % rationed)
            result(v.alive() and linked(v, "10.77.0.2") and linked(b, "10.77.0.1"),
                   "case 3: V keeps running and keeps its link to B")
    finally:
        for t in traps:
            t.close()


def flow_time(local, timeout):
    """Seconds until a new UDP flow through L's -L port is echoed, or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.25)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            s.sendto(b"hello", ("127.0.0.1", local))
            try:
                if s.recvfrom(4096)[0] == b"hello":
                    return time.monotonic() - t0
            except socket.timeout:
                pass
        return None
    finally:
        s.close()


def flood_case(net, v, k, local, rotate, label):
    stop = threading.Event()
    sent = [0]
    peak = {"ip_map": 0, "dht_pending": 0}

    def flooder():
        while not stop.is_set():
            k.cmd("ip-flood 250 10.128.0.1 10.128.0.0/16 %d" % rotate)
            sent[0] += 250
            time.sleep(0.05)

    def sampler():
        while not stop.is_set():
            st = v.status() or {}
            for key in peak:
                peak[key] = max(peak[key], st.get(key, 0))
            time.sleep(0.1)

    before = drops(v)
    th = [threading.Thread(target=flooder, daemon=True), threading.Thread(target=sampler, daemon=True)]
    t0 = time.monotonic()
    for t in th:
        t.start()
    time.sleep(1.5)
    took = flow_time(local, 6)
    time.sleep(max(0, 6 - (time.monotonic() - t0)))
    stop.set()
    for t in th:
        t.join(15)
    dt = time.monotonic() - t0
    d = drops(v)
    grew = {key: d.get(key, 0) - before.get(key, 0) for key in ("off_net_source", "lookups_full",
                                                                "source_mismatch")}
    log("case 4 (%s): %d packets in %.1f s (%.0f/s); V peaks: %s; drops: %s; new flow echoed after %s s"
        % (label, sent[0], dt, sent[0] / dt, peak, grew, "%.2f" % took if took is not None else "never"))
    result(v.alive(), "case 4 (%s): V keeps running" % label)
    result(took is not None and took < 3, "case 4 (%s): a new flow from L is echoed within 3 s (%s)"
           % (label, "%.2f s" % took if took is not None else "never"))
    result(grew["off_net_source"] > 0, "case 4 (%s): sources outside 10.128/16 dropped (off_net_source +%d)"
           % (label, grew["off_net_source"]))
    result(grew["lookups_full"] > 0, "case 4 (%s): lookups over the caps dropped (lookups_full +%d)"
           % (label, grew["lookups_full"]))
    result(peak["ip_map"] <= 100, "case 4 (%s): V's IP map stays small (peak %d entries)"
           % (label, peak["ip_map"]))
    result(peak["dht_pending"] <= 100, "case 4 (%s): V's DHT requests in flight stay bounded (peak %d of 1024)"
           % (label, peak["dht_pending"]))


def churn_cases():
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    stop = threading.Event()
    threading.Thread(target=echo_server, args=(echo, stop), daemon=True).start()
    try:
        with Net("hostile-ipmap") as net:
            v = net.add(udp=free_port(), ip="10.128.0.1/16",
                        extra=["--mode", "user", "--socks", "off",
                               "-R", "udp/5300:127.0.0.1:%d" % echo.getsockname()[1]])
            v.start()
            net.wait_ready([v])
            k = net.add(kit=True, udp=free_port(), ip="10.128.0.3/16", bootstrap=[v.udp_uri]).start()
            if not wait_for(lambda: linked(v, "10.128.0.3"), 10):
                raise TestFailure("the kit did not link V")
            # a new L each time: V has no mapping of its IP yet
            for vip, rotate, label in (("10.128.0.2", 1, "a made-up sender per packet"),
                                       ("10.128.0.4", 0, "one sender")):
                local = free_port()
                lnode = net.add(udp=free_port(), ip=vip + "/16", bootstrap=[v.udp_uri],
                                extra=["--mode", "user", "--socks", "off",
                                       "-L", "udp/%d:10.128.0.1:5300" % local])
                lnode.start()
                if not wait_for(lambda: linked(v, vip), 10):
                    raise TestFailure("L did not link V")
                flood_case(net, v, k, local, rotate, label)
    finally:
        stop.set()
        echo.close()


def main():
    reflector_cases()
    churn_cases()
    soft_finish()


if __name__ == "__main__":
    main_wrapper(main)
