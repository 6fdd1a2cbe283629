"""Rank 1 arrives late at an all_sum; the world group has its own 1 s deadline.

Prints ``RESULT <rank> <class> <seconds in the call> <message>``, then ``AGAIN <rank>
<class> <seconds>`` for a second call, then ``SAVED <rank>`` after writing a file
(the process is still usable), and exits 0. A callback given to ``mlxdist.on_failure``
before the failure prints ``CALLBACK <rank> <class> <thread>`` when the world fails;
one given after it prints ``LATE <rank> <class>`` at once.
"""

import os
import tempfile
import threading
import time

import numpy as np

import mlxdist

group = mlxdist.init(strict=True)  # MLXDIST_TIMEOUT=none in the environment
mlxdist.set_timeout(1.0, group)
rank = group.rank()
mlxdist.on_failure(lambda error: print(f"CALLBACK {rank} {type(error).__name__} {threading.current_thread().name}",
                                       flush=True), group)
group.barrier()
if rank == 1:
    time.sleep(2.5)
for tag in ("RESULT", "AGAIN"):
    t0 = time.monotonic()
    try:
        group.all_sum(np.ones(4, np.float32))
        print(f"{tag} {rank} none {time.monotonic() - t0:.3f}", flush=True)
    except mlxdist.DistributedError as exc:
        assert isinstance(exc, TimeoutError) == isinstance(exc, mlxdist.DeadlineExceeded)
        print(f"{tag} {rank} {type(exc).__name__} {time.monotonic() - t0:.3f} {exc}", flush=True)
mlxdist.on_failure(lambda error: print(f"LATE {rank} {type(error).__name__}", flush=True))
with tempfile.NamedTemporaryFile(delete=False) as f:
    np.save(f, np.arange(3))
os.unlink(f.name)
print(f"SAVED {rank}", flush=True)
