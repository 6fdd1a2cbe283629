"""A rank blocked in an eager collective: rank 0 waits in all_sum for a peer
that sleeps instead of joining. Each rank prints its pid first."""

import os
import time

import numpy as np

import mlxdist

group = mlxdist.init(strict=True)
print(f"pid {os.getpid()} rank {group.rank()}", flush=True)
if group.rank() == 0:
    print("entering all_sum", flush=True)
    group.all_sum(np.ones(4, np.float32))
    print("all_sum returned", flush=True)
else:
    time.sleep(120)
