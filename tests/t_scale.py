#!/usr/bin/env python3
"""Small scale test (issue 8), part of `make test`: tests/scale.py with
100 nodes joining over 20 s and 30 s of churn (20% of the nodes replaced
per minute, so 10 replacements, half SIGKILL, half SIGTERM).

Asserts (scale.py's verdict, thresholds set for a noisy shared 2-core
machine; `make scale` holds the full 1000-node run to the issue's targets):
  * ring consistent within 60 s of the last join, and again after churn
  * idle RSS <= 2 MB on every node, idle CPU p90 <= 1% of a core
  * >= 99% of 300 random pings succeed (static ring), >= 98% during churn,
    >= 99% of 200 after
  * every DHT record put before the churn, every ip: record of a live
    node and every name: of a live named node is still found
  * no node exits unless told to

Env: IPOP_TEST_SEED (random seed); extra scale.py flags in IPOP_SCALE_ARGS.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402
from lib import main_wrapper  # noqa: E402

ARGS = ["--nodes", "100", "--join-seconds", "20", "--settle", "3", "--idle-seconds", "10",
        "--pairs", "300", "--min-ok", "0.99",
        "--churn-minutes", "0.5", "--churn-rate", "0.2", "--churn-min-ok", "0.98",
        "--dht-keys", "30", "--ip-checks", "30", "--names", "10", "--dht-check-every", "15",
        "--pairs-after", "200", "--converge-max", "90",
        "--port-base", "34000",
        "--seed", os.environ.get("IPOP_TEST_SEED", str(int(time.time() * 1000) % 1000000))]

if __name__ == "__main__":
    main_wrapper(lambda: scale.run(ARGS + os.environ.get("IPOP_SCALE_ARGS", "").split()))
