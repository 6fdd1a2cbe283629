"""The side channel: a small TCP store between the ranks of one world.

Modules: :mod:`~mlxdist._sidechannel.protocol` (the wire format),
:mod:`~mlxdist._sidechannel.store` (rank 0's :class:`Store`) and
:mod:`~mlxdist._sidechannel.link` (every rank's :class:`Link`).

Rank 0 runs a :class:`Store`; every rank (rank 0 too) connects to it with a
:class:`Link`. Messages are JSON objects, one per line. The channel carries
what MLX's backends cannot: who joined (init rendezvous), who is alive
(connection state and heartbeats), who aborted and why (one rank's failure is
broadcast to all), and, when the agreement check is on, what each rank is
about to call.

A connection is trusted only after its first line carries the job token;
anything else is closed without an answer, so a stray or garbage connection
cannot disturb the job.

Messages, rank -> store:
    ``hello`` {rank, size, token, pid}: join; ``hb`` {seq, op, busy}: heartbeat
    with the rank's progress; ``abort`` {kind, message, seq, op}: this rank
    failed; ``chk`` {seq, op, dtype, shape, peer}: agreement check;
    ``bye``: a clean exit.
Messages, store -> rank:
    ``ready``: every rank joined; ``fail`` {message}: init failed;
    ``abort`` {kind, culprit, message, missing}: the world failed;
    ``gone`` {rank, clean}: a rank left; ``chk_ok`` {seq}.
"""

from mlxdist._sidechannel.link import Link
from mlxdist._sidechannel.protocol import HELLO_TIMEOUT, describe_call
from mlxdist._sidechannel.store import Store

__all__ = ["Store", "Link", "describe_call", "HELLO_TIMEOUT"]
