"""Benchmark: decode tokens/s of mlxdist.lm's TP and PP beside mlx-lm's own ``shard()``, same run.

For each weight format (float16; 4-bit affine with float32 scales, group size
64: MLX's CPU quantized matmul is far slower with float16 scales) the script
writes a random-weight Llama checkpoint (``mlxdist.lm.testing``), then:

- 1 process: mlx-lm's unsharded model (the baseline);
- 2 ranks of each backend, started by ``mlxdist.launch`` (which waits
  without spinning; its own CPU use is reported): mlxdist TP, mlxdist PP and
  mlx-lm's ``model.shard()`` over ``mx.distributed``, loaded in the same
  job. After an untimed warm-up generation of each, each generates
  ``--tokens`` tokens with mlx-lm's generator (TP's tokens must equal
  mlx-lm's; a one-shot prompt rate is taken there: ``bench_prefill.py``
  measures prefill with medians over interleaved runs), then
  ``--rounds x --tokens`` greedy decode steps of the three run interleaved,
  step by step (A B C C B A ...), each step timed alone as its slowest rank:
  on a shared machine, load that drifts falls on every variant alike. The
  decode rate is 1 / the median step time, and the TP ratio the median of
  the step-by-step ratio against mlx-lm.

Among those interleaved steps it also times one decode step's communication
alone on the same group: TP's 2 all-sums per block of a ``(1, 1, hidden)``
vector in the model's dtype (chained, one eval), and PP's hops (send/recv
between neighbours, one all_gather); the communication share is its median
over the median decode step.

With ``--uneven`` the checkpoint has 12 query / 3 key-value heads, which
2 ranks do not divide: mlx-lm's ``shard()`` cannot split it, so the jobs
compare mlxdist's uneven TP with its PP and with the unsharded model run
alone on every rank in the same job ("1 process each": no communication),
all three interleaved and every ratio paired step by step. ``--netns 50 300`` (root) also runs the 2-rank
ring jobs across two network namespaces joined by a link that delays every
packet by about that many microseconds one way (``delayed_link.py``; the
measured one-way latency is reported), like a link between two machines.

Run ``python benchmarks/bench_lm.py`` (``--backends ring mpi``, ``--quick``
for a smaller model); ``--markdown`` prints the README table. ``--moe`` runs
``bench_lm_moe.py`` instead: a mixture-of-experts checkpoint's prefill and
decode rates at 1 and 8 sequences, experts under TP and EP beside mlx-lm's
``shard()`` and one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import FORMATS, SIZES, Results, emit, run_job  # noqa: E402

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("ring", "mpi"), default=["ring", "mpi"])
    parser.add_argument("--formats", nargs="+", choices=tuple(FORMATS), default=list(FORMATS))
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per model (and per round)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved decode steps: rounds x tokens")
    parser.add_argument("--quick", action="store_true", help="a smaller model")
    parser.add_argument("--uneven", action="store_true", help="heads 2 ranks do not divide: uneven TP vs PP")
    parser.add_argument(
        "--netns", nargs="*", type=float, default=[], metavar="DELAY_US",
        help="also run 2 ring ranks across two network namespaces with this one-way delay (root)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline per launched job, seconds")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--moe", action="store_true",
                        help="the mixture-of-experts benchmark instead (bench_lm_moe.py: TP and EP experts)")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "FORMAT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- in a launched job ---------------------------------------------------------


def _comm_step(group: Any, kind: str, hidden: int, dtype: mx.dtype, blocks: int) -> Callable[[], mx.array]:
    """One decode step's communication alone, as a step function.

    TP: 2 all-sums per block of a ``(1, 1, hidden)`` vector, chained; PP: the
    hops between neighbours and the closing all_gather.
    """
    from mlxdist.world import all_gather, all_sum, recv_like, send

    rank, size = group.rank(), group.size()
    x = mx.ones((1, 1, hidden), dtype=dtype)
    mx.eval(x)

    def step() -> mx.array:
        h = x
        if kind == "tp":
            for _ in range(2 * blocks):
                h = all_sum(h, group=group) * 0.5
            return h
        if rank > 0:
            h = recv_like(h, rank - 1, group=group)
        if rank < size - 1:
            h = send(h, rank + 1, group=group)
        return all_gather(h, group=group)[size - 1 :]

    return step


def _decode_step(model: Any, prompt: list[int]) -> Callable[[], mx.array]:
    """A greedy decode step of ``model`` (after prefilling ``prompt``), as a step function."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    last = [mx.argmax(model(mx.array(prompt)[None], cache=cache)[:, -1, :], axis=-1)]
    mx.eval(last[0])

    def step() -> mx.array:
        last[0] = mx.argmax(model(last[0][None], cache=cache)[:, -1, :], axis=-1)
        return last[0]

    return step


