"""``mlxdist-generate`` / ``python -m mlxdist.lm``: generate text with a sharded mlx-lm model.

Outside a launched job, ``-n N`` (N > 1) starts N local ranks through
:func:`mlxdist.launch.launch` running this same command; inside one (ring's
``MLX_RANK``/``MLX_HOSTFILE``, or mpirun's environment) every rank loads its
shard and generates, and rank 0 prints the text, or with ``--json`` one JSON
line: tokens, text, mode, reason, decode and prompt tokens/s, per rank the
weight bytes and peak memory, and under TP each rank's shares (query heads,
key/value heads, MLP features, vocabulary rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import IO, Optional, Sequence

import numpy as np

from mlxdist.launch.cli import timeout_seconds

__all__ = ["main", "build_parser", "parse_ids"]

_PREFIX = "[0] "


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``.

    Raises:
        argparse.ArgumentTypeError: not a comma-separated list of non-negative ints.
    """
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected one or more non-negative token ids, got {text!r}")
    return ids


def _positive_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="mlxdist-generate",
        description="Generate with an mlx-lm checkpoint sharded over mlxdist ranks "
        "(TP, or PP when TP cannot split it).",
    )
    parser.add_argument("--model", required=True, help="mlx-lm checkpoint directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized by the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--mode", choices=("auto", "tp", "pp"), default="auto")
    parser.add_argument("--pp-weights", type=_positive_floats, help="per-rank pipeline shares, e.g. 1,2")
    parser.add_argument(
        "--tp-weights", type=_positive_floats, help="per-rank tensor-parallel shares, e.g. 2,1 (default even)"
    )
    parser.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="under TP, also split the embedding and head by vocabulary rows",
    )
    parser.add_argument(
        "--experts",
        choices=("tp", "ep"),
        default="tp",
        help="mixture-of-experts blocks under TP: split every expert's features (tp, default) or place "
        "whole experts on ranks by --tp-weights (ep)",
    )
    parser.add_argument(
        "-n", "--nranks", type=int, help="local ranks to start when not inside a launched job"
    )
    parser.add_argument("--backend", choices=("ring", "mpi"), default="ring", help="for -n (default ring)")
    parser.add_argument("--timeout", type=timeout_seconds, default=None,
                        help="job deadline for -n launches, seconds (default: none)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same on every rank")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--json", action="store_true", help="rank 0 prints one JSON line")
    return parser


class _RankZeroOut:
    """Forwards launched ranks' stdout, printing rank 0's lines without their prefix."""

    def __init__(self, sink: IO[str], tagged: bool) -> None:
        self.sink = sink
        self.tagged = tagged  # mpirun's tag leaves one space before the text

    def write(self, line: str) -> int:
        if line.startswith(_PREFIX):
            text = line[len(_PREFIX) :]
            line = text[1:] if self.tagged and text.startswith(" ") else text
        self.sink.write(line)
        return len(line)

    def flush(self) -> None:
        self.sink.flush()


def _launch_self(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from mlxdist.launch import launch

    result = launch(
        [sys.executable, "-m", "mlxdist.lm", *argv],
        n=args.nranks,
        backend=args.backend,
        timeout=args.timeout,
        stdout=_RankZeroOut(sys.stdout, tagged=args.backend == "mpi"),
    )
    return result.exit_code


def _run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    import mlxdist
    from mlxdist.errors import InvalidArgumentError
    from mlxdist.lm.generation import generate_tokens
    from mlxdist.lm.loading import load
    from mlxdist.lm.memory import peak_rss_bytes

    group = mlxdist.init()
    rank, size = group.rank(), group.size()
    if args.nranks is not None and args.nranks != size:
        raise InvalidArgumentError(f"-n {args.nranks} given inside a launched job of {size} ranks")
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model, tokenizer, plan = load(
        args.model,
        group,
        args.mode,
        pp_weights=args.pp_weights,
        tp_weights=args.tp_weights,
        vocab_parallel=args.vocab_parallel,
        experts=args.experts,
    )
    prompt = args.prompt_ids if args.prompt_ids is not None else tokenizer.encode(args.prompt)
    vocab = int(model.args.vocab_size)
    if any(i >= vocab for i in prompt):
        raise InvalidArgumentError(
            f"prompt token ids must be below the vocabulary size {vocab}, got {prompt}"
        )
    sampler = None
    if args.temp > 0:
        from mlx_lm.sample_utils import make_sampler

        mx.random.seed(args.seed)
        sampler = make_sampler(args.temp, top_p=args.top_p, top_k=args.top_k)
    stops = () if args.ignore_eos else tokenizer.eos_token_ids
    out = generate_tokens(model, prompt, args.max_tokens, sampler=sampler, stop_tokens=stops)
    mine = np.array([[plan.weight_bytes, peak_rss_bytes(), mx.get_peak_memory()]], dtype=np.int64)
    per_rank = np.asarray(group.all_gather(mine)).reshape(size, 3)
    if rank != 0:
        return 0
    text = tokenizer.decode(out.tokens)
    if args.json:
        record = {
            "tokens": out.tokens,
            "text": text,
            "mode": plan.mode,
            "experts": plan.experts,
            "kinds": plan.kinds,
            "reason": plan.reason,
            "family": plan.family,
            "ranks": size,
            "backend": None if getattr(group, "backend", None) is None else str(group.backend),
            "prompt_tokens": out.prompt_tokens,
            "prompt_tps": out.prompt_tps,
            "decode_tps": out.decode_tps,
            "weight_bytes": per_rank[:, 0].tolist(),
            "full_weight_bytes": plan.full_bytes,
            "shares": plan.as_dict()["shares"],
            "peak_rss_bytes": per_rank[:, 1].tolist(),
            "peak_mlx_bytes": per_rank[:, 2].tolist(),
        }
        print(json.dumps(record), flush=True)
    else:
        print(text, flush=True)
        print(
            f"[{plan.mode} on {size} ranks] prompt {out.prompt_tps:.1f} tok/s, "
            f"decode {out.decode_tps:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    from mlxdist.backends import detect_backend

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    if args.nranks is not None and args.nranks < 1:
        parser.error("-n must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (args.nranks or 1) > 1 and detect_backend() is None:
        return _launch_self(args, argv)
    try:
        return _run(args)
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"mlxdist-generate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
