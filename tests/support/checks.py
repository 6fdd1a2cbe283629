"""Checks that run on every rank of a group, in process or on launched ranks.

A suite is ``suite(checks: Checks) -> None``; it reads the group from
``checks.group`` and options (strings given on the worker's command line) from
:meth:`Checks.option`. Every rank runs the same suite; each records its own
mismatches. The worker (tests/support/worker.py) prints one ``CHECKS`` summary
line per suite and rank, and a ``FAIL`` line per mismatch; :func:`run_on_ranks`
launches it with a deadline and parses those lines.
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.launch import LaunchResult, launch

__all__ = ["Checks", "SuiteResult", "RankRun", "run_here", "launch_ranks", "launch_suites", "run_on_ranks",
           "to_numpy", "WORKER"]

WORKER = Path(__file__).resolve().parent / "worker.py"
SUMMARY = re.compile(r"CHECKS suite=(\S+) rank=(\d+) size=(\d+) checks=(\d+) failures=(\d+)")


def to_numpy(value: Any) -> np.ndarray:
    """An mx.array (evaluated here; bfloat16 widened to float32) or numpy array as numpy."""
    if isinstance(value, mx.array):
        if value.dtype == mx.bfloat16:
            value = value.astype(mx.float32)
        return np.array(value)
    return np.asarray(value)


def _dtype_name(x: Any) -> str:
    """The name of an mx.array's or numpy array's dtype ("float32", "bfloat16", "bool")."""
    dtype = x.dtype
    return dtype.name if isinstance(dtype, np.dtype) else str(dtype).rsplit(".", 1)[-1].rstrip("_")


def _holds(dtype: np.dtype, reference: np.ndarray) -> bool:
    """A reference without a dtype of its own (a list, a Python number) fits ``dtype``:
    the same kind (bool, integer, float, complex) and every value exactly."""
    kinds = {"b": "b", "i": "iu", "u": "iu", "f": "f", "c": "c"}
    return dtype.kind in kinds.get(reference.dtype.kind, reference.dtype.kind) and bool(
        np.array_equal(reference.astype(dtype), reference))


@dataclass
class Checks:
    """The checks of one suite on one rank, and their failures.

    Attributes:
        group: The mlxdist group the suite runs on.
        suite: The suite's name, for messages.
        options: Options given to the worker (``key=value``).
        failures: One line per failed check.
        count: How many checks ran.
    """

    group: mlxdist.Group
    suite: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    count: int = 0

    @property
    def rank(self) -> int:
        """This rank in :attr:`group`."""
        return self.group.rank()

    @property
    def size(self) -> int:
        """The size of :attr:`group`."""
        return self.group.size()

    def option(self, name: str, default: str) -> str:
        """The option ``name`` given to the worker, or ``default``."""
        return self.options.get(name, default)

    def expect(self, name: str, condition: bool, detail: str = "") -> bool:
        """Record one check; returns ``condition``."""
        self.count += 1
        if not condition:
            self.failures.append(f"{self.suite} rank {self.rank}: {name} {detail}".rstrip())
        return bool(condition)

    def expect_equal(
        self,
        name: str,
        got: Any,
        expected: Any,
        *,
        kind: str | None = None,
        dtype: Any = None,
        tolerance: float = 0.0,
    ) -> bool:
        """``got`` equals ``expected`` in dtype, shape and values (NaN-free data).

        Args:
            name: The check's name.
            got: An mx.array or numpy array (evaluated here).
            expected: The reference, anything numpy takes. An array's dtype is the
                dtype ``got`` must have (mx and numpy dtypes compare by name); a
                list or Python number carries none, so ``got`` must then be of the
                same kind (bool, integer, float, complex) and hold it exactly.
            kind: "mlx" or "numpy": the kind ``got`` must be.
            dtype: The dtype ``got`` must have (an mx.Dtype or numpy dtype), whatever ``expected``'s.
            tolerance: Absolute tolerance; 0 means exact.
        """
        problems = []
        if kind is not None and isinstance(got, mx.array) != (kind == "mlx"):
            problems.append(f"kind {type(got).__name__}, expected {kind}")
        if dtype is not None and got.dtype != dtype:
            problems.append(f"dtype {got.dtype}, expected {dtype}")
        elif dtype is None and hasattr(expected, "dtype") and _dtype_name(got) != _dtype_name(expected):
            problems.append(f"dtype {_dtype_name(got)}, expected {_dtype_name(expected)}")
        values = to_numpy(got)
        reference = to_numpy(expected)
        if dtype is None and not hasattr(expected, "dtype") and not _holds(values.dtype, reference):
            problems.append(f"dtype {values.dtype} cannot be the result {reference!r:.100}")
        if values.shape != reference.shape:
            problems.append(f"shape {values.shape}, expected {reference.shape}")
        elif tolerance:
            if not np.allclose(values, reference, rtol=0, atol=tolerance):
                problems.append(f"values {values!r:.200} expected {reference!r:.200}")
        elif not np.array_equal(values, reference.astype(values.dtype)):
            problems.append(f"values {values!r:.200} expected {reference!r:.200}")
        return self.expect(name, not problems, "; ".join(problems))

    def expect_raises(
        self, name: str, exc: type[BaseException] | tuple[type[BaseException], ...], call: Callable[[], Any], match: str = ""
    ) -> BaseException | None:
        """``call()`` raises ``exc`` whose message contains ``match`` (case-insensitive).

        Returns:
            The exception raised, or None.
        """
        try:
            call()
        except exc as e:
            self.expect(name, match.lower() in str(e).lower(), f"message {str(e)!r} lacks {match!r}")
            return e
        except BaseException as e:  # noqa: BLE001 - a wrong exception type is a failure
            self.expect(name, False, f"raised {type(e).__name__}: {e}")
            return None
        self.expect(name, False, f"did not raise {exc}")
        return None

    def summary(self) -> str:
        """The summary line the harness parses."""
        return (
            f"CHECKS suite={self.suite} rank={self.rank} size={self.size} "
            f"checks={self.count} failures={len(self.failures)}"
        )


Suite = Callable[[Checks], None]


def run_here(suite: Suite, group: mlxdist.Group | None = None, **options: str) -> Checks:
    """Run ``suite`` in this process (on the world group by default).

    Returns:
        The suite's :class:`Checks`, failures included.
    """
    checks = Checks(group or mlxdist.init(), suite=f"{suite.__module__}:{suite.__name__}", options=options)
    suite(checks)
    return checks


@dataclass
class SuiteResult:
    """One rank's summary of one suite."""

    suite: str
    rank: int
    size: int
    checks: int
    failures: int


