"""Per-request sampling that every rank reproduces: each request carries its own PRNG key."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

__all__ = ["SeededSampler", "sampler_for", "bias_processor"]


class SeededSampler:
    """Temperature and nucleus sampling from a request's own key.

    The key is split once per call, so a request's draws depend only on its
    seed and on how many tokens it has drawn: not on the other requests in
    the batch, nor on the rank (every rank computes the same logits and
    draws the same token).

    Args:
        temperature: Positive; logits are divided by it.
        top_p: In (0, 1]; 1 keeps every token.
        seed: The request's seed.
        drawn: Tokens the request already drew (a request resumed on a new
            world): the key is advanced past their draws, so the next draw
            is the one an undisturbed run would make next.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, drawn: int = 0) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.key = mx.random.key(seed)
        for _ in range(drawn):
            self.key = mx.random.split(self.key)[0]

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Draw one token per row of ``logprobs`` (``(B, vocab)``); returns ``(B,)`` uint32."""
        keys = mx.random.split(self.key)
        self.key, draw = keys[0], keys[1]
        logits = logprobs / self.temperature
        if self.top_p < 1.0:
            probs = mx.softmax(logits, axis=-1)
            order = mx.argsort(-probs, axis=-1)
            sorted_probs = mx.take_along_axis(probs, order, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
            keep_sorted = before < self.top_p
            keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
            logits = mx.where(keep, logits, -mx.inf)
        return mx.random.categorical(logits, key=draw).astype(mx.uint32)


def sampler_for(temperature: float, top_p: float, seed: int, drawn: int = 0) -> Optional[SeededSampler]:
    """The sampler of a request: None (greedy, the batch's default) at temperature 0.

    Args:
        temperature: 0 (greedy) or positive.
        top_p: Nucleus mass in (0, 1].
        seed: The request's seed.
        drawn: Tokens already drawn before a resume (see :class:`SeededSampler`).
    """
    if temperature == 0:
        return None
    return SeededSampler(temperature, top_p, seed, drawn)


def bias_processor(logit_bias: dict[str, float], vocab_size: int) -> Callable[[mx.array, mx.array], mx.array]:
    """An mlx-lm logits processor adding OpenAI's ``logit_bias`` (token id string -> bias) to the logits."""
    bias = [0.0] * vocab_size
    for token, value in logit_bias.items():
        bias[int(token)] = float(value)
    added = mx.array(bias)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits + added.astype(logits.dtype)

    return process
