"""Tokens <-> text on the front door: prompts (with the chat template) and streamed output with stop strings."""

from __future__ import annotations

from typing import Any, Optional

from mlxdist.serve.requests import ApiError

__all__ = ["chat_prompt", "text_prompt", "TextAssembler"]


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` through the checkpoint's chat template.

    A checkpoint without one gets ``role: content`` lines and ``assistant:``.

    Raises:
        ApiError: 400 when the template rejects the messages (e.g. role order).
    """
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        except Exception as exc:  # the template's own checks (jinja2 raises its own types)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", "invalid_value",
                           "messages") from None
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text))


def text_prompt(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A completion prompt's token ids (text is tokenized; ids are checked against the vocabulary).

    Raises:
        ApiError: 400 for ids beyond the vocabulary or text that tokenizes to nothing.
    """
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
        if not ids:
            raise ApiError(400, "'prompt' tokenizes to no tokens", "invalid_value", "prompt")
        return ids
    if any(t >= vocab_size for t in prompt):
        raise ApiError(400, f"'prompt' token ids must be below the vocabulary size {vocab_size}",
                       "invalid_value", "prompt")
    return prompt


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

    def __init__(self, tokenizer: Any, stops: list[str], eos_ids: set[int]) -> None:
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
