"""Benchmark: serving a TP-sharded model, ``mlxdist-serve`` beside ``mlx_lm.server``, same checkpoint, same run.

Both serve one random-weight Llama checkpoint (``mlxdist.lm.testing``, the
sizes of ``bench_lm.py``; 4-bit with float32 scales by default, where TP
decode beats one process on a 2-core machine) with tensor parallelism over 2
local ranks on one backend:

- ``mlx_lm.server`` under ``mlx.launch`` (rank 0 serves HTTP);
- ``python -m mlxdist.serve --model DIR -n 2 --backend B`` (it starts its ranks).

Only one server is up at a time. Each round starts a server, sends one
untimed warm-up request, then for each concurrency ``C`` runs ``C`` client
streams that each send ``--per-stream`` streamed ``/v1/completions`` requests
back to back (``--tokens`` greedy tokens each, ``temperature`` 0; every request
of the run has its own prompt, so no prompt cache helps either side), and
stops the server. Rounds alternate the order of the servers (A B B A ...), so
load on a shared machine that drifts falls on both alike.

Per request: time to first token (first streamed chunk), decode tokens/s after
it ((tokens - 1) / (last chunk - first chunk)) and latency (request to
``[DONE]``); per concurrency and round: aggregate tokens/s (completion tokens of
all requests / wall time from the first request to the last answer), p50/p99
latency. Reported: the median over rounds of each, and mlxdist's ratio to
mlx-lm as the median of the round-by-round ratio. Token counts come from the
``usage`` chunk (``stream_options.include_usage``) and both servers' texts
are compared request by request (greedy decoding: they should be equal).

Run ``python benchmarks/bench_serve.py --markdown`` (``--backends ring mpi``,
``--concurrency 1 4 16``, ``--rounds 3``, ``--json FILE``; ``--quick`` is a tiny
model and one short round, for a smoke test).

``--load chat`` is a multi-turn chat load instead, where both servers' prompt
caches matter (mlx_lm.server's is on by default): per concurrency ``C``, ``C``
users each hold one conversation of ``--turns`` streamed
``/v1/chat/completions`` turns, all sharing one system prompt
(``--system-words``), each turn adding a user message (``--user-words``) and
the previous answer to the history. Reported per level: time to first token of
the first turn and, the target, of the turns from the 4th on (medians), the
aggregate tokens/s over the level, and the share of prompt tokens the server
reported as cached (``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import FORMATS, SIZES  # noqa: E402

from mlxdist.bench.serving import (  # noqa: E402
    CHAT_KEYS,
    COMPLETION_KEYS,
    LATE_TURN,
    OURS,
    THEIRS,
    Request,
    Turn,
    compare,
    prompt_text,
    summarise,
    summarise_chat,
    words,
)

TINY = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab_size=512)
DECODE_CONCURRENCY = 32  # mlx_lm.server's default --decode-concurrency


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("ring", "mpi"), default=["ring"])
    parser.add_argument("--format", choices=tuple(FORMATS), default="4-bit", help="checkpoint weights")
    parser.add_argument("--size", choices=("default", "quick", "tiny"), default="default",
                        help="the checkpoint's sizes (bench_lm.py's default and quick ones, or a tiny one)")
    parser.add_argument("--servers", nargs="+", choices=(OURS, THEIRS), default=[OURS, THEIRS])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--per-stream", type=int, default=2, help="requests each client stream sends")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    parser.add_argument("--prompt-words", type=int, default=24, help="two-letter words per prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, one round, concurrency 1 and 2")
    parser.add_argument("--load", choices=("completions", "chat"), default="completions",
                        help="independent completions, or multi-turn chats sharing a system prompt")
    parser.add_argument("--turns", type=int, default=6, help="chat: turns per conversation")
    parser.add_argument("--system-words", type=int, default=200, help="chat: two-letter words of the system prompt")
    parser.add_argument("--user-words", type=int, default=24, help="chat: two-letter words per user message")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to be ready")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one request")
    parser.add_argument(
        "--serve-deadline", type=float, default=300.0,
        help="mlxdist-serve's per-operation deadline, seconds (a serve step under heavy load can take long)",
    )
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of writing one")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if args.load == "chat" and "--concurrency" not in argv:
        args.concurrency = [1, 8]
    if args.quick:
        args.rounds, args.concurrency, args.per_stream, args.tokens = 1, [1, 2], 1, 8
        args.turns, args.system_words = min(args.turns, LATE_TURN), min(args.system_words, 40)
    return args


# -- servers -----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def server_command(
    server: str, checkpoint: Path, backend: str, port: int, deadline: float
) -> tuple[list[str], dict]:
    """The command (and extra environment) that serves ``checkpoint`` on 2 ranks of ``backend``.

    ``deadline`` is mlxdist-serve's per-operation deadline (mlx_lm.server has none).
    """
    if server == OURS:
        # TP, and as many requests decoded together as mlx_lm.server's default (--decode-concurrency 32).
        command = [sys.executable, "-m", "mlxdist.serve", "--model", str(checkpoint), "-n", "2", "--mode", "tp"]
        command += ["--timeout", str(deadline)]
        return [*command, "--max-concurrent", str(DECODE_CONCURRENCY), "--backend", backend, "--host", "127.0.0.1", "--port", str(port)], {}
    launch = [_bin("mlx.launch"), "-n", "2", "--backend", backend]
    env: dict[str, str] = {}
    if backend == "mpi":
        from mlxdist._mpi import LIBNAME_VARIABLE, environment_library

        libmpi = environment_library()
        launch += ["--env", f"{LIBNAME_VARIABLE}={libmpi}"] if os.path.exists(libmpi) else []
        launch += ["--mpi-arg", "--allow-run-as-root --oversubscribe"]
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    serve = [_bin("mlx_lm.server"), "--model", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    return [*launch, "--", *serve, "--log-level", "WARNING"], env


class Server:
    """A server's process group, started in its own session and ended with it."""

    def __init__(self, name: str, command: list[str], env: dict, port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env},
        )

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/health`` until it answers 200 (and, if it says, state ready)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            try:
                answer = httpx.get(self.url + "/health", timeout=2.0)
                state = answer.json().get("state", "ready") if answer.status_code == 200 else None
                if state == "ready":
                    return
                if state == "failed":
                    raise RuntimeError(f"{self.name} failed: {answer.text}")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready within {timeout} s: {self.tail()}")

    def tail(self) -> str:
        """The end of the server's output."""
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_bytes()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                # ranks of the group may outlive the leader
                os.killpg(self.process.pid, 0)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                if self.process.poll() is not None:
                    try:
                        os.killpg(self.process.pid, 0)
                    except ProcessLookupError:
                        break
                continue
        self._log_file.close()


