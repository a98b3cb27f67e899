#!/usr/bin/env python3
"""The README's first command: `make demo` must show a working network.
Runs tests/demo.sh (three user-mode nodes on loopback) and checks what it
prints: alice's page fetched by name through carol's SOCKS proxy, and
overlay pings without loss."""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
p = subprocess.run([os.path.join(here, "demo.sh")], capture_output=True, text=True, timeout=120,
                   stdin=subprocess.DEVNULL)
out = p.stdout + p.stderr
print(out)
checks = [
    (p.returncode == 0, "demo.sh exited %d" % p.returncode),
    ("Hello from alice, over ipop" in out, "the page fetched through SOCKS by name"),
    (out.count("0% loss") >= 2 and "100% loss" not in out, "overlay pings without loss"),
    ("10.128.0.1" in out.split("ipop resolve", 1)[-1].split("overlay pings", 1)[0],
     "ipop resolve alice.ipop printed alice's virtual IP"),
    (not [l for l in os.popen("ls /tmp").read().split() if l.startswith("ipop-demo-")],
     "the demo cleaned up its temp dir"),
]
bad = [m for ok, m in checks if not ok]
for ok, m in checks:
    print("%s: %s" % ("ok" if ok else "FAILED", m))
sys.exit(1 if bad else 0)
