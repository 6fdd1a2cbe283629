"""The front door as a running thing: the link listener, the broker, the app and uvicorn, together.

It runs either on the main thread of the process that supervises the ranks
(that process handles SIGINT/SIGTERM) or on a thread of rank 0 inside a
launched job. Either way the engine reaches it over the same link: on
loopback, or (ranks on other hosts) on an address those hosts reach.

On the main thread, SIGTERM (or SIGINT) drains: new requests get 503, the
running ones may finish for up to ``--drain-timeout`` seconds, then the
streams still open end with an error event and ``[DONE]``, and the server
stops (a second signal stops it at once). On rank 0's thread, rank 0's own
SIGTERM handler starts the same drain (:mod:`mlxdist.serve.cli`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import socket
import threading
import signal
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional

import uvicorn

from mlxdist.serve.broker import Broker
from mlxdist.serve.endpoints import ServeConfig, build_app
from mlxdist.serve.options import ServeOptions

__all__ = ["FrontDoor", "load_config"]

logger = logging.getLogger("mlxdist.serve")


def load_config(options: ServeOptions) -> ServeConfig:
    """Read what the front door needs from the checkpoint directory ``options.model`` (tokenizer and
    config.json only).

    Args:
        options: The server's options.

    Returns:
        The endpoints' configuration.

    Raises:
        InvalidArgumentError: not a checkpoint directory.
    """
    from mlx_lm.utils import load_tokenizer

    from mlxdist.errors import InvalidArgumentError

    model_dir = options.model
    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidArgumentError(f"{model_dir!r} is not an mlx-lm checkpoint directory (no config.json in it)")
    config = json.loads(config_file.read_text())
    text_config = config.get("text_config", config)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    context = int(text_config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 4096))
    names = (path.resolve().name, str(model_dir), str(path.resolve()))
    return ServeConfig(
        model_names=names,
        tokenizer=tokenizer,
        context=context,
        vocab_size=int(text_config["vocab_size"]),
        eos_ids=frozenset(int(e) for e in tokenizer.eos_token_ids),
        options=options,
    )


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, except that SIGINT/SIGTERM first drains (see the module docstring) and then it
    returns instead of re-raising the signal, so the supervisor can still end its ranks."""

    def __init__(self, config: uvicorn.Config, broker: Broker, drain_timeout: float) -> None:
        super().__init__(config)
        self.broker = broker
        self.drain_timeout = drain_timeout
        self.draining: Optional[asyncio.Task] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining is not None or self.loop is None or self.loop.is_closed():
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        logger.warning("mlxdist-serve: %s: draining (up to %g s)", signal.Signals(sig).name, self.drain_timeout)
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        async def drain() -> None:
            await self.broker.drain(self.drain_timeout)
            await asyncio.sleep(0.2)  # the streams just ended write their last events
            self.should_exit = True

        self.draining = asyncio.ensure_future(drain())

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class FrontDoor:
    """HTTP server plus engine link. Both sockets are bound at once; serving starts with :meth:`run`.

    Args:
        options: The server's options (``host``, ``port`` (0: any free one; see
            :attr:`port` once started), ``max_inflight``, ``stall``, ``drain_timeout``, ``log_level``).
        link_host: Address the engine link listens on (any free port); the
            engine presents the job token, so another address than loopback is
            for rank 0 on another host.

    Raises:
        OSError: an address cannot be bound.
    """

    def __init__(self, options: ServeOptions, *, link_host: str = "127.0.0.1") -> None:
        self.options = options
        self.token = secrets.token_hex(16)
        self.link_socket = socket.create_server((link_host, 0))
        self.link_address = f"{link_host}:{self.link_socket.getsockname()[1]}"
        self.http_socket = socket.create_server((options.host, options.port))
        self.port = self.http_socket.getsockname()[1]
        self.host = options.host
        # asyncio objects bind to the loop that first uses them (Python >= 3.10): uvicorn's.
        self.broker = Broker(self.token, options)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.started = threading.Event()
        self.server: Optional[_Uvicorn] = None
        self._exit = False
        self._thread: Optional[threading.Thread] = None

    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        await self.broker.start(self.link_socket)
        self.started.set()
        try:
            yield
        finally:
            await self.broker.shutdown()
            app.state.tokenizing.shutdown(wait=False)

    def run(self, config: ServeConfig) -> None:
        """Serve on this thread until :meth:`stop` (or SIGINT/SIGTERM on the main thread).

        Args:
            config: The app's configuration.
        """
        app = build_app(self.broker, config)
        app.router.lifespan_context = self._lifespan
        self.server = _Uvicorn(uvicorn.Config(app, log_level=self.options.log_level, lifespan="on",
                                              access_log=False, timeout_graceful_shutdown=3),
                               self.broker, self.options.drain_timeout)
        self.server.should_exit = self._exit
        self.server.run(sockets=[self.http_socket])

    def start_thread(self, config: ServeConfig) -> None:
        """Serve on a daemon thread; returns once the link accepts the engine."""
        self._thread = threading.Thread(target=self.run, args=(config,), name="mlxdist-serve-http", daemon=True)
        self._thread.start()
        self.started.wait(30)

    def call(self, function: Any, *args: Any) -> None:
        """Run ``function(*args)`` on the front door's event loop (from any thread; at once before it runs)."""
        if self.loop is None:
            function(*args)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(function, *args)

    def fail(self, reason: str, ranks: Optional[list[int]] = None) -> None:
        """Declare the job ended (thread-safe): every request in flight gets the error."""
        self.call(functools.partial(self.broker.fail, reason, ranks, source="job"))

    def stop(self) -> None:
        """Ask uvicorn to finish (thread-safe; before it starts, it will not)."""
        self._exit = True
        if self.server is not None:
            self.server.should_exit = True

    def wait_answered(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until every response in progress has its last event or body,
        and a moment more for the server to send it, so that a process about to exit cuts no answer short."""
        deadline = time.monotonic() + timeout
        while self.broker.answering and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def join(self, timeout: float) -> None:
        """Wait for the serving thread (started with :meth:`start_thread`)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def failure(self) -> tuple[Optional[str], list[int]]:
        """``(reason, ranks)`` when the world failed, else ``(None, [])``."""
        broker = self.broker
        if broker.state != "failed":
            return None, []
        return broker.reason, list(broker.failed_ranks)
