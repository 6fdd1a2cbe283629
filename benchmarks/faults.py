"""More fault trials than CI runs, for mlxdist and for mx.distributed alone.

    python benchmarks/faults.py --trials 8 [--backends ring,mpi] [--ranks 2,3,4]
        [--faults kill,stop] [--ops all_sum,all_gather,sendrecv] [--engines mlxdist,mx]

Each trial starts the ranks, kills (SIGKILL) or stops (SIGSTOP) the last rank
while every rank loops the op, and records what the survivors saw: the typed
error and the time from the fault (ring), or the end of the job (MPI, where a
blocked call cannot be interrupted). A trial whose survivors are still waiting
after the hang limit counts as a hang. Prints one row per configuration and
writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from mlxdist.bench import trials as fault_trials

MXD_WORKER = (sys.executable, str(Path(__file__).resolve().parent / "mxd_fault.py"))


def summarize(trials: list[fault_trials.Trial]) -> dict:
    outcomes: Counter[str] = Counter()
    delays: list[float] = []
    for t in trials:
        if t.hung:
            outcomes["hang"] += 1
            continue
        if t.backend == "mpi":
            d = t.job_delay()
            outcomes["job ended, failure named" if fault_trials.names_failure(t) else "job ended, not named"] += 1
            if d is not None:
                delays.append(d)
            continue
        kinds = {t.results[r][0] for r in range(t.n - 1) if r in t.results}
        missing = [r for r in range(t.n - 1) if r not in t.results]
        outcomes[("some survivors exited silently; " if missing else "") + "/".join(sorted(kinds))] += 1
        delays += [d for r in range(t.n - 1) if (d := t.error_delay(r)) is not None]
    return {
        "outcomes": dict(outcomes),
        "median_s": round(statistics.median(delays), 3) if delays else None,
        "max_s": round(max(delays), 3) if delays else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--backends", default="ring,mpi")
    p.add_argument("--ranks", default="2,3,4")
    p.add_argument("--faults", default="kill,stop")
    p.add_argument("--ops", default="all_sum,all_gather,sendrecv")
    p.add_argument("--engines", default="mlxdist,mx")
    p.add_argument("--elements", type=int, default=fault_trials.LARGE)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--hang-limit", type=float, default=20.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for engine in args.engines.split(","):
        for backend in args.backends.split(","):
            for fault in args.faults.split(","):
                for op in args.ops.split(","):
                    for n in map(int, args.ranks.split(",")):
                        worker = MXD_WORKER if engine == "mx" else fault_trials.FAULT_WORKER
                        trials = [fault_trials.run_trial(backend, n, fault, op, args.elements, args.timeout, seed=s,
                                                     worker=worker, hang_limit=args.hang_limit)
                                  for s in range(args.trials)]
                        row = {"engine": engine, "backend": backend, "fault": fault, "op": op, "ranks": n,
                               "trials": len(trials), **summarize(trials)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
