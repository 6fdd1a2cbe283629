"""Soak: many small collectives with the watchdog on; threads sharing one group.

argv: mode (numpy | mlx | threads) count [check 0|1]

numpy/mlx: ``count`` all_sums of 16 float32 (mlx: lazy, each evaluated with
mlxdist.eval), RSS after a warm-up tenth and at the end: prints
``RSS <rank> <before kB> <after kB>``. threads: 8 threads x ``count`` all_sums
threads: 8 threads x ``count`` all_gathers on one group, all at once (the
group's lock serializes them; each rank takes them in its own order): every row
of every result must be one whole message of its rank, and every message of
every rank must arrive exactly once: prints ``THREADS <rank> <ops> <wrong> <peak>``
with ``peak`` the most threads inside a collective at the same time.
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
    threads_n, width = 8, 4096  # 32 KiB messages
    start = threading.Barrier(threads_n)
    tally = threading.Lock()
    state = {"ops": 0, "wrong": 0, "inside": 0, "peak": 0}
    received: set[tuple[int, int, int]] = set()  # (sender, thread, k) of every message that arrived

    def message(sender: int, t: int, k: int) -> np.ndarray:
        """A header naming its sender, thread and op, then a body only that header gives."""
        body = sender * 1e7 + t * 1e5 + k + np.arange(width - 3, dtype=np.float64)
        return np.concatenate([[sender, t, k], body])

    def work(t: int) -> None:
        start.wait()
        for k in range(count):
            with tally:
                state["inside"] += 1
                state["peak"] = max(state["peak"], state["inside"])
            got = group.all_gather(message(rank, t, k)[None])
            with tally:
                state["inside"] -= 1
                state["ops"] += 1
                # The ranks pair their collectives in whatever order each rank's threads
                # took the lock: row r is some whole message of rank r, never a mix.
                for sender, row in enumerate(got):
                    origin = (int(row[0]), int(row[1]), int(row[2]))
                    if origin[0] != sender or origin in received \
                            or not np.array_equal(row, message(*origin)):
                        state["wrong"] += 1
                    received.add(origin)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    every = {(r, t, k) for r in range(size) for t in range(threads_n) for k in range(count)}
    missing = len(every - received)
    print(f"THREADS {rank} {state['ops']} {state['wrong'] + missing} {state['peak']}", flush=True)
