"""Decoding with a (sharded) mlx-lm model, timed; safe to follow with other collectives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import InvalidArgumentError

__all__ = ["Generation", "generate_tokens", "logits"]

Sampler = Callable[[mx.array], mx.array]


@dataclass
class Generation:
    """What :func:`generate_tokens` produced.

    Attributes:
        tokens: The generated token ids.
        prompt_tokens: Tokens in the prompt.
        prompt_seconds: Time to the first generated token (prefill).
        decode_seconds: Time for the remaining tokens.
    """

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second (prefill)."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Generated tokens per second after the first."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    max_tokens: int,
    *,
    sampler: Optional[Sampler] = None,
    stop_tokens: Iterable[int] = (),
    prefill_step_size: int = 2048,
) -> Generation:
    """Generate up to ``max_tokens`` tokens (greedy unless ``sampler`` is given).

    Every rank of a sharded model must make the same call. When it returns,
    the generation stream is idle, so other collectives may follow (mlx-lm
    starts one decode step past the last token and does not wait for it).

    Args:
        model: An mlx-lm model, sharded or not.
        prompt: The prompt's token ids (at least one).
        max_tokens: Tokens to generate (>= 1).
        sampler: An mlx-lm sampler (``mlx_lm.sample_utils.make_sampler``);
            None is greedy.
        stop_tokens: Ids that end generation early (included in the result).
        prefill_step_size: The prompt is processed in chunks of this many
            tokens (mlx-lm's ``prefill_step_size``; a long prompt's peak memory).

    Returns:
        The tokens and timings.

    Raises:
        InvalidArgumentError: empty prompt, ``max_tokens < 1`` or ``prefill_step_size < 1``.
    """
    from mlx_lm.generate import generate_step, generation_stream

    if len(prompt) == 0:
        raise InvalidArgumentError("the prompt must hold at least one token")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if isinstance(prefill_step_size, bool) or not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise InvalidArgumentError(f"prefill_step_size must be a positive int, got {prefill_step_size!r}")
    stops = set(stop_tokens)
    result = Generation(prompt_tokens=len(prompt))
    start = time.perf_counter()
    first = start
    try:
        steps = generate_step(
            mx.array(list(prompt), dtype=mx.uint32), model, max_tokens=max_tokens, sampler=sampler,
            prefill_step_size=prefill_step_size,
        )
        for token, _ in steps:
            if not result.tokens:
                first = time.perf_counter()
            result.tokens.append(int(token))
            if token in stops or len(result.tokens) == max_tokens:
                break
    finally:
        mx.synchronize(generation_stream)
    end = time.perf_counter()
    result.prompt_seconds = first - start
    result.decode_seconds = end - first
    return result


def logits(model: nn.Module, tokens: Sequence[int]) -> mx.array:
    """Teacher-forced logits: the model's output at every position of ``tokens``.

    Args:
        model: An mlx-lm model, sharded or not (every rank makes the call).
        tokens: Token ids.

    Returns:
        ``(len(tokens), vocab)`` float32 logits, evaluated.
    """
    out = model(mx.array(list(tokens), dtype=mx.uint32)[None])[0].astype(mx.float32)
    mx.eval(out)
    return out
