"""The same fault trial as mlxdist.bench.fault_rank, on mx.distributed alone (no mlxdist):
what MLX itself does when a peer dies or stops. Same argv and output lines."""

import os
import random
import signal
import sys
import threading
import time

import mlx.core as mx
import numpy as np

fault, op, elements, _timeout, victim, seed = sys.argv[1:7]
elements, victim, seed = int(elements), int(victim), int(seed)
group = mx.distributed.init(strict=True, backend=os.environ.get("MXD_BACKEND", "any"))
rank, size = group.rank(), group.size()
x = mx.array(np.full(elements, rank + 1, np.float32))


def step() -> None:
    if op == "all_sum":
        mx.eval(mx.distributed.all_sum(x, group=group))
    elif op == "all_gather":
        mx.eval(mx.distributed.all_gather(x, group=group))
    elif op == "sendrecv":
        left, right = (rank - 1) % size, (rank + 1) % size
        if rank == 0:
            mx.eval(mx.distributed.send(x, right, group=group))
            mx.eval(mx.distributed.recv_like(x, left, group=group))
        else:
            y = mx.distributed.recv_like(x, left, group=group)
            mx.eval(mx.distributed.send(y, right, group=group))


for _ in range(3):
    step()
print("READY", flush=True)
if rank == victim:
    delay = random.Random(seed).uniform(0.05, 0.4)

    def strike() -> None:
        time.sleep(delay)
        print(f"FAULT {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)

    threading.Thread(target=strike, daemon=True).start()
try:
    while True:
        step()
except Exception as exc:  # MLX raises RuntimeError
    print(f"RESULT {rank} {type(exc).__name__} {time.time():.3f} {exc}", flush=True)
    sys.exit(3)
