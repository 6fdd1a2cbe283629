"""One rank of a fault trial (:mod:`mlxdist.bench.trials`): the victim rank kills or stops
itself while every rank loops an operation. ``python -m mlxdist.bench.fault_rank ARGS``.

argv: fault (kill | stop | raise | exit | none: injected from outside) op (all_sum | all_gather | sendrecv | lazy)
      elements timeout victim seed

Every rank prints ``READY`` once the loop runs; the victim prints ``FAULT <unix time>``
just before the fault; each survivor prints ``RESULT <rank> <error class> <unix time> <message>``
when the typed error arrives and then exits with status 3 (so the launcher ends the
stopped victim), or ``NOERROR`` if the loop ended without one.
"""

import os
import random
import signal
import sys
import threading
import time

import mlx.core as mx
import numpy as np

import mlxdist

def _step(group: mlxdist.Group, op: str, x: np.ndarray) -> None:
    """One operation of the loop."""
    rank, size = group.rank(), group.size()
    left, right = (rank - 1) % size, (rank + 1) % size
    if op == "all_sum":
        got = group.all_sum(x)
        assert got[0] == size * (size + 1) / 2, got[0]
    elif op == "all_gather":
        got = group.all_gather(x)
        assert got.shape[0] == size * x.shape[0]
    elif op == "sendrecv":
        # A token passed around the ring (neighbours only, as ring allows).
        if rank == 0:
            group.send(x, right)
            group.recv_like(x, left)
        else:
            got = group.recv_like(x, left)
            group.send(got, right)
    elif op == "lazy":
        y = mlxdist.all_sum(mx.array(x))  # lazy: communicates inside the eval
        mlxdist.eval(y)
    else:
        raise SystemExit(f"unknown op {op}")


def _strike_later(fault: str, seed: int) -> None:
    """On the victim: inject the fault after a seeded delay."""
    delay = random.Random(seed).uniform(0.05, 0.4)

    def strike() -> None:
        time.sleep(delay)
        print(f"FAULT {time.time():.3f}", flush=True)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif fault == "exit":
            os._exit(0)

    if fault == "raise":
        time.sleep(delay)
        print(f"FAULT {time.time():.3f}", flush=True)
        raise RuntimeError("the victim raised")
    threading.Thread(target=strike, daemon=True).start()


def main(argv: list[str]) -> int:
    """Run one rank of the trial (see the module docstring).

    Args:
        argv: fault, op, elements, timeout, victim, seed.

    Returns:
        3 after a typed error (so the launcher ends a stopped victim); 0 if none came.
    """
    fault, op = argv[0], argv[1]
    elements, timeout, victim, seed = int(argv[2]), float(argv[3]), int(argv[4]), int(argv[5])
    group = mlxdist.init(strict=True, timeout=timeout)
    rank = group.rank()
    x = np.full(elements, rank + 1, np.float32)
    # The warm-up is inside the try: the victim can finish its third operation (its last
    # sends possibly still queued) and strike while a slow survivor is still in it; that
    # survivor's error is the trial's result like any other.
    try:
        for _ in range(3):
            _step(group, op, x)
        print("READY", flush=True)
        if rank == victim and fault != "none":
            _strike_later(fault, seed)
        while True:
            _step(group, op, x)
    except mlxdist.DistributedError as exc:
        print(f"RESULT {rank} {type(exc).__name__} {time.time():.3f} {exc}", flush=True)
        # A second call fails at once with the same class.
        try:
            _step(group, op, x)
        except mlxdist.DistributedError as again:
            print(f"AGAIN {rank} {type(again).__name__}", flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:7]))
