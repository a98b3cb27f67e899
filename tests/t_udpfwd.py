#!/usr/bin/env python3
"""udp/ port forwards between two user-mode nodes on loopback (no root):
C exposes a local UDP echo service with -R udp/5300:127.0.0.1:ECHO, D reaches
it through -L udp/LOCAL:C's virtual IP:5300.  Two local clients at once get
their own replies back (one session each), sizes 1..1200 bytes."""
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import Net, free_port, log, main_wrapper, check  # noqa: E402
from lib import udp_echo_server as echo_server  # noqa: E402


def main():
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    stop = threading.Event()
    threading.Thread(target=echo_server, args=(echo, stop), daemon=True).start()
    local = free_port()
    try:
        with Net("t_udpfwd") as net:
            c = net.add(udp=free_port(), ip="10.128.0.3",
                        extra=["--mode", "user", "--socks", "off",
                               "-R", "udp/5300:127.0.0.1:%d" % echo.getsockname()[1]])
            c.start()
            time.sleep(0.3)
            d = net.add(udp=free_port(), ip="10.128.0.4", bootstrap=[c.udp_uri],
                        extra=["--mode", "user", "--socks", "off", "-L", "udp/%d:10.128.0.3:5300" % local])
            d.start()
            net.wait_ready()
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            for s in clients:
                s.settimeout(2)
            got = 0
            t0 = time.monotonic()
            for i in range(20):
                for k, s in enumerate(clients):
                    msg = b"c%d-%02d-" % (k, i) + b"x" * (i * 60)
                    for _ in range(3):              # the first may wait for the ring
                        s.sendto(msg, ("127.0.0.1", local))
                        try:
                            data, _ = s.recvfrom(4096)
                            got += data == msg
                            break
                        except socket.timeout:
                            continue
            log("udp forward: %d/40 datagrams echoed intact in %.2f s" % (got, time.monotonic() - t0))
            check(got == 40, "only %d/40 datagrams came back intact" % got)
            for n in (c, d):
                check(n.alive(), "%s died" % n.name)
    finally:
        stop.set()


if __name__ == "__main__":
    main_wrapper(main)