# -- the load generator --------------------------------------------------------------


@dataclass
class Streamed:
    """What one streamed request returned: its text pieces' arrival, the text, the last usage, an error."""

    first: Optional[float] = None
    chunks: int = 0
    text: str = ""
    usage: Optional[dict] = None
    error: Optional[str] = None


async def read_stream(client: Any, url: str, body: dict, origin: float, piece: Any) -> Streamed:
    """POST ``body`` to ``url`` as a stream; ``piece(choice)`` is a choice's new text (or None)."""
    got, text = Streamed(), []
    try:
        async with client.stream("POST", url, json=body) as answer:
            if answer.status_code != 200:
                got.error = f"HTTP {answer.status_code}: {(await answer.aread())[:300]!r}"
                return got
            async for line in answer.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    got.error = json.dumps(event["error"])[:300]
                    break
                for choice in event.get("choices") or []:
                    if piece(choice):
                        got.first = got.first if got.first is not None else time.perf_counter() - origin
                        text.append(piece(choice))
                        got.chunks += 1
                got.usage = event.get("usage") or got.usage
    except Exception as exc:  # a refused or dropped connection is a result, not a crash
        got.error = f"{type(exc).__name__}: {exc}"
    finally:
        got.text = "".join(text)
    return got


async def one_request(client: Any, url: str, body: dict, origin: float, index: int) -> Request:
    """Send one streamed completion and time its chunks."""
    start = time.perf_counter() - origin
    got = await read_stream(client, url + "/v1/completions", body, origin, lambda choice: choice.get("text"))
    end = time.perf_counter() - origin
    tokens = (got.usage or {}).get("completion_tokens")
    return Request(index, start, got.first if got.first is not None else end, end,
                   tokens if tokens is not None else got.chunks, got.text, got.error)


