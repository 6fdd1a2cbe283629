"""The one harness for checks that run on every rank of a group.

A check suite is a function ``suite(checks: Checks, *args: str) -> None`` in a
module under ``tests/``. It runs

- in the pytest process on the size-1 world (:func:`run_here`), and
- on N launched ranks (:func:`run_on_ranks`): every rank runs
  ``tests/support/worker.py MODULE:FUNCTION ...``, which reports each rank's
  failures and a summary line and exits non-zero on any failure,

so one body of checks covers both, as mpi4py's test suite does.
"""

from support.checks import Checks, SuiteResult, launch_ranks, run_here, run_on_ranks

__all__ = ["Checks", "SuiteResult", "launch_ranks", "run_here", "run_on_ranks"]
