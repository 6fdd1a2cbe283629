"""Soak: many small collectives with the watchdog on; threads sharing one group.

argv: mode (numpy | mlx | threads) count [check 0|1]

numpy/mlx: ``count`` all_sums of 16 float32 (mlx: lazy, each evaluated with
mlxdist.eval), RSS after a warm-up tenth and at the end: prints
``RSS <rank> <before kB> <after kB>``. threads: 8 threads x ``count`` all_sums
on one group, ordered by a turnstile so every rank issues them in the same
order; every result checked: prints ``THREADS <rank> <ops> <wrong>``.
"""

import sys
import threading

import mlx.core as mx
import numpy as np

import mlxdist

mode, count = sys.argv[1], int(sys.argv[2])
check = len(sys.argv) > 3 and sys.argv[3] == "1"
group = mlxdist.init(strict=True, timeout=60, check=check)
rank, size = group.rank(), group.size()


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one(i: int) -> None:
    if mode == "numpy":
        got = group.all_sum(np.full(16, i % 7 + rank, np.float32))
        expect = size * (i % 7) + size * (size - 1) / 2
        assert got[0] == expect, (i, got[0], expect)
    else:
        y = group.all_sum(mx.full((16,), i % 7 + rank, mx.float32))
        mlxdist.eval(y)
        assert y[0].item() == size * (i % 7) + size * (size - 1) / 2


if mode in ("numpy", "mlx"):
    warm = count // 10
    for i in range(warm):
        one(i)
    before = rss_kb()
    for i in range(warm, count):
        one(i)
    group.barrier()
    print(f"RSS {rank} {before} {rss_kb()}", flush=True)
else:
    threads_n = 8
    turn = threading.Condition()
    state = {"next": 0, "wrong": 0, "ops": 0}

    def work(t: int) -> None:
        for k in range(count):
            ticket = k * threads_n + t
            with turn:
                turn.wait_for(lambda: state["next"] == ticket)
            # Issued in ticket order on every rank; the value names the ticket.
            got = group.all_sum(np.full(8, ticket + rank, np.float64))
            with turn:
                state["ops"] += 1
                if got[0] != size * ticket + size * (size - 1) / 2:
                    state["wrong"] += 1
                state["next"] += 1
                turn.notify_all()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"THREADS {rank} {state['ops']} {state['wrong']}", flush=True)
