"""Cost of the deadline machinery and of the agreement check, per collective.

    python benchmarks/check_cost.py [--backends mpi,ring] [--rounds 3] [--iters 2000]

Runs 2 local ranks per configuration, alternating check off / check on for
``--rounds`` rounds (the machine is noisy), timing all_sum of 1 KiB of float32
(numpy, the eager path) and the same all_sum through mx.distributed in the same
process as an anchor. Also times the watchdog's registration of a call (enter + leave, no backend call).
Prints the median per-op time of each.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from mlxdist.bench import trials as fault_trials

PROBE = textwrap.dedent('''
    import sys, time
    import numpy as np, mlx.core as mx, mlxdist
    from mlxdist import deadline
    from mlxdist.group_record import record_of
    iters = int(sys.argv[2])
    g = mlxdist.init(strict=True, check=sys.argv[1] == "1")
    x = np.ones(256, np.float32)
    xm = mx.array(x)
    mxg = mx.distributed.init()
    def timed(f):
        for _ in range(iters // 10):
            f()
        g.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            f()
        return (time.perf_counter() - t0) / iters * 1e6
    ours = timed(lambda: g.all_sum(x))
    anchor = timed(lambda: mx.eval(mx.distributed.all_sum(xm, group=mxg)))
    dog = record_of(g).world.watchdog  # what the eager gate does around each call
    t0 = time.perf_counter()
    for _ in range(100000):
        dog.leave(dog.enter("probe", g, g, None))
    guard_us = (time.perf_counter() - t0) / 100000 * 1e6
    if g.rank() == 0:
        print(f"COST {ours:.2f} {anchor:.2f} {guard_us:.3f}", flush=True)
''')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="mpi,ring")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.py")
        probe.write_text(PROBE)
        for backend in args.backends.split(","):
            samples: dict[str, list[tuple[float, float, float]]] = {"0": [], "1": []}
            for _ in range(args.rounds):
                for check in ("0", "1"):
                    job = fault_trials.run_job(backend, 2, [sys.executable, str(probe), check, str(args.iters)], 600)
                    m = re.search(r"COST ([\d.]+) ([\d.]+) ([\d.]+)", job.output)
                    if m:
                        samples[check].append(tuple(map(float, m.groups())))  # type: ignore[arg-type]
            for check, rows in samples.items():
                if not rows:
                    print(f"{backend} check={check}: no result")
                    continue
                ours, anchor, guard = (statistics.median(r[i] for r in rows) for i in range(3))
                print(f"{backend} check={'on ' if check == '1' else 'off'}: all_sum 1 KiB numpy {ours:8.1f} us "
                      f"(mx.distributed in the same run {anchor:8.1f} us, ratio {ours / anchor:5.2f}); "
                      f"watchdog enter+leave {guard:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
