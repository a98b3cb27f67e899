#!/usr/bin/env python3
"""ipop simulate (issue 8, the simulation half), part of `make test`.

A 2000-node simulation with a fixed seed and 30 virtual seconds of churn
(10% of the nodes replaced per minute), and a 500-node one with churn run
twice.  Asserts:
  * determinism: the two 500-node runs report the same numbers (all but
    wall-clock time and memory), and another seed gives other numbers
  * every node holds its 2+2 true ring neighbours after the join
  * routing success >= 99.9% right after the join (a flash crowd: 2000 nodes
    in 2 virtual seconds, probed 20 s later, while the far candidates that
    lost the RTT comparison are being closed; before closed links drained
    the peer's messages in flight, 1.4% were lost: docs/SCALING.md), hops
    mean and p99 <= log2 N
  * every DHT record put before the churn is read back after it
  * >= 98% of the probes during churn succeed (as t_scale.py; a crashed
    node black-holes its links for LINK_QUIET_MS), and >= 99.9% after it
  * the command line: --help exits 0, a bad or missing flag exits 2 with
    one line on stderr
"""
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import TestFailure, ipop_bin, log, main_wrapper  # noqa: E402

ARGS = ["--nodes", "2000", "--seed", "7", "--churn", "0.1", "--duration", "30",
        "--probes", "3000", "--dht-keys", "300", "--json"]
# What a seed does not fix: the machine's speed and the allocator's pages.
UNFIXED = {"wall_join_s", "wall_total_s", "rss_kb", "hwm_kb", "mem_per_node_bytes"}


def check(cond, what):
    if not cond:
        raise TestFailure(what)
    log("ok: " + what)


def simulate(args, timeout=600):
    p = subprocess.run([ipop_bin(), "simulate"] + args, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def run_json(args):
    rc, out, err = simulate(args)
    if rc != 0:
        raise TestFailure("ipop simulate %s: exit %d: %s" % (" ".join(args), rc, err.strip()))
    return json.loads(out)


def test_cli():
    rc, out, err = simulate(["--help"])
    check(rc == 0 and "--nodes" in out, "simulate --help exits 0 and lists --nodes")
    for bad in ([], ["--nodes", "1"], ["--nodes", "10", "--churn", "2"], ["--nodes", "10", "--bogus"]):
        rc, out, err = simulate(bad)
        check(rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("ipop: "),
              "simulate %s: exit 2, one line (%s)" % (" ".join(bad) or "(no flags)", err.strip()))


def test_run():
    small = ["--nodes", "500", "--churn", "0.2", "--duration", "20", "--probes", "1000", "--dht-keys", "50",
             "--json"]
    c = run_json(small + ["--seed", "7"])
    d = run_json(small + ["--seed", "7"])
    diff = sorted(k for k in c if k not in UNFIXED and c[k] != d.get(k))
    check(not diff, "same seed, same numbers (differ: %s)" % diff)
    e = run_json(small + ["--seed", "8"])
    check(c["events"] != e["events"] and c["routing"] != e["routing"], "another seed, other numbers")
    # Keepalives between live nodes are folded (no datagram); delivering
    # every one must not change the ring, and folding must save events.
    x = run_json(small + ["--seed", "7", "--exact-keepalives"])
    check(x["ring_consistent"] == c["ring_consistent"] == 500 and x["routing"]["success_pct"] == 100.0 and
          c["events"] < 0.8 * x["events"],
          "folded keepalives: ring %d/%d, events %d against %d delivered one by one"
          % (c["ring_consistent"], x["ring_consistent"], c["events"], x["events"]))
    a = run_json(ARGS)
    log("2000 nodes: " + json.dumps(a))

    n = a["nodes"]
    log2n = math.log2(n)
    check(a["ring_consistent"] == n, "ring consistent after the join: %d/%d" % (a["ring_consistent"], n))
    check(a["far_short"] * 100 <= n, "far links: mean %.2f, %d nodes short of their target"
          % (a["far_mean"], a["far_short"]))
    # Proximity neighbour selection keeps the lowest RTT of 3 probed
    # candidates: about half a random pair's RTT (random choice: all of it).
    check(a["far_rtt_ms"] <= 0.7 * a["pair_rtt_ms"],
          "far links' RTT %.1f ms <= 0.7 x a random pair's %.1f ms" % (a["far_rtt_ms"], a["pair_rtt_ms"]))
    # Links made in the join (HS_FINs: duplicates and losers included) are a
    # regression guard, as perfcheck's instruction count is: this seed gives
    # 17.5 per node; the requester dialling at once on a connect-to-me
    # reply gives 18.6, far repliers that always dial back 20.8.
    check(a["join_links_made_per_node"] <= 18.0,
          "links made per node in the join %.2f <= 18.0 (up links kept: %.2f)"
          % (a["join_links_made_per_node"], a["links_mean"]))
    r = a["routing"]
    check(r["success_pct"] >= 99.9, "routing without churn %.3f%% >= 99.9%%" % r["success_pct"])
    check(r["hops_mean"] <= log2n and r["hops_p99"] <= log2n,
          "hops mean %.2f, p99 %d <= log2 N = %.2f (max %d)" % (r["hops_mean"], r["hops_p99"], log2n, r["hops_max"]))
    check(a["replaced"] >= 90, "churn replaced %d nodes" % a["replaced"])
    ch = a["routing_churn"]
    check(ch["success_pct"] >= 98.0, "routing during churn %.3f%% >= 98%%" % ch["success_pct"])
    check(a["dht_put_ok"] == a["dht_keys"], "DHT puts %d/%d" % (a["dht_put_ok"], a["dht_keys"]))
    check(a["dht_found"] == a["dht_keys"], "DHT records after churn %d/%d" % (a["dht_found"], a["dht_keys"]))
    af = a["routing_after"]
    check(af["success_pct"] >= 99.9, "routing after churn %.3f%% >= 99.9%%" % af["success_pct"])


def main():
    test_cli()
    test_run()


if __name__ == "__main__":
    main_wrapper(main)
