"""The serving benchmark: its summary arithmetic (mlxdist.bench.serving), and a tiny run of
benchmarks/bench_serve.py against both servers (as a command: the tests import nothing
from benchmarks/)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mlxdist.bench import serving as bench_serve

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_summary_of_one_level() -> None:
    """TTFT, decode rate, aggregate rate and latency percentiles, against numbers worked by hand."""
    Request = bench_serve.Request
    requests = [
        Request(0, start=0.0, first=0.5, end=2.5, tokens=9, text="a"),  # decode 8 / 2.0 = 4 tok/s
        Request(1, start=0.0, first=1.0, end=2.0, tokens=5, text="b"),  # 4 / 1.0 = 4
        Request(2, start=1.0, first=1.5, end=3.5, tokens=17, text="c"),  # 16 / 2.0 = 8
        Request(3, start=1.0, first=4.0, end=4.0, tokens=0, text="", error="HTTP 503"),
    ]
    summary = bench_serve.summarise(requests, wall=4.0)
    assert summary["requests"] == 4 and summary["errors"] == ["HTTP 503"]
    assert summary["tokens"] == 31
    assert summary["ttft_s"] == 0.5  # median of 0.5, 1.0, 0.5
    assert summary["decode_tps"] == 4.0
    assert summary["aggregate_tps"] == 31 / 4.0
    # latencies 2.5, 2.0, 2.5: linear-interpolated percentiles
    assert summary["latency_p50_s"] == 2.5
    assert math.isclose(summary["latency_p99_s"], 2.5)


def test_ratios_are_medians_of_round_by_round_ratios() -> None:
    level = {"ttft_s": 1.0, "decode_tps": 10.0, "aggregate_tps": 10.0, "latency_p50_s": 1.0,
             "latency_p99_s": 2.0, "errors": [], "requests": 2}
    ours = [{4: {**level, "aggregate_tps": v}} for v in (20.0, 9.0, 30.0)]
    theirs = [{4: {**level, "aggregate_tps": v}} for v in (10.0, 10.0, 10.0)]
    (row,) = bench_serve.compare({bench_serve.OURS: ours, bench_serve.THEIRS: theirs}, [4])
    assert row[bench_serve.OURS]["aggregate_tps"] == 20.0
    assert row["ratio"]["aggregate_tps"] == 2.0  # median of 2.0, 0.9, 3.0
    assert row["ratio"]["ttft_s"] == 1.0
    assert row[bench_serve.THEIRS]["requests"] == 6


def test_summary_of_one_chat_level() -> None:
    """Chat turns: first-turn and 4th-and-later TTFT, throughput and cached share, worked by hand."""
    Turn = bench_serve.Turn
    turns = [Turn(0, t, start=float(t), first=t + 0.1 * (t + 1), end=t + 0.9, tokens=4, prompt_tokens=100 * (t + 1),
                  cached_tokens=90 * t, text="x") for t in range(5)]
    turns.append(Turn(1, 0, start=0.0, first=0.3, end=1.0, tokens=4, prompt_tokens=100, cached_tokens=0, text="y"))
    turns.append(Turn(1, 1, start=1.0, first=5.0, end=5.0, tokens=0, prompt_tokens=0, cached_tokens=0, text="",
                      error="HTTP 503"))
    summary = bench_serve.summarise_chat(turns, wall=6.0)
    assert summary["requests"] == 7 and summary["errors"] == ["HTTP 503"]
    assert math.isclose(summary["ttft_s"], 0.45)  # turns 4 and 5 of user 0: 0.4, 0.5
    assert math.isclose(summary["ttft_first_s"], 0.2)  # 0.1 and 0.3
    assert summary["aggregate_tps"] == 24 / 6.0
    # turns 2-5 of user 0: cached 90+180+270+360 of 200+300+400+500 prompt tokens
    assert math.isclose(summary["cached_share"], 900 / 1400)


def test_prompts_differ_and_repeat() -> None:
    """Every request has its own prompt (no prompt cache helps), the same for both servers."""
    prompts = [bench_serve.prompt_text(i, 12) for i in range(700)]
    assert len(set(prompts)) == 700
    assert prompts[5] == bench_serve.prompt_text(5, 12)
    assert all(len(p.split()) == 12 for p in prompts)


def test_quick_run_against_both_servers(tmp_path: Path) -> None:
    """Both servers answer every request of a tiny run on 2 ring ranks, with the same greedy text."""
    out = tmp_path / "serve.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "PMIX_"))}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_serve.py"), "--quick", "--json", str(out), "--markdown",
         "--start-timeout", "120", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert result["backend"] == "ring"
    for name in (bench_serve.OURS, bench_serve.THEIRS):
        (levels,) = result["rounds"][name]
        for concurrency, level in levels.items():
            assert level["errors"] == [], (name, level)
            assert level["requests"] == int(concurrency)
            # usage's completion_tokens: at most --tokens each (fewer only if the model said EOS)
            assert 0 < level["tokens"] <= doc["tokens"] * level["requests"]
    assert result["same_text"] == {"compared": 3, "equal": 3}
    assert "**mlxdist ÷ mlx-lm**" in done.stdout
