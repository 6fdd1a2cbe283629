"""``mlxdist-serve`` / ``python -m mlxdist.serve``: an OpenAI-compatible server over sharded ranks.

Three ways to run:

- ``-n N`` (N > 1) or ``--hostfile hosts.json`` outside a launched job: this
  process supervises. It serves HTTP itself and starts N local ranks running
  this command, or (ring) one rank on each host of the hostfile (mlx.launch's
  format) through the ``--ssh`` remote shell, the ring on ``--starting-port``
  and up; rank 0's engine connects back over a link (``MLXDIST_SERVE_LINK``
  and ``MLXDIST_SERVE_TOKEN`` in the ranks' environment: loopback, or with a
  hostfile ``--link-host``, by default the address that routes to the first
  host). When the world fails it starts a new one without the lost ranks
  (locally: as many fewer; with a hostfile: without their hosts) and resumes
  the requests in flight on it (:mod:`mlxdist.serve.supervisor`); below
  ``--min-ranks`` it answers every request in flight with the error, reports
  ``failed`` on ``/health`` naming the rank, and exits non-zero.
- Inside a launched job (``mlxdist.launch -n 2 -- mlxdist-serve ...``): rank
  0 serves HTTP on a thread of its own over the same link.
- Neither: one process, the front door on a thread.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

from mlxdist.launch.hosts import DEFAULT_STARTING_PORT
from mlxdist.serve.prompt_cache import DEFAULT_BYTES
from mlxdist.serve.protocol import LINK_VARIABLE as _LINK
from mlxdist.serve.protocol import TOKEN_VARIABLE as _TOKEN

__all__ = ["main", "build_parser"]

# Seconds the front door keeps answering after a failure, so clients get their errors.
_FAIL_GRACE = 2.0


def _positive_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


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
    """The command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="mlxdist-serve",
        allow_abbrev=False,
        description="Serve an mlx-lm checkpoint sharded over mlxdist ranks through OpenAI's API.",
    )
    parser.add_argument("--model", required=True, help="mlx-lm checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any free port)")
    parser.add_argument("--mode", choices=("auto", "tp", "pp"), default="auto")
    parser.add_argument("--pp-weights", type=_positive_floats, help="per-rank pipeline shares, e.g. 1,2")
    parser.add_argument("-n", "--nranks", type=_positive(int), help="local ranks to start when not inside a launched job")
    parser.add_argument("--backend", choices=("ring", "mpi"), default="ring", help="for -n (default ring; --hostfile: ring only)")
    parser.add_argument("--hostfile", help="ring: one rank on each host of this mlx.launch hostfile (JSON list of "
                                           '{"ssh": HOST, "ips": [ADDRESS, ...]}), started through --ssh')
    parser.add_argument("--ssh", default="ssh",
                        help="for --hostfile: the remote shell, run as 'SSH HOST COMMAND' (split like a shell "
                             "would, e.g. \"ssh -o BatchMode=yes\"; default ssh)")
    parser.add_argument("--starting-port", type=int, default=DEFAULT_STARTING_PORT,
                        help="for --hostfile: the first ring port on the hosts; each new world takes the next "
                             f"ones (default {DEFAULT_STARTING_PORT})")
    parser.add_argument("--link-host",
                        help="for --hostfile: the address the hosts reach this process on (default: the local "
                             "address on the route to the first host)")
    parser.add_argument("--max-concurrent", type=_positive(int), default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="requests waiting beyond --max-concurrent before 429 (default 32)")
    parser.add_argument("--max-tokens", type=_positive(int), default=512,
                        help="server-side cap on generated tokens per request (default 512)")
    parser.add_argument("--max-body", type=_positive(int), default=1 << 20, help="largest request body, bytes (default 1 MiB)")
    parser.add_argument("--api-key", default=os.environ.get("MLXDIST_SERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default $MLXDIST_SERVE_API_KEY, else none)")
    parser.add_argument("--timeout", type=_positive(float), default=30.0,
                        help="per-operation deadline of the ranks while requests run, seconds (default 30; "
                             "an idle server's ranks wait for work up to max(60, 4x this))")
    parser.add_argument("--min-ranks", type=_positive(int), default=1,
                        help="for -n/--hostfile: after losing ranks, re-form the world while at least this many remain; "
                             "below, fail and exit non-zero (default 1)")
    parser.add_argument("--prompt-cache-bytes", type=_size, default=DEFAULT_BYTES,
                        help="bound on each rank's prompt cache (the KV of earlier requests, reused for a shared "
                             "prefix), bytes, with an optional K/M/G suffix; 0 disables it (default "
                             f"{DEFAULT_BYTES >> 30}G)")
    parser.add_argument("--reform-wait", type=_positive(float), default=60.0,
                        help="seconds a request arriving while the world re-forms waits before 503 with "
                             "Retry-After (default 60)")
    return parser


def _config(args: argparse.Namespace) -> Any:
    from mlxdist.serve.frontdoor import load_config

    return load_config(args.model, max_tokens=args.max_tokens, api_key=args.api_key, max_body=args.max_body,
                       timeout=args.timeout)


def _front_door(args: argparse.Namespace) -> Any:
    from mlxdist.serve.frontdoor import FrontDoor

    return FrontDoor(host=args.host, port=args.port, max_inflight=args.max_concurrent + args.max_queue,
                     stall=2 * args.timeout + 10)


def _announce(args: argparse.Namespace, door: Any) -> None:
    print(f"mlxdist-serve: serving on http://{args.host}:{door.port}/v1", file=sys.stderr, flush=True)


def _supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from mlxdist.serve.supervisor import supervise

    return supervise(args, argv)


def _answer_before_ending(door: Any) -> None:
    """When the launcher ends rank 0 (another rank failed), tell the clients before going."""

    def ending(signum: int, frame: Any) -> None:
        door.fail(f"the launcher ended rank 0 ({signal.Signals(signum).name}): the job is ending")
        threading.Timer(_FAIL_GRACE / 2, os._exit, args=(128 + signum,)).start()

    signal.signal(signal.SIGTERM, ending)


def _serve_rank(args: argparse.Namespace) -> int:
    import mlxdist
    from mlxdist.errors import DistributedError
    from mlxdist.lm.loading import load
    from mlxdist.serve.engine import Engine
    from mlxdist.serve.protocol import LinkClient

    group = mlxdist.init(timeout=max(60.0, args.timeout))
    initialized = time.time()
    rank, size = group.rank(), group.size()
    if args.nranks is not None and args.nranks != size and _LINK not in os.environ:
        raise mlxdist.errors.InvalidArgumentError(f"-n {args.nranks} given inside a launched job of {size} ranks")
    door = None
    link = None
    if rank == 0:
        if _LINK in os.environ:
            address, token = os.environ[_LINK], os.environ.get(_TOKEN, "")
        else:
            door = _front_door(args)
            door.start_thread(_config(args))
            _announce(args, door)
            _answer_before_ending(door)
            address, token = door.link_address, door.token
        link = LinkClient(address, token)
    try:
        model, tokenizer, plan = load(args.model, group, args.mode, pp_weights=args.pp_weights)
        description = {"mode": plan.mode, "reason": plan.reason, "family": plan.family,
                       "timing": {"initialized": initialized, **plan.seconds}}
        engine = Engine(model, group, description, link=link, max_concurrent=args.max_concurrent,
                        eos_ids=sorted(tokenizer.eos_token_ids), vocab_size=int(model.args.vocab_size),
                        timeout=args.timeout, prompt_cache_bytes=args.prompt_cache_bytes)
        engine.run()
    except Exception as exc:
        message = f"rank {rank}: {type(exc).__name__}: {exc}"
        if link is not None and not isinstance(exc, DistributedError):
            try:
                link.send("failed", message=message)
            except DistributedError:
                pass
        print(f"mlxdist-serve: {message}", file=sys.stderr, flush=True)
        if door is not None:
            time.sleep(_FAIL_GRACE)
            door.stop()
            door.join(5)
        return 1
    if door is not None:
        door.stop()
        door.join(5)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    from mlxdist.backends import detect_backend

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_queue < 0:
        parser.error("--max-queue must be >= 0")
    if not 0 <= args.port < 65536:
        parser.error("--port must be in [0, 65535]")
    if not 0 < args.starting_port < 65536:
        parser.error("--starting-port must be in [1, 65535]")
    if args.hostfile is not None and args.backend != "ring":
        parser.error("--hostfile is for --backend ring (mpirun places MPI ranks itself)")
    if args.hostfile is not None and (detect_backend() is not None or _LINK in os.environ):
        parser.error("--hostfile is for the supervising process, not for a rank inside a launched job")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        supervising = (args.nranks or 1) > 1 or args.hostfile is not None
        if supervising and detect_backend() is None and _LINK not in os.environ:
            return _supervise(args, argv)
        return _serve_rank(args)
    except (ValueError, TypeError, NotImplementedError, OSError) as exc:
        print(f"mlxdist-serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
