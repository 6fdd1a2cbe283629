"""Command-line options of ``mlxdist.bench`` (named as nccl-tests names them)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Sequence

from mlxdist.bench.workload import DTYPES, OPERATIONS

__all__ = [
    "BenchConfig",
    "parse_size",
    "format_size",
    "build_parser",
    "parse_args",
    "IMPLEMENTATIONS",
    "WORKLOADS",
    "CHAIN_IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("mlxdist-reg", "mlxdist-numpy", "mlxdist-mlx", "mx.distributed", "mpi4py")
# collectives: the nccl-tests-style sweep; chain: the decode chain (mlxdist.bench.chain).
WORKLOADS = ("collectives", "chain")
# The implementations that build lazy graphs, the only ones the chain can run.
CHAIN_IMPLEMENTATIONS = ("mlxdist-mlx", "mx.distributed")
TP_DTYPES = ("float16", "bfloat16")
CHAIN_DTYPES = ("float16",)
TP_OPERATIONS = ("all_sum", "all_gather", "sum_scatter")

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """A byte count such as ``1024``, ``1K``, ``64M`` or ``1GiB`` (powers of 1024).

    Args:
        text: The size as written on the command line.

    Returns:
        The number of bytes.

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1024, 1K, 64M)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(nbytes: int) -> str:
    """A byte count for people: ``1 KiB``, ``64 MiB``, ``1536 B``.

    Args:
        nbytes: The number of bytes.

    Returns:
        The shortest exact form in B, KiB, MiB or GiB.
    """
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _choices(allowed: Sequence[str], what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(allowed) if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)} or 'all'"
            )
        return names

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None