def _slowest(group: Any, seconds: float) -> float:
    return float(np.asarray(group.all_gather(np.array([seconds]))).max())


def _interleaved(steps: dict[str, Callable[[], mx.array]], count: int, group: Any) -> dict[str, list[float]]:
    """Run ``count`` rounds of every step function, interleaved (A B C C B A ...), each timed alone.

    Each step builds its graph and evaluates it (no overlap with the next).
    Returns per name the step times, each the slowest rank's.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(count):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            mx.eval(steps[name]())
            times[name].append(time.perf_counter() - start)
    return {
        name: np.asarray(group.all_gather(np.array([t]))).max(axis=0).tolist() for name, t in times.items()
    }


def worker(args: argparse.Namespace) -> None:
    from mlx_lm.utils import load_model

    import mlxdist
    from mlxdist.lm import generate_tokens, load

    path, fmt = Path(args.worker[0]), args.worker[1]
    group = mlxdist.init()
    rank, size = group.rank(), group.size()
    prompt = [(7 * i + 3) % 500 + 3 for i in range(args.prompt)]
    models: dict[str, Any] = {}
    if size == 1:
        models["1 process (mlx-lm)"], _ = load_model(path)
    else:
        models["mlxdist TP"], _, tp_plan = load(path, group, "tp")
        models["mlxdist PP"], _, _ = load(path, group, "pp")
        if args.uneven:
            # The anchor in the same job: every rank runs the whole model alone, no communication.
            models["1 process each"], _ = load_model(path)
        else:  # mlx-lm's shard() cannot split heads that do not divide, so it runs only here
            theirs, _ = load_model(path, lazy=True)
            theirs.shard(mx.distributed.init(backend=str(group.backend)))
            mx.eval(theirs.parameters())
            models["mlx-lm shard()"] = theirs
    # Generation as users run it: the tokens (TP must equal mlx-lm's) and the prompt rate.
    tokens: dict[str, list[int]] = {}
    prompt_tps: dict[str, float] = {}
    generate_tps: dict[str, float] = {}
    # An untimed warm-up of each first: the first prefill after loading pays first-touch costs (fresh
    # buffers, page faults) that then fell on whichever model ran first (mlxdist TP) and made its
    # prompt rate look 0.7-0.9x mlx-lm's. benchmarks/bench_prefill.py measures prefill properly.
    for model in models.values():
        generate_tokens(model, prompt, 2)
    for name, model in models.items():
        out = generate_tokens(model, prompt, args.tokens)
        tokens[name] = out.tokens
        prompt_tps[name] = out.prompt_tokens / _slowest(group, out.prompt_seconds)
        generate_tps[name] = (len(out.tokens) - 1) / _slowest(group, out.decode_seconds)
    config = json.loads((path / "config.json").read_text())
    step_functions = {name: _decode_step(model, prompt) for name, model in models.items()}
    if size > 1:
        dtype = mx.float16 if fmt == "float16" else mx.float32
        for kind in ("tp", "pp"):
            step_functions[f"{kind} comm"] = _comm_step(
                group, kind, config["hidden_size"], dtype, config["num_hidden_layers"]
            )
    steps = _interleaved(step_functions, args.tokens * args.rounds, group)
    result: dict[str, Any] = {
        "format": fmt,
        "ranks": size,
        "backend": None if size == 1 else str(group.backend),
        "decode_tps": {name: 1.0 / median(steps[name]) for name in models},
        "generate_tps": generate_tps,
        "prompt_tps": prompt_tps,
        "load_average": os.getloadavg()[0],
        "same_tokens_as_mlx_lm": (
            None if size == 1 or args.uneven else tokens["mlxdist TP"] == tokens["mlx-lm shard()"]
        ),
        "tp_tokens_equal_pp": None if size == 1 else tokens["mlxdist TP"] == tokens["mlxdist PP"],
        "link": os.environ.get("BENCH_LM_LINK", "loopback" if size > 1 else None),
    }
    if size > 1:
        result["tp_shares"] = tp_plan.as_dict()["shares"]
        # Medians of the step-by-step ratios of rates (the other's step time / TP's).
        result["tp_vs_pp"] = median(pp / tp for pp, tp in zip(steps["mlxdist PP"], steps["mlxdist TP"]))
        if args.uneven:
            alone = steps["1 process each"]
            result["tp_vs_1_process"] = median(one / tp for one, tp in zip(alone, steps["mlxdist TP"]))
            result["pp_vs_1_process"] = median(one / pp for one, pp in zip(alone, steps["mlxdist PP"]))
        else:
            pairs = zip(steps["mlx-lm shard()"], steps["mlxdist TP"])
            result["tp_vs_mlx_lm"] = median(theirs / ours for theirs, ours in pairs)
    if size > 1:
        # Communication alone, timed among the decode steps, over the decode step time.
        result["comm_seconds"] = {kind: median(steps[f"{kind} comm"]) for kind in ("tp", "pp")}
        result["comm_share"] = {
            kind: median(steps[f"{kind} comm"]) / median(steps[f"mlxdist {kind.upper()}"])
            for kind in ("tp", "pp")
        }
    if rank == 0:
        emit(result)


# -- the driver ------------------------------------------------------------------


def run_netns_job(argv: list[str], one_way_us: float, timeout: float) -> dict:
    """Run the worker as 2 ring ranks in two network namespaces joined by a delayed link.

    The relay's own cost adds to the requested delay, so the delay is
    calibrated: asked for, measured (half a TCP round trip), and asked again
    corrected by the error, up to three times. The result records the
    one-way latency measured just before the job.
    """
    from delayed_link import delayed_link, measure_one_way_us

    request = one_way_us
    for _ in range(3):  # the relay's wake-up cost is not a constant: correct the request a few times
        with delayed_link(request) as (names, addresses):
            measured = measure_one_way_us(names, addresses)
        if abs(measured - one_way_us) <= 0.1 * one_way_us:
            break
        request = max(0.0, request + one_way_us - measured)
    with delayed_link(request) as (names, addresses):
        measured = measure_one_way_us(names, addresses)
        procs: list[subprocess.Popen] = []
        with tempfile.TemporaryDirectory(prefix="bench-lm-netns-") as tmp:
            hostfile = Path(tmp, "hosts.json")
            hostfile.write_text(json.dumps([[f"{a}:{29600 + i}"] for i, a in enumerate(addresses)]))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXDIST_", "OMPI_", "PMI"))}
            env.update(MLX_HOSTFILE=str(hostfile), BENCH_LM_LINK=f"{measured:.0f} us one way")
            logs = [Path(tmp, f"rank{r}.log") for r in range(2)]
            try:
                for rank, ns in enumerate(names):
                    procs.append(subprocess.Popen(
                        ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), *argv],
                        env=dict(env, MLX_RANK=str(rank)), stdout=logs[rank].open("w"),
                        stderr=subprocess.STDOUT, start_new_session=True,
                    ))
                deadline = time.monotonic() + timeout
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.2)
            finally:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, 9)
                    p.wait()
            sink = Results()
            for line in logs[0].read_text(errors="replace").splitlines():
                sink.write(line)
            if not sink.results or any(p.returncode != 0 for p in procs):
                tail = "".join(log.read_text(errors="replace")[-2000:] for log in logs)
                raise SystemExit(f"bench_lm: the 2-namespace job ({one_way_us} us) failed:\n{tail}")
    result = sink.results[0]
    result["one_way_us"] = measured
    return result


def uneven_markdown(results: list[dict]) -> str:
    """The README table of ``--uneven``: uneven TP vs PP vs 1 process."""
    lines = [
        "| weights | ranks, backend, link | 1 process each | uneven TP | PP | TP ÷ PP | TP ÷ 1 process "
        "| PP ÷ 1 process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["ranks"] == 1:
            continue
        d = r["decode_tps"]
        lines.append(
            f"| {r['format']} | {r['ranks']}, {r['backend']}, {r['link']} | {d['1 process each']:.1f} | "
            f"{d['mlxdist TP']:.1f} | {d['mlxdist PP']:.1f} | {r['tp_vs_pp']:.2f}× | "
            f"{r['tp_vs_1_process']:.2f}× | {r['pp_vs_1_process']:.2f}× |"
        )
    shares = next(r["tp_shares"] for r in results if r["ranks"] > 1)
    lines.append("")
    lines.append(f"TP shares: query heads {shares['query_heads']}, MLP features {shares['intermediate']}.")
    lines.append("")
    lines.append(
        "Load average during the jobs: " + ", ".join(f"{r['load_average']:.1f}" for r in results) + "."
    )
    return "\n".join(lines)


def markdown(results: list[dict], launcher_share: float) -> str:
    lines = [
        "| weights | ranks, backend | 1 process | mlx-lm shard() | mlxdist TP (× mlx-lm) | mlxdist PP "
        "| TP comm share | PP comm share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    single = {r["format"]: r["decode_tps"]["1 process (mlx-lm)"] for r in results if r["ranks"] == 1}
    for r in results:
        if r["ranks"] == 1:
            continue
        d = r["decode_tps"]
        tp, theirs, pp = d["mlxdist TP"], d["mlx-lm shard()"], d["mlxdist PP"]
        lines.append(
            f"| {r['format']} | {r['ranks']}, {r['backend']} | {single.get(r['format'], float('nan')):.1f} | "
            f"{theirs:.1f} | {tp:.1f} ({r['tp_vs_mlx_lm']:.2f}×) | {pp:.1f} | "
            f"{100 * r['comm_share']['tp']:.0f} % | {100 * r['comm_share']['pp']:.0f} % |"
        )
    lines.append("")
    lines.append(
        "Decode tokens/s: 1 / median decode-step time (steps of all variants interleaved, each step "
        "the slowest rank's); × mlx-lm: median of the step-by-step ratio. Load average during the jobs: "
        + ", ".join(f"{r['load_average']:.1f}" for r in results)
        + ". "
        f"Launcher CPU: {100 * launcher_share:.1f} % of a core."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--moe" in argv:  # its own job and options: bench_lm_moe.py
        from bench_lm_moe import main as moe_main

        return moe_main([a for a in argv if a != "--moe"])
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from mlxdist.lm.testing import write_checkpoint

    dims = SIZES["uneven" if args.uneven else "quick" if args.quick else "default"]
    common = ["--tokens", str(args.tokens), "--prompt", str(args.prompt), "--rounds", str(args.rounds)]
    common += ["--uneven"] if args.uneven else []
    results, shares = [], []
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp:
        for fmt in args.formats:
            path = write_checkpoint(Path(tmp) / fmt.replace(" ", ""), "llama", seed=0, **FORMATS[fmt], **dims)
            worker_argv = ["--worker", str(path), fmt, *common]
            if not args.uneven:  # there the anchor runs in each 2-rank job
                single, _ = run_job(worker_argv, 1, "ring", args.timeout, __file__)
                results.append(single)
                print(json.dumps(single), flush=True)
            for backend in args.backends:
                result, share = run_job(worker_argv, 2, backend, args.timeout, __file__)
                shares.append(share)
                results.append(result)
                print(json.dumps(result), flush=True)
            for delay in args.netns:
                result = run_netns_job(worker_argv, delay, args.timeout)
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": dims, "results": results, "launcher_cpu": max(shares, default=0)}, indent=2)
        )
    if args.markdown:
        print(uneven_markdown(results) if args.uneven else markdown(results, max(shares, default=0.0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
