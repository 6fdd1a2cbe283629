"""Rank 1 stops itself (SIGSTOP) mid-loop; the others catch the typed error and exit 0.

argv: timeout (the per-operation deadline). Rank 1 prints ``STOP <unix time>``
just before stopping; each survivor prints ``CAUGHT <rank> <error class>``. The
survivors exit 0, as a program that handles the error does, so only the
launcher can end the stopped rank.
"""

import os
import signal
import sys
import time

import numpy as np

import mlxdist

group = mlxdist.init(strict=True, timeout=float(sys.argv[1]))
x = np.ones(4, np.float32)
for _ in range(5):
    group.all_sum(x)
if group.rank() == 1:
    print(f"STOP {time.time():.3f}", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
try:
    while True:
        group.all_sum(x)
except (mlxdist.DeadlineExceeded, mlxdist.PeerLostError) as exc:
    print(f"CAUGHT {group.rank()} {type(exc).__name__}", flush=True)
