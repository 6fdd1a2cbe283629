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
  0 serves HTTP on a thread of its own over the same link. SIGTERM to rank 0
  (or to the launcher, which passes it on to every rank) drains and the ranks
  end cleanly: the other ranks leave a stop to rank 0, whose engine ends them.
  When the launcher ends the job (a rank failed), rank 0 first answers every
  request in flight with the error, and the other ranks end at once.
- Neither: one process, the front door on a thread.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

from mlxdist.launch.job import launcher_ending
from mlxdist.serve.protocol import LINK_VARIABLE as _LINK
from mlxdist.serve.protocol import TOKEN_VARIABLE as _TOKEN
from mlxdist.serve.options import ServeOptions, build_parser, check_experts, parse_options

__all__ = ["main"]

# Seconds the front door keeps answering after a failure, so clients get their errors.
_FAIL_GRACE = 2.0
# Fields of mlxdist.lm's plan dict that are only rank 0's (the world's are in "ranks" and "rank_bytes").
_RANK_OWN = ("rank", "size", "weight_bytes")


def _config(options: ServeOptions) -> Any:
    from mlxdist.serve.frontdoor import load_config

    return load_config(options)


def _front_door(options: ServeOptions) -> Any:
    from mlxdist.serve.frontdoor import FrontDoor

    return FrontDoor(options)


def _announce(options: ServeOptions, door: Any) -> None:
    print(f"mlxdist-serve: serving on http://{options.host}:{door.port}/v1", file=sys.stderr, flush=True)


def _supervise(options: ServeOptions) -> int:
    from mlxdist.serve.supervisor import supervise

    return supervise(options)


def _answer_before_ending(door: Any) -> None:
    """SIGTERM drains (see :mod:`mlxdist.serve.frontdoor`): sent to this process, or passed on by the
    launcher. When the launcher says it is ending the job (another rank failed, the world failed, its
    deadline passed), the clients are told at once instead, before the launcher's SIGKILL."""

    def on_sigterm(signum: int, frame: Any) -> None:
        ending = launcher_ending()
        if ending is None:
            if door.server is not None:
                door.server.handle_exit(signum, frame)
            return
        door.fail(f"the launcher ended rank 0 ({ending}): the job is ending")

        def leave() -> None:  # once the clients have their errors (the launcher's SIGKILL comes later)
            door.wait_answered(_FAIL_GRACE)
            os._exit(128 + signum)

        threading.Thread(target=leave, name="mlxdist-serve-ending", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def _leave_stops_to_rank_0(rank: int) -> None:
    """On a rank other than 0 of a job the user launched: a SIGTERM that is a request to stop (passed on
    by the launcher to every rank, or sent here) is rank 0's to carry out (it drains, then its engine's
    stop ends this rank); one the launcher sends while ending the job ends this rank at once."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if launcher_ending() is None:
            print(f"mlxdist-serve: rank {rank}: SIGTERM: rank 0 stops the job (it drains first)",
                  file=sys.stderr, flush=True)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def _serve_rank(options: ServeOptions) -> int:
    import mlxdist
    from mlxdist.errors import DistributedError
    from mlxdist.lm.loading import load
    from mlxdist.serve.engine import Engine
    from mlxdist.serve.failures import lost_ranks
    from mlxdist.serve.protocol import LinkClient

    group = mlxdist.init(timeout=max(60.0, options.timeout))
    initialized = time.time()
    rank, size = group.rank(), group.size()
    if options.nranks is not None and options.nranks != size and _LINK not in os.environ:
        raise mlxdist.errors.InvalidArgumentError(f"-n {options.nranks} given inside a launched job of {size} ranks")
    door = None
    link = None
    if rank == 0:
        if _LINK in os.environ:
            address, token = os.environ[_LINK], os.environ.get(_TOKEN, "")
        else:
            door = _front_door(options)
            door.start_thread(_config(options))
            _announce(options, door)
            _answer_before_ending(door)
            if size > 1:  # the clients learn of a lost rank at once, even if a blocked step must end the process
                mlxdist.on_failure(lambda error: door.fail(f"the world failed: {error}"), group)
            address, token = door.link_address, door.token
        link = LinkClient(address, token)
    elif _LINK not in os.environ:
        _leave_stops_to_rank_0(rank)
    try:
        model, tokenizer, plan = load(options.model, group, options.mode, pp_weights=options.pp_weights,
                                      experts=options.experts)
        # mlx.lm's plan as it stands (experts mode, kinds, each rank's shares and bytes), less this rank's own.
        description = {**{k: v for k, v in plan.as_dict().items() if k not in _RANK_OWN},
                       "timing": {"initialized": initialized, **plan.seconds}}
        engine = Engine(model, group, description, link=link, max_concurrent=options.max_concurrent,
                        prefill_batch=options.prefill_batch,
                        eos_ids=sorted(tokenizer.eos_token_ids), vocab_size=int(model.args.vocab_size),
                        timeout=options.timeout, prompt_cache_bytes=options.prompt_cache_bytes)
        engine.run()
    except Exception as exc:
        message = f"rank {rank}: {type(exc).__name__}: {exc}"
        if link is not None and not isinstance(exc, DistributedError):
            try:
                link.send("failed", message=message, ranks=lost_ranks(exc, rank))
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

    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.hostfile is not None and (detect_backend() is not None or _LINK in os.environ):
        build_parser().error("--hostfile is for the supervising process, not for a rank inside a launched job")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=options.logging_level, format="%(message)s", stream=sys.stderr)
    try:
        supervising = (options.nranks or 1) > 1 or options.hostfile is not None
        launched = detect_backend() is not None or _LINK in os.environ
        if supervising and not launched:
            return _supervise(options)
        if not launched:
            check_experts(options, 1)
        return _serve_rank(options)
    except (ValueError, TypeError, NotImplementedError, OSError) as exc:
        print(f"mlxdist-serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
