"""mlxdist: MLX's distributed engine through mlx-c's C API, with a thread-safe Group.

Quick start (run under ``python -m mlxdist.launch -n 2 -- python script.py``)::

    import mlx.core as mx
    import numpy as np
    import mlxdist

    group = mlxdist.init()
    lazy = mlxdist.all_sum(mx.ones(4))                # as mx.distributed: lazy
    now = group.all_sum(np.full(4, group.rank(), np.float32))  # numpy: eager
"""

from mlxdist.backends import Backend, detect_backend, is_available
from mlxdist.buffers import asarray, empty, is_registered, set_cache_limit, zeros
from mlxdist.errors import (
    AllocationError,
    ArgumentTypeError,
    BackendUnavailableError,
    ConfigurationError,
    CommunicationError,
    DeadlineExceeded,
    MismatchError,
    PeerLostError,
    DistributedError,
    DtypeError,
    GroupClosedError,
    InitializationError,
    InvalidArgumentError,
    InvalidRankError,
    ShapeError,
    UnsupportedOperationError,
)
from mlxdist.group import Group
from mlxdist.world import (
    all_gather,
    all_gather_object,
    all_max,
    all_min,
    all_sum,
    all_to_all,
    barrier,
    broadcast,
    broadcast_object,
    evaluate as eval,  # noqa: A001  (mx.eval under the deadline)
    gather,
    init,
    recv,
    recv_like,
    scatter,
    on_failure,
    send,
    set_timeout,
    sum_scatter,
    world,
)

__version__ = "0.1.0"


__all__ = [
    "Backend",
    "Group",
    "init",
    "world",
    "is_available",
    "detect_backend",
    "all_sum",
    "all_max",
    "all_min",
    "all_gather",
    "sum_scatter",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all",
    "broadcast_object",
    "all_gather_object",
    "send",
    "recv",
    "recv_like",
    "barrier",
    "eval",
    "on_failure",
    "set_timeout",
    "empty",
    "zeros",
    "asarray",
    "is_registered",
    "set_cache_limit",
    "DistributedError",
    "BackendUnavailableError",
    "InitializationError",
    "ConfigurationError",
    "UnsupportedOperationError",
    "InvalidArgumentError",
    "InvalidRankError",
    "ShapeError",
    "ArgumentTypeError",
    "DtypeError",
    "AllocationError",
    "CommunicationError",
    "GroupClosedError",
    "PeerLostError",
    "DeadlineExceeded",
    "MismatchError",
]
