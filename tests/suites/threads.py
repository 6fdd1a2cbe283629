"""Threads and groups: per-group locks on MPI, close() while a peer is frozen.

Suites of the check harness (tests/support), run on 2 launched ranks.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import mlxdist
from mlxdist.group_record import record_of
from support.checks import Checks


def split_threads(checks: Checks, rounds: int = 40) -> None:
    """Two groups from split(), each used by its own thread, in the same order
    on every rank, at the same time (MPI with MPI_THREAD_MULTIPLE: one lock
    per group). With one lock per world this deadlocked: each rank's first
    thread held the lock waiting for a peer whose other thread held it."""
    g = checks.group
    rank, n = g.rank(), g.size()
    checks.expect("MPI gave MPI_THREAD_MULTIPLE", record_of(g).world.concurrent_groups)
    first, second = g.split(0), g.split(0)
    checks.expect("each split group has its own lock", record_of(first).lock is not record_of(second).lock)
    errors: list[str] = []
    summed: list[int] = []  # one entry per right sum (list.append is atomic)
    ready = threading.Barrier(2)

    def work(group: mlxdist.Group, offset: int) -> None:
        try:
            ready.wait(10)
            for i in range(rounds):
                x = np.full(1024, rank + offset + i, np.int64)
                got = group.all_sum(x)
                expected = sum(r + offset + i for r in range(n))
                if np.all(got == expected):
                    summed.append(offset)
                else:
                    errors.append(f"group {offset}: round {i}: {got[:2]} != {expected}")
        except Exception as e:  # noqa: BLE001 - reported as a failure
            errors.append(f"group {offset}: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=work, args=(grp, off), daemon=True) for grp, off in ((first, 0), (second, 1000))]
    start = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.0, start + 30 - time.monotonic()))
    if not checks.expect(
        "two groups on two threads: no deadlock",
        not any(t.is_alive() for t in workers),
        f"still blocked after {time.monotonic() - start:.0f} s",
    ):
        raise RuntimeError("deadlocked: the blocked threads hold the group locks")  # the worker exits at once
    checks.expect("two groups on two threads: right sums", not errors, "; ".join(errors[:3]))
    checks.expect("two groups on two threads: every round ran", len(summed) == 2 * rounds, f"{len(summed)} sums")
    first.close()
    second.close()
    checks.expect_equal("the world group afterwards", g.all_sum(np.array([rank], np.int32)), [n * (n - 1) // 2])


def close_while_blocked(checks: Checks, frozen: float = 2.0) -> None:
    """close() from another thread returns at once while rank 0's eager
    all_sum waits on a frozen peer; the blocked call completes once the peer
    joins, and the handle is released then."""
    g = checks.group
    rank, n = g.rank(), g.size()
    handle = mlxdist.init()  # a second handle on the world, to close
    x = np.full(4, rank + 1, np.float32)
    if rank == 0:
        result: dict[str, object] = {}

        def blocked() -> None:
            try:
                result["sum"] = handle.all_sum(x)
            except Exception as e:  # noqa: BLE001 - checked below
                result["error"] = e

        t = threading.Thread(target=blocked, daemon=True)
        t.start()
        time.sleep(0.3)
        checks.expect("the all_sum waits on the frozen peer", t.is_alive())
        handle.close()
        checks.expect("the group is closed at once", handle.closed)
        # close() did not wait for the blocked call: that call is still waiting for the frozen peer.
        checks.expect("close() returned while the all_sum still waits", t.is_alive())
        t.join(frozen + 20)
        checks.expect("the blocked all_sum ended", not t.is_alive())
        checks.expect_equal(
            "the blocked all_sum's result", result.get("sum", np.zeros(0)), np.full(4, n * (n + 1) / 2, np.float32)
        )
        checks.expect_raises(
            "the closed group afterwards", mlxdist.GroupClosedError, lambda: handle.all_sum(x), "closed"
        )
    else:
        time.sleep(frozen)  # frozen: joins late
        g.all_sum(x)
        handle.close()
    checks.expect_equal("the world group afterwards", g.all_sum(np.array([rank], np.int32)), [n * (n - 1) // 2])
