"""Per-call Python cost of each path, in one process: ``python benchmarks/overhead.py``.

On the single-process group MLX's collectives return their input, so what is
left is the binding's own work. Each figure is CPU time per call (the
minimum over repetitions: the noise of a shared machine only adds), beside
``mx.distributed.all_sum`` on its size-1 group:

- the lazy path: ``mlxdist.all_sum`` and ``Group.all_sum`` on an mx.array,
  and the one bridge call underneath them;
- the eager path's per-call work for a plain numpy array, which registered
  buffers skip: viewing the input as an MLX array, and allocating the
  registered result with its numpy view.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist._c import bridge
from mlxdist._paths.lazy import FUNCTIONS
from mlxdist.buffers import MlxBuffer, operand
from mlxdist.dtypes import code_of_numpy
from mlxdist.group_record import record_of


def cases(group: mlxdist.Group) -> dict[str, Callable[[], object]]:
    """The timed calls."""
    mx_group = mx.distributed.init(backend="ring")  # the single-process group, as mlxdist's
    x = mx.ones((4096,), dtype=mx.float16)
    mx.eval(x)
    plain = np.ones(256, np.float32)
    code = code_of_numpy(plain.dtype)
    all_sum, address = FUNCTIONS["all_sum"], record_of(group).address
    return {
        "mx.distributed.all_sum(x, group=g)": lambda: mx.distributed.all_sum(x, group=mx_group),
        "bridge call only": lambda: bridge.collective(all_sum, x, address, None),
        "Group.all_sum(x)": lambda: group.all_sum(x),
        "mlxdist.all_sum(x, group=g)": lambda: mlxdist.all_sum(x, group=group),
        "eager: view a numpy input": lambda: operand(plain),
        "eager: new registered result": lambda: MlxBuffer.allocate(plain.shape, code).numpy(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Time every case and print ns per call and the ratio to mx.distributed's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50000, help="calls per repetition")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    group = mlxdist.init()
    if group.size() != 1:
        print("overhead.py runs in one process, on the single-process group", file=sys.stderr)
        return 2
    timed = cases(group)
    best = {
        name: min(timeit.Timer(call, timer=time.process_time).repeat(number=args.calls, repeat=args.repeat))
        / args.calls
        for name, call in timed.items()
    }
    anchor = best["mx.distributed.all_sum(x, group=g)"]
    print(f"CPU time per call, minimum of {args.repeat} x {args.calls} calls, single-process group")
    for name, seconds in best.items():
        print(f"  {name:38s} {seconds * 1e9:7.0f} ns   {seconds / anchor:5.2f}x mx.distributed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
