"""Tokens <-> text on the front door: prompts (with the chat template) and streamed output with stop strings."""

from __future__ import annotations

import json
import secrets
from typing import Any, Optional, Sequence

from mlxdist.serve.api_error import ApiError
from mlxdist.serve.validation import CompletionRequest

__all__ = ["chat_prompt", "text_prompt", "TextAssembler", "ChatSplitter", "starts_in_reasoning"]


def _rejected(param: str, exc: Exception) -> ApiError:
    return ApiError(400, f"the tokenizer rejected the {param}: {type(exc).__name__}: {exc}", "invalid_value", param)


def chat_prompt(tokenizer: Any, request: CompletionRequest) -> list[int]:
    """The token ids of a chat request's messages (and tools) through the checkpoint's chat template.

    A checkpoint without one gets ``role: content`` lines and ``assistant:``
    (and refuses tools). Runs off the event loop (it can take a while).

    Raises:
        ApiError: 400 when the template rejects the messages (e.g. role order) or the tokenizer the text.
    """
    if getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "has_chat_template", False):
        extra: dict[str, Any] = dict(request.template_kwargs)
        if request.tools:
            extra["tools"] = request.tools
        try:
            return list(tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                                      tokenize=True, **extra))
        except UnicodeError as exc:
            raise _rejected("messages", exc) from None
        except Exception as exc:  # the template's own checks (jinja2 raises its own types)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", "invalid_value",
                           "messages") from None
    if request.tools:
        raise ApiError(400, "this model has no chat template to offer tools through", "invalid_value", "tools")
    text = "".join(f"{m['role']}: {m['content']}\n" for m in request.messages) + "assistant:"
    try:
        return list(tokenizer.encode(text))
    except Exception as exc:  # the tokenizer's own errors (e.g. a lone surrogate)
        raise _rejected("messages", exc) from None


def text_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """A completion prompt's token ids (text is tokenized; ids were checked against the vocabulary).

    Raises:
        ApiError: 400 for text the tokenizer rejects or that tokenizes to nothing.
    """
    if not isinstance(prompt, str):
        return prompt
    try:
        ids = list(tokenizer.encode(prompt))
    except Exception as exc:  # the tokenizer's own errors (e.g. a lone surrogate)
        raise _rejected("prompt", exc) from None
    if not ids:
        raise ApiError(400, "'prompt' tokenizes to no tokens", "invalid_value", "prompt")
    return ids


