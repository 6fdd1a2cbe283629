"""A rank that behaves as told: `launch_probe.py MODE`, for the launcher's tests.

Modes: ok (print the rank), fail (rank 1 exits 3, the others wait), segv (rank 2
dies of SIGSEGV, the others wait), sleep (every rank waits).
"""

import os
import signal
import sys
import time

rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or -1)
mode = sys.argv[1]
print(f"hello from {rank}", flush=True)
if mode == "fail" and rank == 1:
    sys.exit(3)
if mode == "segv" and rank == 2:
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGSEGV)
if mode in ("fail", "segv", "sleep"):
    time.sleep(120)
