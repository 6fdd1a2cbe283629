"""A rank that behaves as told: `launch_probe.py MODE`, for the launcher's tests.

Modes: ok (print the rank), fail (rank 1 exits 3, the others wait), sleep (every rank waits).
"""

import os
import sys
import time

rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or -1)
mode = sys.argv[1]
print(f"hello from {rank}", flush=True)
if mode == "fail" and rank == 1:
    sys.exit(3)
if mode in ("fail", "sleep"):
    time.sleep(120)
