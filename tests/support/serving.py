"""A running ``mlxdist-serve -n N`` (or ``--hostfile``, or N ranks started by ``mlxdist.launch``) for
the serving tests: the supervising process (or the launcher) started in its own session, its ranks found through
``/health``, and everything ended at close (ranks run in their own sessions,
stopped ones included); a stream read token by token with a fault struck
part way, and the undisturbed run's text to compare it with."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

__all__ = ["ServeProcess", "greedy_reference", "stream_text"]


class ServeProcess:
    """``python -m mlxdist.serve --model CHECKPOINT -n N --backend B --port 0 EXTRA...``
    (``n`` None: no ``-n``, e.g. with ``--hostfile`` in ``extra``); with ``launched``,
    ``python -m mlxdist.launch -n N --backend B -- python -m mlxdist.serve --model CHECKPOINT --port 0 EXTRA...``
    (rank 0 serves; ``proc`` is the launcher)."""

    def __init__(self, checkpoint: Path, backend: str, log: Path, n: Optional[int], *extra: str,
                 launched: bool = False) -> None:
        self.log = log
        count = [] if n is None else ["-n", str(n)]
        serve = [sys.executable, "-m", "mlxdist.serve", "--model", str(checkpoint)]
        if launched:
            command = [sys.executable, "-m", "mlxdist.launch", *count, "--backend", backend, "--", *serve]
        else:
            command = [*serve, *count, "--backend", backend]
        self.proc = subprocess.Popen(
            [*command, "--port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
        )
        self.url = ""
        self.pids: set[int] = set()

    def text(self) -> str:
        """What the server wrote so far (its log)."""
        return self.log.read_text()

    def wait_for(self, ranks: int, deadline: float) -> dict[str, Any]:
        """Wait until a world of ``ranks`` ranks is ready; its ``/health``.

        Raises:
            AssertionError: not ready within ``deadline`` seconds, or the server ended.
        """
        end = time.monotonic() + deadline
        while time.monotonic() < end and self.proc.poll() is None:
            match = re.search(r"serving on (http://\S+)/v1", self.text())
            if match:
                self.url = match.group(1)
                try:
                    health = httpx.get(self.url + "/health", timeout=5).json()
                except httpx.HTTPError:
                    health = {}
                if health.get("state") == "ready" and health["plan"].get("ranks") == ranks:
                    self.pids |= set(health["plan"]["pids"])
                    return health
            time.sleep(0.2)
        raise AssertionError(f"no ready world of {ranks} ranks:\n{self.text()[-4000:]}")

    def health(self) -> dict[str, Any]:
        """The server's ``/health``."""
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_state(self, state: str, deadline: float = 30.0) -> dict[str, Any]:
        """Wait until ``/health`` says ``state``; that ``/health``.

        Raises:
            AssertionError: not within ``deadline`` seconds.
        """
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            health = self.health()
            if health["state"] == state:
                return health
            time.sleep(0.05)
        raise AssertionError(f"never {state}: {self.health()}\n{self.text()[-3000:]}")

    def close(self) -> None:
        """End the supervisor or launcher (SIGTERM, then SIGKILL of its session) and every rank it ran."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in self.pids:  # ranks run in their own sessions
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def greedy_reference(checkpoint: Path, prompt: str, longest: int, at_least: int) -> Callable[[int], str]:
    """``reference(max_tokens)``: the undisturbed greedy run of ``prompt`` in one process (mlxdist.lm),
    as text, for up to ``longest`` tokens; the first ``at_least`` must not end the sequence."""
    from mlx_lm.utils import load_model, load_tokenizer

    from mlxdist.lm.generation import generate_tokens
    from mlxdist.serve.text import TextAssembler

    model, config = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint, eos_token_ids=config.get("eos_token_id"))
    tokens = generate_tokens(model, tokenizer.encode(prompt), longest, stop_tokens=tokenizer.eos_token_ids).tokens
    eos = set(tokenizer.eos_token_ids)
    assert len(tokens) >= at_least and not set(tokens[:at_least]) & eos, "pick another prompt"

    def text(max_tokens: int) -> str:
        # Detokenized as a stream is (mlx-lm's streaming detokenizer can differ from one decode of
        # byte tokens); an end-of-sequence token adds no text.
        assembler, *body, last = TextAssembler(tokenizer, [], eos), *tokens[:max_tokens]
        pieces = [assembler.add(t, None)[0] for t in body]
        return "".join(pieces) + assembler.add(last, "stop" if last in eos else "length")[0]

    return text


def stream_text(server: ServeProcess, body: dict[str, Any], strike: Optional[Callable[[], None]] = None,
                strike_at: int = 1) -> str:
    """Stream ``/v1/completions`` with ``body``; call ``strike()`` once ``strike_at`` tokens arrived
    (0: once it opened); the text."""
    pieces: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json={"stream": True, **body}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        if strike is not None and strike_at == 0:
            strike()
            strike = None
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                assert not line.startswith("event: error"), line
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            if strike is not None and len(pieces) == strike_at:
                strike()
                strike = None
    return "".join(pieces)


# A checkpoint whose answer to any chat is a thought and a tool call, in mlx-lm's json_tools format.
TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
THOUGHT = "ab"
TOOL_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", json.dumps(TOOL_CALL, separators=(",", ":")))
TOOL_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for call in m.get('tool_calls') or [] %}{% set tool_call = call.function %}"
    "<tool_call>{\"name\":\"{{ tool_call.name }}\",\"arguments\":{{ tool_call.arguments | tojson }}}</tool_call>"
    "{% endfor %}</s>\n{% endfor %}"
    "{% if tools %}<s>tools\n{% for t in tools %}{{ t.function.name }}\n{% endfor %}</s>\n{% endif %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def write_tool_checkpoint(path: Path, **dims: int) -> Path:
    """A float32 llama checkpoint that answers every chat with ``<think>ab</think><tool_call>{TOOL_CALL}
    </tool_call></s>``, greedily, on any number of ranks.

    How: every layer's output projections (attention's ``o_proj``, the MLP's
    ``down_proj``) are zero, so the residual stream is the last token's
    embedding and the model is a bigram table; then ``lm_head``'s row of each
    next token of that chain is its predecessor's embedding direction (scale
    2), a logit of ``2 * sqrt(hidden)`` (~23 at 128) against the random rows'
    few units. The chat template's generation prompt ends with a newline,
    the chain's first token. The template renders tools and assistant tool
    calls (``tool_call.name``, so mlx-lm picks its json_tools parser).
    """
    import mlx.core as mx

    from mlxdist.lm.testing import write_checkpoint, write_tokenizer

    path = write_checkpoint(path, family="llama", dtype="float32", **dims)
    vocab = dims["vocab_size"]
    write_tokenizer(path, vocab, added_tokens=TOOL_TOKENS)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config_file.write_text(json.dumps(config))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    (newline,) = tokenizer.encode("\n", add_special_tokens=False).ids
    (thought,) = tokenizer.encode(THOUGHT, add_special_tokens=False).ids
    ids = {token: tokenizer.token_to_id(token) for token in TOOL_TOKENS}
    chain = [newline, ids["<think>"], thought, ids["</think>"], ids["<tool_call>"], ids[TOOL_TOKENS[-1]],
             ids["</tool_call>"], 2]
    weights = mx.load(str(path / "model.safetensors"))
    for name in list(weights):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros_like(weights[name])
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    for before, after in zip(chain, chain[1:]):
        direction = embed[before] / mx.linalg.norm(embed[before])
        head[after] = 2.0 * direction
    weights["lm_head.weight"] = head
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path