async def run_clients(clients: int, timeout: float, work: Any) -> tuple[list[Any], float]:
    """``clients`` coroutines ``work(client, origin, k)`` at once over one HTTP client; their
    results (lists, concatenated) and the wall time from the start to the last answer."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        origin = time.perf_counter()
        results = await asyncio.gather(*(work(client, origin, k) for k in range(clients)))
        wall = time.perf_counter() - origin
    return [r for per in results for r in per], wall


async def run_level(url: str, concurrency: int, per_stream: int, prompts: list[str], base: dict,
                    first_index: int, timeout: float) -> tuple[list[Request], float]:
    """``concurrency`` client streams, each sending ``per_stream`` requests back to back."""

    async def stream(client: Any, origin: float, slot: int) -> list[Request]:
        done = []
        for k in range(per_stream):
            index = first_index + slot * per_stream + k
            done.append(await one_request(client, url, {**base, "prompt": prompts[index]}, origin, index))
        return done

    return await run_clients(concurrency, timeout, stream)


def serve_round(server: Server, args: argparse.Namespace, prompts: list[str]) -> tuple[dict, dict]:
    """Warm up, then every concurrency level; returns per level the summary and the texts by prompt."""
    base = {"max_tokens": args.tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    warm, _ = asyncio.run(run_level(server.url, 1, 1, [prompt_text(10**6, args.prompt_words)], base, 0,
                                    args.request_timeout))
    if warm[0].error:
        raise RuntimeError(f"{server.name}: the warm-up request failed: {warm[0].error}; {server.tail()}")
    levels, texts, index = {}, {}, 0
    for concurrency in args.concurrency:
        requests, wall = asyncio.run(run_level(server.url, concurrency, args.per_stream, prompts, base, index,
                                               args.request_timeout))
        index += concurrency * args.per_stream
        levels[concurrency] = summarise(requests, wall)
        texts.update({r.prompt_index: r.text for r in requests if r.error is None})
    return levels, texts


# -- the multi-turn chat load -------------------------------------------------------------

async def chat_turn(client: Any, url: str, body: dict, origin: float, user: int, turn: int) -> Turn:
    """Send one streamed chat turn and time its chunks."""
    start = time.perf_counter() - origin
    got = await read_stream(client, url + "/v1/chat/completions", body, origin,
                            lambda choice: (choice.get("delta") or {}).get("content"))
    end = time.perf_counter() - origin
    usage = got.usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return Turn(user, turn, start, got.first if got.first is not None else end, end,
                usage.get("completion_tokens", got.chunks), usage.get("prompt_tokens", 0),
                details.get("cached_tokens") or 0, got.text, got.error)


async def run_chats(url: str, users: int, args: argparse.Namespace, seed: int) -> tuple[list[Turn], float]:
    """``users`` conversations at once, each ``args.turns`` turns back to back, sharing a system prompt."""
    base = {"max_tokens": args.tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    system = {"role": "system", "content": words((seed, 0), args.system_words)}

    async def conversation(client: Any, origin: float, user: int) -> list[Turn]:
        messages, done = [system], []
        for turn in range(args.turns):
            messages.append({"role": "user", "content": words((seed, 1 + user, turn), args.user_words)})
            result = await chat_turn(client, url, {**base, "messages": messages}, origin, user, turn)
            done.append(result)
            if result.error is not None:
                break
            messages.append({"role": "assistant", "content": result.text})
        return done

    return await run_clients(users, args.request_timeout, conversation)


def chat_round(server: Server, args: argparse.Namespace, round_index: int) -> tuple[dict, dict]:
    """Warm up, then every number of users; per level the summary, and the texts by (level, user, turn)."""
    warm = asyncio.run(chat_turn_once(server.url, args))
    if warm.error:
        raise RuntimeError(f"{server.name}: the warm-up request failed: {warm.error}; {server.tail()}")
    levels, texts = {}, {}
    for users in args.concurrency:
        turns, wall = asyncio.run(run_chats(server.url, users, args, seed=1000 * round_index + users))
        levels[users] = summarise_chat(turns, wall)
        texts.update({(users, t.user, t.turn): t.text for t in turns if t.error is None})
    return levels, texts


async def chat_turn_once(url: str, args: argparse.Namespace) -> Turn:
    """The untimed warm-up: one short chat of its own (nothing later shares its prompt)."""
    import httpx

    body = {"max_tokens": args.tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "zz " + words((10**6,), args.user_words)}]}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout)) as client:
        return await chat_turn(client, url, body, time.perf_counter(), 0, 0)


# -- the driver ----------------------------------------------------------------------


def run_backend(args: argparse.Namespace, checkpoint: Path, backend: str, logs: Path) -> dict[str, Any]:
    """All rounds of every server on one backend."""
    chat = args.load == "chat"
    total = sum(args.concurrency) * args.per_stream
    prompts = [] if chat else [prompt_text(i, args.prompt_words) for i in range(args.rounds * total)]
    per_round: dict[str, list[dict]] = {name: [] for name in args.servers}
    texts: dict[str, dict[int, str]] = {name: {} for name in args.servers}
    for round_index in range(args.rounds):
        order = args.servers if round_index % 2 == 0 else args.servers[::-1]
        for name in order:
            # Round r's prompts, the same for every server (and new to each server in this round).
            window = prompts[round_index * total : (round_index + 1) * total]
            port = free_port()
            command, env = server_command(name, checkpoint, backend, port, args.serve_deadline)
            server = Server(name, command, env, port, logs / f"{name}-{backend}-{round_index}.log")
            try:
                server.wait_ready(args.start_timeout)
                if chat:
                    levels, seen = chat_round(server, args, round_index)
                else:
                    levels, seen = serve_round(server, args, window)
            finally:
                server.stop()
            if "Address already in use" in server.tail():
                # Two ranks that both think they are rank 0: a group of size 1 on each.
                raise RuntimeError(f"{name} did not form a 2-rank group: {server.tail()}")
            per_round[name].append(levels)
            texts[name].update({(round_index, k): v for k, v in seen.items()})
            print(json.dumps({"backend": backend, "round": round_index, "server": name, "levels": levels}),
                  flush=True)
    same = None
    if len(args.servers) == 2:
        common = set(texts[OURS]) & set(texts[THEIRS])
        same = {"compared": len(common), "equal": sum(texts[OURS][k] == texts[THEIRS][k] for k in common)}
    return {
        "backend": backend,
        "rows": compare(per_round, args.concurrency, CHAT_KEYS if chat else COMPLETION_KEYS),
        "rounds": per_round,
        "same_text": same,
        "load_average": os.getloadavg()[0],
    }


def _rows(results: list[dict], args: argparse.Namespace, server_cells: Any, ratio_cells: Any) -> list[str]:
    """A table's body: per backend and load level, one row per server, then mlxdist's ratio row."""
    lines = []
    for result in results:
        for row in result["rows"]:
            lead = f"| {result['backend']} | {row['concurrency']} "
            lines += [f"{lead}| {name} | {' | '.join(server_cells(row[name]))} |" for name in args.servers]
            if "ratio" in row:
                lines.append(f"{lead}| **mlxdist ÷ mlx-lm** | {' | '.join(ratio_cells(row))} |")
    return lines


def _footer(results: list[dict], args: argparse.Namespace, method: str, same_text: bool = False) -> str:
    """The line under a table: the method, errors per backend (and whether the texts agreed), load."""
    errors = ", ".join(f"{r['backend']} {sum(row[n]['errors'] for row in r['rows'] for n in args.servers)}"
                       for r in results)
    same = "; same text: " + ", ".join(f"{r['backend']} {r['same_text']}" for r in results) if same_text else ""
    load = ", ".join(f"{r['load_average']:.1f}" for r in results)
    return f"{method} Errors: {errors}{same}; load average: {load}."


def chat_markdown(results: list[dict], args: argparse.Namespace) -> str:
    """The chat load's table: per backend and users, each server's medians (ranges) and mlxdist's ratio."""

    def cell(m: dict, key: str, form: str) -> str:
        low, high = m["range"][key] if "range" in m else m["ratio_range"][key]
        return f"{m[key]:{form}} ({low:{form}}-{high:{form}})"

    def server_cells(m: dict) -> list[str]:
        return [cell(m, "ttft_first_s", ".2f"), cell(m, "ttft_s", ".2f"), cell(m, "aggregate_tps", ".1f"),
                f"{m['cached_share']:.2f}"]

    def ratio_cells(row: dict) -> list[str]:
        r = {**row["ratio"], "ratio_range": row["ratio_range"]}
        return [f"{cell(r, 'ttft_first_s', '.2f')}×", f"{cell(r, 'ttft_s', '.2f')}×",
                f"{cell(r, 'aggregate_tps', '.2f')}×", ""]

    lines = [
        f"| backend | users | server | TTFT turn 1 (s) | TTFT turns >= {LATE_TURN} (s) | aggregate tok/s "
        "| cached share of prompts (turns >= 2) |",
        "|---|---|---|---|---|---|---|",
        *_rows(results, args, server_cells, ratio_cells),
        "",
        _footer(results, args,
                f"2 ranks, TP; {args.rounds} rounds (server order alternating); per level, each user one "
                f"conversation of {args.turns} turns of {args.tokens} greedy tokens, a shared system prompt of "
                f"{args.system_words} and user messages of {args.user_words} two-letter words; medians over "
                "rounds (range), ratios the median of the round-by-round ratio (range).", same_text=True),
    ]
    return "\n".join(lines)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    """The README table: per backend and concurrency, each server's medians and mlxdist's ratio."""

    def server_cells(m: dict) -> list[str]:
        return [f"{m['ttft_s']:.2f}", f"{m['decode_tps']:.1f}", f"{m['aggregate_tps']:.1f}",
                f"{m['latency_p50_s']:.2f} / {m['latency_p99_s']:.2f}"]

    def ratio_cells(row: dict) -> list[str]:
        r = row["ratio"]
        return [f"{r['ttft_s']:.2f}×", f"{r['decode_tps']:.2f}×", f"{r['aggregate_tps']:.2f}×",
                f"{r['latency_p50_s']:.2f}× / {r['latency_p99_s']:.2f}×"]

    lines = [
        "| backend | concurrency | server | TTFT (s) | decode tok/s per stream | aggregate tok/s "
        "| latency p50 / p99 (s) |",
        "|---|---|---|---|---|---|---|",
        *_rows(results, args, server_cells, ratio_cells),
        "",
        _footer(results, args,
                f"2 ranks, TP; {args.rounds} rounds (server order alternating), each concurrency C: C streams x "
                f"{args.per_stream} requests of {args.tokens} greedy tokens; medians over rounds, ratios the "
                "median of the round-by-round ratio."),
    ]
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mlxdist.lm.testing import add_chat_template, write_checkpoint

    # SIGTERM ends the run through the finally blocks, which stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dims = TINY if args.quick or args.size == "tiny" else SIZES[args.size]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else write_checkpoint(
            Path(tmp) / "model", "llama", seed=0, **FORMATS[args.format], **dims
        )
        if args.load == "chat" and not args.checkpoint:
            add_chat_template(checkpoint)
        for backend in args.backends:
            results.append(run_backend(args, checkpoint, backend, Path(tmp)))
    document = {"model": dims, "size": args.size, "format": args.format, "tokens": args.tokens,
                "per_stream": args.per_stream,
                "prompt_words": args.prompt_words, "load": args.load, "turns": args.turns,
                "system_words": args.system_words, "user_words": args.user_words, "uptime": _uptime(),
                "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    if args.markdown:
        print(chat_markdown(results, args) if args.load == "chat" else markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
