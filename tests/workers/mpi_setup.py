"""One MPI rank for the set-up tests: `mpi_setup.py MODE`; prints `RESULT <json>` on success.

Modes:
- maps: init mlxdist's MPI world, all_sum, report the libmpi files mapped into this process;
- mpi4py_first: import mpi4py.MPI (which initialises MPI), then mlxdist.init(backend="mpi");
- mpi4py_after: mlxdist first, then mpi4py on the same world;
- mpi4py_no_init: mpi4py.rc.initialize = False before importing mpi4py.MPI, then mlxdist first.
"""

import json
import os
import sys

import numpy as np

mode = sys.argv[1]
report: dict = {"MLX_MPI_LIBNAME": os.environ.get("MLX_MPI_LIBNAME")}

if mode == "mpi4py_first":
    from mpi4py import MPI  # initialises MPI

    import mlxdist

    try:
        mlxdist.init(backend="mpi")
    except mlxdist.DistributedError as exc:
        report["error"] = type(exc).__name__
        report["message"] = str(exc)
        report["is_runtime_error"] = isinstance(exc, RuntimeError)
    # mpi4py still works after the refusal.
    report["mpi4py_sum"] = MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.Get_rank() + 1)
else:
    if mode == "mpi4py_no_init":
        import mpi4py

        mpi4py.rc.initialize = False
        from mpi4py import MPI
    import mlxdist

    group = mlxdist.init(backend="mpi")
    report["rank"], report["size"] = group.rank(), group.size()
    report["all_sum"] = group.all_sum(np.full(3, group.rank() + 1, np.float32)).tolist()
    if mode in ("mpi4py_after", "mpi4py_no_init"):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        report["mpi4py_rank"], report["mpi4py_size"] = comm.Get_rank(), comm.Get_size()
        out = np.zeros(3, np.float32)
        comm.Allreduce(np.full(3, comm.Get_rank() + 1, np.float32), out)
        report["mpi4py_sum"] = out.tolist()

with open("/proc/self/maps") as maps:
    report["libmpi"] = sorted(
        {os.path.realpath(line.split()[-1]) for line in maps if "/libmpi." in line}
    )
print("RESULT " + json.dumps(report), flush=True)
