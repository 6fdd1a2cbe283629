"""init, a barrier and a few all_sums; prints ``OK <rank> <sum>`` or ``RESULT <rank> <class> <message>``.

argv: timeout [number of all_sums after init, 10 ms apart; default 1]
"""

import sys
import time

import numpy as np

import mlxdist

try:
    group = mlxdist.init("ring", strict=True, timeout=float(sys.argv[1]))
except mlxdist.DistributedError as exc:
    print(f"RESULT -1 {type(exc).__name__} {exc}", flush=True)
    sys.exit(3)
rank = group.rank()
print(f"JOINED {rank}", flush=True)
total = 0.0
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
    total = float(group.all_sum(np.full(1024, rank + 1, np.float32))[0])
    time.sleep(0.01)
print(f"OK {rank} {total}", flush=True)
