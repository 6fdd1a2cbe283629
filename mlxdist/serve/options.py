"""The server's options: ``mlxdist-serve``'s command line parsed and checked once into a frozen object.

Everything below the command line (the supervisor, the front door, the
ranks) reads a :class:`ServeOptions`; nothing mutates it. The ranks a
supervisor starts get the same command line minus the options only the
supervisor reads (:meth:`ServeOptions.rank_argv`).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mlxdist.launch.hosts import DEFAULT_STARTING_PORT
from mlxdist.serve.prompt_cache import DEFAULT_BYTES

__all__ = ["ServeOptions", "build_parser", "parse_options", "check_experts"]

# Options only the supervising process reads (the API key and CORS: only the front door checks them).
_SUPERVISOR_OPTIONS = ("--api-key", "--hostfile", "--ssh", "--starting-port", "--link-host", "--cors-origins")
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServeOptions:
    """What ``mlxdist-serve`` was asked to do (see ``mlxdist-serve --help`` for each field)."""

    model: str
    argv: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "auto"
    pp_weights: Optional[tuple[float, ...]] = None
    experts: str = "tp"
    nranks: Optional[int] = None
    backend: str = "ring"
    hostfile: Optional[str] = None
    ssh: str = "ssh"
    starting_port: int = DEFAULT_STARTING_PORT
    link_host: Optional[str] = None
    max_concurrent: int = 8
    prefill_batch: Optional[int] = None
    max_queue: int = 32
    max_tokens: int = 512
    max_body: int = 1 << 20
    api_key: Optional[str] = None
    timeout: float = 30.0
    min_ranks: int = 1
    prompt_cache_bytes: int = DEFAULT_BYTES
    reform_wait: float = 60.0
    start_deadline: float = 300.0
    drain_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    log_level: str = "warning"

    @property
    def max_inflight(self) -> int:
        """Requests admitted at once (decoding plus waiting); more get 429."""
        return self.max_concurrent + self.max_queue

    @property
    def stall(self) -> float:
        """Seconds of engine silence, with requests running, that fail the world."""
        return 2 * self.timeout + 10

    @property
    def logging_level(self) -> int:
        """``log_level`` as a :mod:`logging` level."""
        return getattr(logging, self.log_level.upper())

    def rank_argv(self) -> list[str]:
        """The command line for the ranks: ours without the supervisor's own options."""
        out, skip = [], False
        for arg in self.argv:
            if skip:
                skip = False
            elif arg in _SUPERVISOR_OPTIONS:
                skip = True
            elif not arg.startswith(tuple(f"{option}=" for option in _SUPERVISOR_OPTIONS)):
                out.append(arg)
        return out


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
        return value

    return parse