class TextAssembler:
    """A request's output text, piece by piece, cut at the first stop string.

    End-of-sequence tokens count as generated but add no text. While stop
    strings are set, the last ``len(longest stop) - 1`` characters are held
    back until they cannot start a stop string.

    Args:
        tokenizer: mlx-lm's tokenizer wrapper (its streaming detokenizer).
        stops: Stop strings.
        eos_ids: Token ids that end generation.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], eos_ids: set[int]) -> None:
        self.detokenizer = tokenizer.detokenizer
        self.stops = stops
        self.eos_ids = eos_ids
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.tokens = 0
        self.stopped = False

    def add(self, token: int, finish: Optional[str]) -> tuple[str, Optional[str]]:
        """Take one generated token.

        Returns:
            ``(new text, finish reason)``: the reason is ``"stop"`` at a stop
            string or an end-of-sequence token, ``"length"`` at the limit, or None.
        """
        self.tokens += 1
        if not (finish == "stop" and token in self.eos_ids):
            self.detokenizer.add_token(token)
        if finish is not None:
            self.detokenizer.finalize()
        text = self.detokenizer.text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, finish, self.stopped = text[:cut], "stop", True
        end = len(text) if finish is not None else max(self.sent, len(text) - self.holdback)
        piece, self.sent = text[self.sent : end], max(self.sent, end)
        return piece, finish


def starts_in_reasoning(tokenizer: Any, prompt: list[int]) -> bool:
    """Whether a thinking model's answer to ``prompt`` begins inside its reasoning (the template opened it).

    Args:
        tokenizer: mlx-lm's tokenizer wrapper.
        prompt: The prompt's token ids.

    Returns:
        True when the prompt's last think-start marker comes after its last think-end marker.
    """
    if not getattr(tokenizer, "has_thinking", False):
        return False
    return tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)


class ChatSplitter:
    """A chat answer's text split into content, reasoning and tool calls, as it streams.

    The markers are the tokenizer's (mlx-lm infers them from the checkpoint):
    text between the think markers is reasoning, text between the tool-call
    markers is one tool call, parsed with mlx-lm's parser for the model's
    format. Text that may be the start of a marker is held back until it is not.

    Args:
        tokenizer: mlx-lm's tokenizer wrapper (``think_start``/``think_end``,
            ``tool_call_start``/``tool_call_end``, ``tool_parser``).
        tools: The request's tools (given to the parser), or None: tool-call
            markers are then plain text.
        reasoning: Start inside the reasoning (see :func:`starts_in_reasoning`).
    """

    def __init__(self, tokenizer: Any, tools: Optional[list[dict[str, Any]]], reasoning: bool = False) -> None:
        self.think = (tokenizer.think_start, tokenizer.think_end) if getattr(tokenizer, "has_thinking", False) else None
        self.tool = None
        if tools and getattr(tokenizer, "has_tool_calling", False):
            self.tool = (tokenizer.tool_call_start, tokenizer.tool_call_end)
        self.parser = getattr(tokenizer, "tool_parser", None)
        self.tools = tools
        self.state = "reasoning" if reasoning and self.think else "content"
        self.buffer = ""
        self.calls = 0

    def _opening(self) -> dict[str, str]:
        markers = {}
        if self.think:
            markers[self.think[0]] = "reasoning"
        if self.tool:
            markers[self.tool[0]] = "tool"
        return markers

    def _held(self, markers: Sequence[str]) -> int:
        """How many trailing characters of the buffer may begin one of ``markers``."""
        longest = 0
        for marker in markers:
            for size in range(min(len(marker) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(marker[:size]):
                    longest = max(longest, size)
                    break
        return longest

    def _call(self, text: str) -> list[dict[str, Any]]:
        try:
            parsed = self.parser(text, self.tools)
        except (ValueError, KeyError, TypeError):
            return []
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            arguments = call.get("arguments", {})
            calls.append({"index": self.calls, "id": f"call_{secrets.token_hex(12)}", "type": "function",
                          "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})
            self.calls += 1
        return calls

    def add(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        """Take the next piece of text.

        Args:
            text: The new text.
            final: No more text follows (flush what was held back).

        Returns:
            ``(kind, value)`` pieces in order: ``("content", str)``,
            ``("reasoning", str)`` or ``("tool_call", call)``, ``call`` in
            OpenAI's shape (with its ``index``).
        """
        self.buffer += text
        out: list[tuple[str, Any]] = []
        while self.buffer:
            if self.state in ("content", "reasoning"):
                markers = self._opening() if self.state == "content" else {self.think[1]: "content"}
                found = [(self.buffer.find(m), m) for m in markers if m in self.buffer]
                if found:
                    at, marker = min(found)
                    if at:
                        out.append((self.state, self.buffer[:at]))
                    self.buffer, self.state = self.buffer[at + len(marker):], markers[marker]
                    continue
                keep = 0 if final else self._held(list(markers))
                if len(self.buffer) > keep:
                    out.append((self.state, self.buffer[: len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            at = self.buffer.find(self.tool[1])
            if at < 0:
                if final:  # an unterminated call is text
                    out.append(("content", self.tool[0] + self.buffer))
                    self.buffer = ""
                break
            calls = self._call(self.buffer[:at])
            out.extend(("tool_call", call) for call in calls)
            if not calls:
                out.append(("content", self.tool[0] + self.buffer[: at + len(self.tool[1])]))
            self.buffer, self.state = self.buffer[at + len(self.tool[1]):], "content"
        return [(kind, value) for kind, value in out if value != ""]
