"""One fault trial: the victim rank kills or stops itself while every rank loops an operation.

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

fault, op, elements, timeout, victim, seed = sys.argv[1:7]
elements, timeout, victim, seed = int(elements), float(timeout), int(victim), int(seed)

group = mlxdist.init(strict=True, timeout=timeout)
rank, size = group.rank(), group.size()
x = np.full(elements, rank + 1, np.float32)
left, right = (rank - 1) % size, (rank + 1) % size


def step() -> None:
    if op == "all_sum":
        got = group.all_sum(x)
        assert got[0] == size * (size + 1) / 2, got[0]
    elif op == "all_gather":
        got = group.all_gather(x)
        assert got.shape[0] == size * elements
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


def strike_later() -> None:
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


# The warm-up is inside the try: the victim can finish its third operation (its last
# sends possibly still queued) and strike while a slow survivor is still in it; that
# survivor's error is the trial's result like any other.
try:
    for _ in range(3):
        step()
    print("READY", flush=True)
    if rank == victim and fault != "none":
        strike_later()
    while True:
        step()
except mlxdist.DistributedError as exc:
    print(f"RESULT {rank} {type(exc).__name__} {time.time():.3f} {exc}", flush=True)
    # A second call fails at once with the same class.
    try:
        step()
    except mlxdist.DistributedError as again:
        print(f"AGAIN {rank} {type(again).__name__}", flush=True)
    sys.exit(3)
print("NOERROR", flush=True)
