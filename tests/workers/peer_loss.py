"""Rank 1 dies mid-job; rank 0 must get CommunicationError, twice, and never hang."""

import os
import sys

import numpy as np

import mlxdist

group = mlxdist.init(strict=True)
group.barrier()
# Rank 1's last operation is a receive: it has nothing left queued to send when it
# exits, so rank 0's barrier cannot be the call that fails.
token = np.zeros(1, np.int32)
if group.rank() == 1:
    group.recv_like(token, 0)
    os._exit(0)
group.send(token, 1)
for attempt in ("first", "again"):
    try:
        group.all_sum(np.ones(1 << 16, np.float32))
    except mlxdist.CommunicationError as exc:
        print(f"{attempt}: CommunicationError: {exc}")
    else:
        sys.exit(f"{attempt}: no error after the peer died")