@dataclass
class RankRun:
    """What one launch of the worker reported."""

    output: list[str]
    results: list[SuiteResult]
    launch: LaunchResult | None = None

    def of(self, suite: str) -> list[SuiteResult]:
        """The per-rank summaries of ``suite`` (``module:function``)."""
        return sorted((r for r in self.results if r.suite == suite), key=lambda r: r.rank)

    def failure_lines(self) -> list[str]:
        """Every ``FAIL`` line any rank printed."""
        return [line for line in self.output if "FAIL " in line]


def launch_ranks(
    command: Sequence[str],
    n: int,
    backend: str,
    timeout: float = 240.0,
    expect_ok: bool = True,
    env: Mapping[str, str] | None = None,
) -> LaunchResult:
    """Run ``command`` as ``n`` ranks of ``backend`` with a deadline, capturing output.

    Every launch has a deadline after which all ranks are killed. With
    ``expect_ok``, the calling test fails unless every rank exited 0.
    """
    import pytest

    out, err = io.StringIO(), io.StringIO()
    result = launch(
        list(command), n=n, backend=backend, timeout=timeout, env=env, capture=True, stdout=out, stderr=err
    )
    if expect_ok and not result.ok:
        tail = "".join(result.output[-120:])
        pytest.fail(
            f"{' '.join(command[1:])} on {n} {backend} ranks failed (codes {result.returncodes}, "
            f"timed out: {result.timed_out}):\n{tail}"
        )
    return result


def launch_suites(
    suites: Sequence[str],
    n: int,
    backend: str,
    options: Mapping[str, str] | None = None,
    timeout: float = 240.0,
) -> RankRun:
    """Launch the worker running ``suites`` in order on ``n`` ranks, and read its summaries.

    Fails no test: the caller judges the result (see :func:`run_on_ranks`).

    Returns:
        The output, per-rank summaries and the launch's result.
    """
    words = [f"{k}={v}" for k, v in (options or {}).items()]
    command = [sys.executable, str(WORKER), f"size={n}", *words, *suites]
    result = launch_ranks(command, n, backend, timeout, expect_ok=False)
    results = []
    for line in result.output:
        match = SUMMARY.search(line)
        if match:
            suite, rank, size, count, failed = match.groups()
            results.append(SuiteResult(suite, int(rank), int(size), int(count), int(failed)))
    return RankRun(list(result.output), results, result)


def run_on_ranks(
    suites: Sequence[str],
    n: int,
    backend: str,
    options: Mapping[str, str] | None = None,
    timeout: float = 240.0,
) -> RankRun:
    """Run suites (``module:function``, modules under tests/) on ``n`` launched ranks.

    Fails the calling test unless every rank ran every suite and reported no
    failure (within the deadline).

    Returns:
        The output and per-rank summaries.
    """
    import pytest

    run = launch_suites(suites, n, backend, options, timeout)
    result, results = run.launch, run.results
    complete = all(len(run.of(s)) == n for s in suites)
    if not result.ok or not complete or any(r.failures for r in results):
        fails = run.failure_lines()
        tail = "".join(fails[:40] or result.output[-120:])
        pytest.fail(
            f"{', '.join(suites)} on {n} {backend} ranks failed (codes {result.returncodes}, "
            f"timed out: {result.timed_out}, {len(fails)} failed checks):\n{tail}"
        )
    return run
