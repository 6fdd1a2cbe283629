"""nccl-tests-style microbenchmarks of mlxdist's collectives: ``python -m mlxdist.bench``.

mlxdist (registered buffers, numpy arrays, mx.arrays), ``mx.distributed`` and,
on MPI, ``mpi4py`` are timed side by side on the same backend and sizes, and
every result is checked against numpy. ``--workload chain`` times the decode
chain instead: chained lazy all_sums evaluated once, mlxdist beside
mx.distributed.

Modules: :mod:`~mlxdist.bench.options` (command line),
:mod:`~mlxdist.bench.workload` (sizes, inputs, expected results),
:mod:`~mlxdist.bench.implementations`, :mod:`~mlxdist.bench.timing`,
:mod:`~mlxdist.bench.sweep`, :mod:`~mlxdist.bench.chain`, :mod:`~mlxdist.bench.header`,
:mod:`~mlxdist.bench.report` (table, JSON), :mod:`~mlxdist.bench.plot`,
:mod:`~mlxdist.bench.progress` and :mod:`~mlxdist.bench.spawn`.
"""