@dataclass
class BenchConfig:
    """What to measure and how to report it (see ``python -m mlxdist.bench -h``)."""

    min_bytes: int = 1 << 10
    max_bytes: int = 64 << 20
    step_factor: int = 2
    warmup: int = 5
    iters: int = 20
    rounds: int = 4
    dtypes: tuple[str, ...] = ("float32",)
    ops: tuple[str, ...] = OPERATIONS
    impls: tuple[str, ...] = IMPLEMENTATIONS
    workload: str = "collectives"
    chain_length: int = 64
    tp: bool = False
    hidden: int = 4096
    tokens: tuple[int, ...] = (1, 8, 32, 128, 512)
    backend: str | None = None
    nranks: int = 2
    timeout: float = 1800.0
    json: str | None = None
    plot: str | None = None
    stat: str = "median"
    progress: bool = True
    emit_events: bool = False
    result_file: str | None = None
    argv: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m mlxdist.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m mlxdist.bench",
        description=(
            "nccl-tests-style collective benchmarks of mlxdist against mx.distributed "
            "(and mpi4py on MPI). With no launcher it starts --nranks local ranks itself."
        ),
    )
    sizes = parser.add_argument_group("sizes (as nccl-tests)")
    sizes.add_argument("-b", "--minbytes", type=parse_size, default=1 << 10, help="smallest size (default 1K)")
    sizes.add_argument("-e", "--maxbytes", type=parse_size, default=64 << 20, help="largest size (default 64M)")
    sizes.add_argument("-f", "--stepfactor", type=_positive, default=2, help="size multiplier (default 2)")
    sizes.add_argument("-w", "--warmup_iters", type=_non_negative, default=5, help="warm-up iterations (default 5)")
    sizes.add_argument("-n", "--iters", type=_positive, default=20, help="timed iterations (default 20)")
    sizes.add_argument(
        "--rounds", type=_positive, default=4,
        help="split the timed iterations into this many rounds, each timing every implementation "
        "in turn (default 4)",
    )
    sizes.add_argument(
        "--tp",
        action="store_true",
        help="tensor-parallel sizes: hidden x tokens (Llama decode/prefill), float16 and bfloat16",
    )
    sizes.add_argument(
        "--hidden", type=_positive, default=4096, help="hidden size for --tp and the chain (default 4096)"
    )
    sizes.add_argument(
        "--tokens",
        type=_positive_list,
        default=(1, 8, 32, 128, 512),
        help="token counts for --tp (default 1,8,32,128,512)",
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--workload", choices=WORKLOADS, default="collectives",
        help="collectives: the size sweep (default); chain: the decode chain, --length chained all_sums "
        "of a --hidden vector (float16 by default) built lazily and evaluated once, with and without "
        "'* 0.5' between them, on the lazy implementations",
    )
    what.add_argument(
        "--length", type=_positive, default=64, help="all_sums per chain for --workload chain (default 64)"
    )
    what.add_argument(
        "-d", "--datatype", type=_choices(DTYPES, "dtype"), default=None,
        help=f"comma list of {', '.join(DTYPES)} or 'all' (default float32; float16,bfloat16 with --tp; "
        "float16 for the chain)",
    )
    what.add_argument(
        "-o", "--ops", type=_choices(OPERATIONS, "operation"), default=None,
        help=f"comma list of {', '.join(OPERATIONS)} or 'all' (default all; "
        f"{','.join(TP_OPERATIONS)} with --tp)",
    )
    what.add_argument(
        "--impls", type=_choices(IMPLEMENTATIONS, "implementation"), default=None,
        help="comma list of implementations (default all; mpi4py runs on MPI only; "
        f"{','.join(CHAIN_IMPLEMENTATIONS)} for the chain)",
    )
    launch = parser.add_argument_group("ranks")
    launch.add_argument(
        "--backend", choices=("ring", "mpi"), default=None,
        help="backend (default ring when started without a launcher; the launcher's otherwise)",
    )
    launch.add_argument("--nranks", type=_positive, default=2, help="ranks to start with no launcher (default 2)")
    launch.add_argument("--timeout", type=float, default=1800.0, help="seconds before started ranks are killed")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="FILE",
        help="write header and raw rows as JSON to FILE ('-' or no value: stdout, instead of the table)",
    )
    output.add_argument("--plot", default=None, metavar="FILE.png", help="plot busbw against size per implementation")
    output.add_argument(
        "--stat", choices=("median", "p99"), default="median", help="time statistic shown in the table"
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Used between mlxdist.bench and the ranks it starts.
    parser.add_argument("--emit-events", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> BenchConfig:
    """Parse the command line into a :class:`BenchConfig`.

    Args:
        argv: The arguments, without the program name.

    Returns:
        The configuration.

    Raises:
        SystemExit: invalid arguments (argparse prints why).
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.minbytes > args.maxbytes:
        parser.error(f"--minbytes {args.minbytes} is larger than --maxbytes {args.maxbytes}")
    if args.stepfactor < 2 and args.minbytes != args.maxbytes:
        parser.error("--stepfactor must be >= 2 to step from --minbytes to --maxbytes")
    chain = args.workload == "chain"
    if chain and (args.tp or args.plot or args.ops):
        parser.error("--workload chain takes none of --tp, --plot, -o/--ops")
    if chain:
        dtypes = args.datatype or CHAIN_DTYPES
    else:
        dtypes = args.datatype or (TP_DTYPES if args.tp else ("float32",))
    return BenchConfig(
        min_bytes=args.minbytes,
        max_bytes=args.maxbytes,
        step_factor=args.stepfactor,
        warmup=args.warmup_iters,
        iters=args.iters,
        rounds=args.rounds,
        dtypes=dtypes,
        ops=args.ops or (TP_OPERATIONS if args.tp else OPERATIONS),
        impls=args.impls or (CHAIN_IMPLEMENTATIONS if chain else IMPLEMENTATIONS),
        workload=args.workload,
        chain_length=args.length,
        tp=args.tp,
        hidden=args.hidden,
        tokens=args.tokens,
        backend=args.backend,
        nranks=args.nranks,
        timeout=args.timeout,
        json=args.json,
        plot=args.plot,
        stat=args.stat,
        progress=not args.no_progress,
        emit_events=args.emit_events,
        result_file=args.result_file,
        argv=list(argv),
    )
