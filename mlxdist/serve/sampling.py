"""Per-request sampling that every rank reproduces: each request carries its own PRNG key.

The filters (top-p, min-p, top-k) and the penalties are mlx-lm's own
(:mod:`mlx_lm.sample_utils`), applied in mlx-lm's order; only the draw
differs: it uses the request's key instead of MLX's global random state.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx

__all__ = ["SeededSampler", "sampler_for", "processors_for"]

# A logprob reported for a token the filters removed (JSON has no -inf).
LOWEST_LOGPROB = -9999.0


class SeededSampler:
    """Temperature, nucleus, min-p and top-k sampling from a request's own key.

    The key is split once per call, so a request's draws depend only on its
    seed and on how many tokens it has drawn: not on the other requests in
    the batch, nor on the rank (every rank computes the same logits and
    draws the same token).

    Args:
        temperature: Positive; logits are divided by it after the filters.
        top_p: In (0, 1]; 1 keeps every token.
        seed: The request's seed.
        drawn: Tokens the request already drew (a request resumed on a new
            world): the key is advanced past their draws, so the next draw
            is the one an undisturbed run would make next.
        top_k: Keep the ``top_k`` most likely tokens (0: all).
        min_p: Keep tokens at least ``min_p`` times as likely as the most likely one (0: all).
    """

    def __init__(self, temperature: float, top_p: float, seed: int, drawn: int = 0, *, top_k: int = 0,
                 min_p: float = 0.0) -> None:
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        self.temperature = float(temperature)
        self.filters: list[Callable[[mx.array], mx.array]] = []
        if top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, float(top_p)))
        if min_p > 0.0:
            self.filters.append(lambda x: apply_min_p(x, float(min_p)))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, int(top_k)))
        self.key = mx.random.key(seed)
        for _ in range(drawn):
            self.key = mx.random.split(self.key)[0]

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Draw one token per row of ``logprobs`` (``(B, vocab)``); returns ``(B,)`` uint32."""
        keys = mx.random.split(self.key)
        self.key, draw = keys[0], keys[1]
        for keep in self.filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs / self.temperature, key=draw).astype(mx.uint32)


def sampler_for(request: dict[str, Any]) -> Optional[SeededSampler]:
    """The sampler of a ``submit``/``resume`` request: None (greedy, the batch's default) at temperature 0.

    Args:
        request: The link message (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, and
            ``drawn``: tokens already drawn before a resume, see :class:`SeededSampler`).

    Returns:
        The sampler, or None for greedy decoding.
    """
    if request["temperature"] == 0:
        return None
    return SeededSampler(request["temperature"], request["top_p"], request["seed"], request.get("drawn", 0),
                         top_k=request["top_k"], min_p=request["min_p"])


def processors_for(request: dict[str, Any], vocab_size: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """mlx-lm logits processors for a request's ``logit_bias`` and penalties.

    Args:
        request: The link message (``logit_bias``, ``repetition_penalty`` (0 or 1: off),
            ``presence_penalty``, ``frequency_penalty`` (0: off)).
        vocab_size: The model's vocabulary size.

    Returns:
        The processors, in mlx-lm's order (bias, repetition, presence, frequency).
    """
    from mlx_lm.sample_utils import make_logits_processors

    repetition = request["repetition_penalty"]
    return make_logits_processors(
        logit_bias={int(token): float(value) for token, value in request["logit_bias"].items()} or None,
        repetition_penalty=repetition if repetition not in (0, 1) else None,
        presence_penalty=request["presence_penalty"] or None,
        frequency_penalty=request["frequency_penalty"] or None,
    )
