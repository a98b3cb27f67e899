#!/usr/bin/env python3
"""A stand-in for an MPI job, to try namespace mode without MPI installed.

    python3 allgather.py VIP1 VIP2 VIP3 ...

One rank per host, like `mpirun --host VIP1,VIP2,...`: the same command on
every host; each rank is the listed address it can bind.  It listens on its
own virtual IP (TCP port 5555), connects to every other rank, sends
its host name and reads theirs (an all-gather), waits until every rank
has done the same (a barrier, as MPI_Finalize does), prints one line and
exits 0.  Ranks wait up to 60 s for each other, so the hosts can start in
any order.  This is what an MPI job needs from the network: each process
binds a real address and reaches every other process's address directly,
with no proxy.  Run it as the command of `ipop up --mode ns ... --`.
"""
import socket
import sys
import threading
import time

PORT = 5555
WAIT = 60


def main():
    ranks = sys.argv[1:]
    if len(ranks) < 2:
        sys.exit("usage: allgather.py VIP1 VIP2 ... (the same list on every host)")
    me = srv = None
    for r in ranks:             # my rank: the listed address this host holds
        try:
            srv, me = socket.create_server((r, PORT)), r
            break
        except OSError:
            pass
    if srv is None:
        sys.exit("allgather: none of %s is an address of this host (run it inside "
                 "ipop up --mode ns ... --)" % " ".join(ranks))
    name = socket.gethostname()
    others = [r for r in ranks if r != me]
    srv.settimeout(WAIT)
    served, done = [], []

    def serve():  # answer every other rank's hello with our name; count its done
        while len(served) < len(others) or len(done) < len(others):
            c, _ = srv.accept()
            with c:
                c.settimeout(10)
                f = c.makefile("rw")
                words = f.readline().split()
                if words[:1] == ["hello"]:
                    f.write(name + "\n")
                    f.flush()
                    served.append(words[1:])
                elif words[:1] == ["done"]:
                    done.append(words[1:])

    def send(r, text, deadline):
        while True:
            try:
                with socket.create_connection((r, PORT), timeout=3) as s:
                    s.settimeout(10)
                    f = s.makefile("rw")
                    f.write(text + "\n")
                    f.flush()
                    return f.readline().strip()
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("rank %s: no answer from rank %s after %d s" % (me, r, WAIT))
                time.sleep(0.5)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    deadline = time.monotonic() + WAIT
    heard = {r: send(r, "hello " + name, deadline) for r in others}     # the all-gather
    for r in others:                    # the barrier, like MPI_Finalize: nobody leaves early
        send(r, "done " + me, deadline)
    t.join(max(1, deadline - time.monotonic()))
    if t.is_alive():
        sys.exit("rank %s: not every rank finished within %d s" % (me, WAIT))
    print("rank %s (%s): all %d ranks answered: %s" % (me, name, len(ranks), ", ".join(
        "%s=%s" % (r, heard[r]) for r in others)), flush=True)


if __name__ == "__main__":
    main()
