"""One request's answer in OpenAI's shapes: text, reasoning, tool calls, logprobs and usage, per choice."""

from __future__ import annotations

from typing import Any, Optional

from mlxdist.serve.broker import Pending
from mlxdist.serve.text import ChatSplitter, TextAssembler, starts_in_reasoning
from mlxdist.serve.validation import CompletionRequest, Sampling

__all__ = ["Answer", "logprobs_field", "usage", "message", "delta"]


class Answer:
    """One choice of a request as it is generated: text (cut at stop strings), its split into content,
    reasoning and tool calls (chat), and the tokens' logprobs.

    Args:
        tokenizer: mlx-lm's tokenizer wrapper.
        eos_ids: End-of-sequence ids (they add no text and no logprobs entry).
        request: The checked request.
        sampling: Its sampling (stop strings, logprobs).
        prompt: Its prompt's token ids (a thinking model may start inside its reasoning).
    """

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], request: CompletionRequest, sampling: Sampling,
                 prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.chat = request.chat
        self.eos_ids = eos_ids
        self.assembler = TextAssembler(tokenizer, sampling.stop, set(eos_ids))
        self.splitter = ChatSplitter(tokenizer, request.tools,
                                     starts_in_reasoning(tokenizer, prompt)) if request.chat else None
        self.logprobs = sampling.logprobs
        self.tool_calls = 0

    def add(self, event: Any) -> tuple[list[tuple[str, Any]], Optional[dict[str, Any]], Optional[str]]:
        """One token event (:class:`~mlxdist.serve.broker.Event`) of this choice.

        Returns:
            ``(pieces, logprobs entry or None, finish reason or None)``; pieces as
            :meth:`~mlxdist.serve.text.ChatSplitter.add` gives them; the finish reason
            ``"tool_calls"`` once a tool call was made.
        """
        piece, finish = self.assembler.add(event.token, event.finish)
        if self.splitter is not None:
            pieces = self.splitter.add(piece, final=finish is not None)
        else:
            pieces = [("content", piece)] if piece else []
        self.tool_calls += sum(1 for kind, _ in pieces if kind == "tool_call")
        if finish == "stop" and self.tool_calls:
            finish = "tool_calls"
        entry = None
        if self.logprobs >= 0 and event.logprob is not None and event.token not in self.eos_ids:
            entry = self._entry(event.token, event.logprob, event.top or [])
        return pieces, entry, finish

    def _entry(self, token: int, logprob: float, top: list[list[float]]) -> dict[str, Any]:
        def text(t: int) -> str:
            return self.tokenizer.decode([int(t)])

        if self.chat:
            return {"token": text(token), "logprob": logprob, "bytes": list(text(token).encode()),
                    "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                     for t, lp in top]}
        return {"token": text(token), "logprob": logprob, "top": {text(t): lp for t, lp in top}}


def logprobs_field(chat: bool, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of a choice from per-token entries (chat or completions shape)."""
    if chat:
        return {"content": entries}
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries], "text_offset": offsets}


def usage(pendings: list[Pending], answers: list[Answer]) -> dict[str, Any]:
    """OpenAI's ``usage`` of a request's choices (the prompt counted once).

    Args:
        pendings: The request's engine requests, one per choice.
        answers: Their answers, in the same order.

    Returns:
        ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and
        ``prompt_tokens_details.cached_tokens``: the prompt tokens every choice
        took from the prompt cache (each choice looks the cache up on its own;
        they normally agree, and the smallest is reported).
    """
    prompt, tokens = pendings[0].prompt_tokens, sum(answer.assembler.tokens for answer in answers)
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens,
            "prompt_tokens_details": {"cached_tokens": min(pending.cached_tokens for pending in pendings)}}


def message(pieces: list[tuple[str, Any]]) -> dict[str, Any]:
    """A chat choice's ``message`` from all its pieces (content, ``reasoning_content``, ``tool_calls``)."""
    content = "".join(v for k, v in pieces if k == "content")
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    reasoning = "".join(v for k, v in pieces if k == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [{key: v[key] for key in ("id", "type", "function")} for k, v in pieces if k == "tool_call"]
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def delta(kind: str, value: Any) -> dict[str, Any]:
    """A streamed chat chunk's ``delta`` for one piece."""
    if kind == "tool_call":
        return {"tool_calls": [value]}
    return {"reasoning_content" if kind == "reasoning" else "content": value}
