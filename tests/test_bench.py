"""mlxdist.bench: tiny sweeps on real ranks, the JSON schema, and the correctness column."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxdist
from mlxdist.bench.__main__ import finish
from mlxdist.bench.chain import Chain, expected_chain, run_chains
from mlxdist.bench.implementations import Implementation, MlxdistImpl, MxDistributedImpl, Prepared
from mlxdist.bench.options import BenchConfig, parse_args, parse_size
from mlxdist.bench.sweep import plan, run_sweep, size_points
from mlxdist.bench.timing import split_rounds
from mlxdist.bench.progress import LogProgress, NullProgress, parse_event
from mlxdist.bench.workload import (
    OPERATIONS,
    bus_factor,
    count_wrong,
    expected_result,
    message,
    rank_values,
)

ROW_KEYS = {
    "op", "dtype", "impl", "bytes", "count", "tokens", "warmup", "iters",
    "median_us", "p99_us", "algbw_GBps", "busbw_GBps", "wrong", "ratio_vs_mx",
}
CHAIN_ROW_KEYS = {
    "op", "dtype", "impl", "bytes", "count", "length", "warmup", "iters",
    "median_us", "p99_us", "per_op_us", "wrong", "ratio_vs_mx",
}
HEADER_KEYS = {"host", "cores", "mlx", "backend", "ranks", "rank_hosts", "warmup", "iters", "implementations"}
LAUNCH_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK")


def bench(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    """Run ``python -m mlxdist.bench`` as a user would, with no launcher around it."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "mlxdist.bench", *args, "--timeout", str(timeout - 20)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def check_rows(doc: dict, ranks: int, impls: set[str], sizes: set[int], iters: int) -> None:
    """Every row is well formed, correct, and its bandwidths follow nccl-tests' formulas."""
    assert HEADER_KEYS <= set(doc["header"])
    assert doc["header"]["ranks"] == ranks
    assert [e["rank"] for e in doc["header"]["rank_hosts"]] == list(range(ranks))
    rows = doc["rows"]
    assert rows
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["wrong"] == 0, row
        assert row["iters"] == iters
        assert row["bytes"] in sizes
        assert 0 < row["median_us"] <= row["p99_us"]
        algbw = row["bytes"] / (row["median_us"] * 1e-6) / 1e9
        assert math.isclose(row["algbw_GBps"], algbw, rel_tol=1e-9)
        assert math.isclose(row["busbw_GBps"], algbw * bus_factor(row["op"], ranks), rel_tol=1e-9)
        if row["impl"].startswith("mlxdist"):
            assert (row["ratio_vs_mx"] is None) == (row["op"] == "sum_scatter"), row
    ran = {(r["op"], r["impl"]) for r in rows}
    for op in OPERATIONS:
        for impl in impls:
            # MLX's ring and MPI backends have no sum_scatter of their own.
            if not (impl == "mx.distributed" and op == "sum_scatter"):
                assert (op, impl) in ran, (op, impl)
    assert ("sum_scatter", "mx.distributed") not in ran


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_spawned_sweep_is_correct_and_well_formed(backend: str, tmp_path: Path) -> None:
    out, png = tmp_path / "rows.json", tmp_path / "busbw.png"
    done = bench("--backend", backend, "-b", "1K", "-e", "2K", "-n", "2", "-w", "1",
                 "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    impls = {"mlxdist-reg", "mlxdist-numpy", "mlxdist-mlx", "mx.distributed"}
    if backend == "mpi":
        impls.add("mpi4py")
    check_rows(doc, 2, impls, {1024, 2048}, 2)
    assert doc["header"]["backend"] == backend
    assert set(doc["header"]["implementations"]) == impls
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The terminal table: header block, one table per operation, the verdict.
    assert f"# backend: {backend}  ranks: 2" in done.stdout
    for op in OPERATIONS:
        assert f"{op} float32" in done.stdout
    assert "Out of bounds values : 0 OK" in done.stdout


def test_tensor_parallel_mode_under_a_launcher() -> None:
    """Started by mlxdist.launch, the bench uses the ranks it is given."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-m", "mlxdist.launch", "-n", "2", "--backend", "ring", "--timeout", "150", "--",
         sys.executable, "-m", "mlxdist.bench", "--tp", "--tokens", "1,8", "-n", "2", "-w", "1",
         "--impls", "mlxdist-mlx,mx.distributed", "--json", "-", "--no-progress"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = "".join(line[4:] + "\n" for line in done.stdout.splitlines() if line.startswith("[0] "))
    doc = json.loads(text)
    rows = doc["rows"]
    assert {(r["dtype"], r["tokens"], r["bytes"]) for r in rows} == {
        (dtype, tokens, 4096 * tokens * 2) for dtype in ("float16", "bfloat16") for tokens in (1, 8)
    }
    assert {r["op"] for r in rows} == {"all_sum", "all_gather", "sum_scatter"}
    assert all(r["wrong"] == 0 for r in rows)
    assert doc["header"]["mode"] == "tensor-parallel"


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_decode_chain_matches_mx_distributed(backend: str, tmp_path: Path) -> None:
    """Both chains on 2 ranks: mx.distributed's values equal numpy's, mlxdist's equal mx.distributed's."""
    out = tmp_path / "chain.json"
    done = bench("--backend", backend, "--workload", "chain", "--length", "5", "--hidden", "40",
                 "-d", "float16,bfloat16", "-n", "3", "-w", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["header"]["mode"] == "chain" and doc["header"]["chain_length"] == 5
    rows = doc["rows"]
    assert {(r["op"], r["dtype"], r["impl"]) for r in rows} == {
        (v, d, i) for v in ("chain", "chain*0.5") for d in ("float16", "bfloat16")
        for i in ("mlxdist-mlx", "mx.distributed")
    }
    for row in rows:
        assert set(row) == CHAIN_ROW_KEYS
        assert row["wrong"] == 0, row
        assert (row["count"], row["length"], row["bytes"]) == (40, 5, 80)
        assert math.isclose(row["per_op_us"], row["median_us"] / 5)
        assert (row["ratio_vs_mx"] is None) == (row["impl"] == "mx.distributed")
    assert "decode chain" in done.stdout and "Out of bounds values : 0 OK" in done.stdout


def test_chain_model_follows_the_arithmetic() -> None:
    """numpy's chain: the first all_sum adds the ranks' inputs, later ones multiply by the size."""
    inputs = [rank_values(r, 17) for r in range(2)]
    total = inputs[0] + inputs[1]
    assert np.array_equal(expected_chain(Chain("chain", "float16", 17, 3), 2), total * 4)
    assert np.array_equal(expected_chain(Chain("chain*0.5", "float16", 17, 6), 2), total / 2)
    # float16 overflows to inf after enough doublings, as MLX's sums do.
    long = expected_chain(Chain("chain", "float16", 17, 64), 2)
    assert np.array_equal(np.isinf(long), total != 0) and np.all(long[total == 0] == 0)
    assert np.all(np.isfinite(expected_chain(Chain("chain", "bfloat16", 17, 64), 2)))
    assert expected_chain(Chain("chain", "float16", 17, 3), 3) is None  # not exact: no model


class _BrokenLazy(Implementation):
    """A lazy all_sum that adds 1: the chain check must catch it."""

    name = "broken"

    def lazy_all_sum(self):  # type: ignore[no-untyped-def]
        return lambda x: mlxdist.all_sum(x) + 1


def test_chain_counts_wrong_values() -> None:
    group = mlxdist.init()  # no launcher: a one-rank group
    config = BenchConfig(warmup=1, iters=2, rounds=1, dtypes=("float16",), hidden=9, chain_length=3,
                         workload="chain")
    impls = [MlxdistImpl(group, "mlx"), MxDistributedImpl(group.backend), _BrokenLazy(),
             MlxdistImpl(group, "numpy")]
    rows, skips = run_chains(config, group, impls, NullProgress())
    assert {(s.op, s.impl) for s in skips} == {("chain", "mlxdist-numpy"), ("chain*0.5", "mlxdist-numpy")}
    assert len(rows) == 2 * 3
    for row in rows:
        assert row["wrong"] == (9 if row["impl"] == "broken" else 0), row


def test_backend_other_than_the_launchers_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-m", "mlxdist.launch", "-n", "2", "--backend", "ring", "--timeout", "60", "--",
         sys.executable, "-m", "mlxdist.bench", "--backend", "mpi"],
        capture_output=True, text=True, timeout=90, env=env,
    )
    assert done.returncode == 2
    assert "--backend mpi but the launcher started ring ranks" in done.stderr


# -- in one process ------------------------------------------------------------


class _OffByOne(Implementation):
    """An implementation that gets one element wrong, to prove the check catches it."""

    name = "broken"

    def __init__(self, group: mlxdist.Group) -> None:
        self.inner = MlxdistImpl(group, "numpy")

    def prepare(self, msg, values):  # type: ignore[no-untyped-def]
        good = self.inner.prepare(msg, values)

        def run() -> np.ndarray:
            result = np.array(good.run(), copy=True)
            result.reshape(-1)[0] += 1
            return result

        return Prepared(run, good.values)


def test_wrong_results_are_counted_and_fail_the_run(capsys: pytest.CaptureFixture) -> None:
    group = mlxdist.init()  # no launcher: a one-rank group, collectives return their input
    assert group.size() == 1
    config = BenchConfig(min_bytes=1024, max_bytes=2048, warmup=1, iters=2,
                         ops=("all_sum", "all_gather", "all_max"), dtypes=("float32", "float16"))
    impls = [MlxdistImpl(group, "registered"), MlxdistImpl(group, "mlx"), _OffByOne(group)]
    rows, skips = run_sweep(config, group, impls, NullProgress())
    assert skips == []
    assert len(rows) == 3 * 2 * 2 * 3
    for row in rows:
        assert row["wrong"] == (1 if row["impl"] == "broken" else 0), row
    header = {"host": "h", "cores": 1, "platform": "p", "python": "3", "mlx": mx.__version__, "mlxdist": "0",
              "numpy": np.__version__, "backend": "none", "ranks": 1, "rank_hosts": [], "mode": "sweep",
              "min_bytes": 1024, "max_bytes": 2048, "step_factor": 2, "warmup": 1, "iters": 2,
              "ops": list(config.ops), "dtypes": list(config.dtypes),
              "implementations": [i.name for i in impls]}
    assert finish({"header": header, "rows": rows, "skipped": []}, "median", None, None) == 1
    assert "FAILED" in capsys.readouterr().out


def test_expected_results_follow_numpy() -> None:
    n = 3
    inputs = [rank_values(r, 40) for r in range(n)]
    for r, values in enumerate(inputs):
        assert np.array_equal(values, (np.arange(40) * 7 + 3 * r) % 17 - 8)
    assert all(np.array_equal(v, np.round(v)) and np.abs(v).max() <= 8 for v in inputs)
    assert len({v.tobytes() for v in inputs}) == n  # every rank sends something different
    total = np.sum(inputs, axis=0)
    assert np.array_equal(expected_result(message("all_sum", "float32", 160, n), 1, n), total)
    assert np.array_equal(expected_result(message("all_max", "float32", 160, n), 0, n), np.max(inputs, axis=0))
    assert np.array_equal(expected_result(message("all_min", "float32", 160, n), 2, n), np.min(inputs, axis=0))
    gather = message("all_gather", "float32", 160, n)
    assert (gather.input_count, gather.output_count) == (13, 39)
    assert np.array_equal(expected_result(gather, 0, n), np.concatenate([v[:13] for v in inputs]))
    scatter = message("sum_scatter", "float32", 160, n)
    assert np.array_equal(expected_result(scatter, 2, n), total[26:39])
    shift = message("sendrecv", "float32", 160, n)
    assert np.array_equal(expected_result(shift, 0, n), inputs[2])
    # Sums of the inputs are exact in bfloat16.
    as_bf16 = np.asarray(mx.array(total).astype(mx.bfloat16).astype(mx.float32))
    assert np.array_equal(as_bf16, total)


def test_count_wrong() -> None:
    expected = np.arange(6, dtype=np.float32)
    got = expected.copy()
    assert count_wrong(got, expected) == 0
    got[[1, 4]] += 0.5
    assert count_wrong(got, expected) == 2
    assert count_wrong(expected[:3], expected) == 6


def test_sizes_and_bus_factors() -> None:
    assert parse_size("1K") == 1024 and parse_size("64M") == 64 << 20 and parse_size("512") == 512
    sweep = BenchConfig(min_bytes=1 << 10, max_bytes=64 << 20)
    assert [b for b, _ in size_points(sweep, "float32")] == [1 << k for k in range(10, 27)]
    chain = parse_args(["--workload", "chain"])
    assert (chain.chain_length, chain.hidden, chain.dtypes) == (64, 4096, ("float16",))
    assert chain.impls == ("mlxdist-mlx", "mx.distributed")
    tp = parse_args(["--tp"])
    assert tp.dtypes == ("float16", "bfloat16")
    assert size_points(tp, "float16") == [(4096 * t * 2, t) for t in (1, 8, 32, 128, 512)]
    # A 1 KiB all_gather on 3 ranks rounds down to whole elements per rank.
    assert message("all_gather", "float32", 1024, 3).nbytes == 255 * 4
    assert len(plan(BenchConfig(min_bytes=4, max_bytes=8, ops=("all_sum",)), 2)) == 1
    assert bus_factor("all_sum", 4) == 1.5 and bus_factor("all_gather", 4) == 0.75
    assert bus_factor("sum_scatter", 2) == 0.5 and bus_factor("sendrecv", 8) == 1.0


def test_bad_options_are_refused() -> None:
    for argv in (["-b", "1X"], ["-d", "float64"], ["-b", "4K", "-e", "1K"], ["-o", "all_prod"],
                 ["--workload", "chain", "--tp"], ["--workload", "chain", "-o", "all_sum"], ["--length", "0"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_progress_events_survive_launcher_tags() -> None:
    line = '[0] [1,0]<stdout>:@@mlxdist.bench {"event": "advance", "description": "all_sum"}'
    assert parse_event(line) == {"event": "advance", "description": "all_sum"}
    assert parse_event("[0] ordinary output") is None


def test_rounds_split_the_iterations() -> None:
    assert split_rounds(20, 4) == [5, 5, 5, 5]
    assert split_rounds(7, 3) == [3, 2, 2]
    assert split_rounds(2, 4) == [1, 1]


def test_log_progress_prints_each_tenth() -> None:
    stream = io.StringIO()
    progress = LogProgress(stream)
    progress.start(25)
    for i in range(25):
        progress.advance(f"block {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[-1].startswith("mlxdist.bench: 100% (25/25) block 24")
