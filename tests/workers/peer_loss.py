"""Rank 1 dies mid-job; rank 0 must get CommunicationError, twice, and never hang."""

import os
import sys

import numpy as np

import mlxdist

group = mlxdist.init(strict=True)
group.barrier()
if group.rank() == 1:
    os._exit(0)
for attempt in ("first", "again"):
    try:
        group.all_sum(np.ones(1 << 16, np.float32))
    except mlxdist.CommunicationError as exc:
        print(f"{attempt}: CommunicationError: {exc}")
    else:
        sys.exit(f"{attempt}: no error after the peer died")