def _size(text: str) -> int:
    """``"512M"`` -> bytes (binary suffixes K, M, G, T; none: bytes)."""
    scale = 1 << (10 * (" KMGT".index(text[-1].upper()))) if text[-1:].upper() in ("K", "M", "G", "T") else 1
    digits = text[:-1] if scale > 1 else text
    try:
        value = float(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes with an optional K/M/G/T suffix, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return int(value * scale)


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser.

    Returns:
        An :class:`argparse.ArgumentParser` whose namespace holds :class:`ServeOptions`' fields.
    """
    parser = argparse.ArgumentParser(
        prog="mlxdist-serve",
        allow_abbrev=False,
        description="Serve an mlx-lm checkpoint sharded over mlxdist ranks through OpenAI's API.",
    )
    add = parser.add_argument
    add("--model", required=True, help="mlx-lm checkpoint directory")
    add("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any free port)")
    add("--mode", choices=("auto", "tp", "pp"), default="auto")
    add("--pp-weights", type=_floats, help="per-rank pipeline shares, e.g. 1,2")
    add("--experts", choices=("tp", "ep"), default="tp",
        help="mixture-of-experts blocks under TP: split every expert's features (tp, default) or place whole "
             "experts on the ranks (ep); planned again for the ranks left after a loss")
    add("-n", "--nranks", type=_positive(int), help="local ranks to start when not inside a launched job")
    add("--backend", choices=("ring", "mpi"), default="ring", help="for -n (default ring; --hostfile: ring only)")
    add("--hostfile", help="ring: one rank on each host of this mlx.launch hostfile (JSON list of "
                           '{"ssh": HOST, "ips": [ADDRESS, ...]}), started through --ssh')
    add("--ssh", default="ssh", help="for --hostfile: the remote shell, run as 'SSH HOST COMMAND' (split like a "
                                      "shell would, e.g. \"ssh -o BatchMode=yes\"; default ssh)")
    add("--starting-port", type=int, default=DEFAULT_STARTING_PORT,
        help="for --hostfile: the first ring port on the hosts; each new world takes the next "
             f"ones (default {DEFAULT_STARTING_PORT})")
    add("--link-host", help="for --hostfile: the address the hosts reach this process on (default: the local "
                            "address on the route to the first host)")
    add("--max-concurrent", type=_positive(int), default=8, help="requests decoded together (default 8)")
    add("--prefill-batch", type=_positive(int), default=None,
        help="new prompts prefilled together in one forward (default: 1 on the CPU, where prefilling prompts "
             "together takes as long as one after the other and each waits for the slowest; 8 on a GPU, as "
             "mlx_lm.server's --prompt-concurrency)")
    add("--max-queue", type=int, default=32, help="requests waiting beyond --max-concurrent before 429 (default 32)")
    add("--max-tokens", type=_positive(int), default=512,
        help="server-side cap on generated tokens per request (default 512)")
    add("--max-body", type=_positive(int), default=1 << 20, help="largest request body, bytes (default 1 MiB)")
    add("--api-key", default=os.environ.get("MLXDIST_SERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default $MLXDIST_SERVE_API_KEY, else none)")
    add("--timeout", type=_positive(float), default=30.0,
        help="per-operation deadline of the ranks while requests run, seconds (default 30; "
             "an idle server's ranks wait for work up to max(60, 4x this))")
    add("--min-ranks", type=_positive(int), default=1,
        help="for -n/--hostfile: after losing ranks, re-form the world while at least this many remain; "
             "below, fail and exit non-zero (default 1)")
    add("--prompt-cache-bytes", type=_size, default=DEFAULT_BYTES,
        help="bound on each rank's prompt cache (the KV of earlier requests, reused for a shared prefix), bytes, "
             f"with an optional K/M/G/T suffix; 0 disables it (default {DEFAULT_BYTES >> 30}G)")
    add("--reform-wait", type=_positive(float), default=60.0,
        help="seconds a request arriving while the world re-forms waits before 503 with Retry-After (default 60)")
    add("--start-deadline", type=_positive(float), default=300.0,
        help="seconds a request arriving while the model loads waits before 503 with Retry-After (default 300)")
    add("--drain-timeout", type=_positive(float), default=30.0,
        help="after SIGTERM, seconds the requests running may take to finish before their streams end with an "
             "error event (default 30); new requests get 503 meanwhile")
    add("--cors-origins", type=_origins, default=(),
        help="comma-separated origins browsers may call from ('*': any); default none (no CORS headers)")
    add("--log-level", choices=_LOG_LEVELS, default="warning",
        help="log level; 'info' adds the access log, one line per request with its id (default warning)")
    return parser


def parse_options(argv: Sequence[str]) -> ServeOptions:
    """Parse and check a command line.

    Args:
        argv: The arguments (without the program name).

    Returns:
        The options.

    Raises:
        SystemExit: a bad command line (argparse's usage message, status 2).
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.max_queue < 0:
        parser.error("--max-queue must be >= 0")
    if not 0 <= args.port < 65536:
        parser.error("--port must be in [0, 65535]")
    if not 0 < args.starting_port < 65536:
        parser.error("--starting-port must be in [1, 65535]")
    if args.hostfile is not None and args.backend != "ring":
        parser.error("--hostfile is for --backend ring (mpirun places MPI ranks itself)")
    return ServeOptions(argv=tuple(argv), **vars(args))


def check_experts(options: ServeOptions, size: int) -> None:
    """Refuse ``--experts ep`` before any rank starts when the ranks' plan could not place the experts.

    The plan is mlxdist.lm's (:func:`mlxdist.lm.loading.plan_for`) on the
    checkpoint's lazily loaded model; ``--experts tp`` is left to the ranks.

    Args:
        options: The server's options.
        size: The ranks the first world has.

    Raises:
        InvalidArgumentError: ``--experts ep`` on a model without experts, or a
            mode without tensor parallelism.
        ShapeError: more ranks than experts (or than query heads).
        UnsupportedOperationError: no sharding plan for the model's family.
    """
    if options.experts != "ep":
        return
    from mlxdist.lm.loading import plan_for

    plan_for(options.model, size, options.mode, pp_weights=options.pp_weights, experts=options.experts)
