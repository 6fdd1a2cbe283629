"""Vocabulary-parallel embedding and head: each rank holds a contiguous block of vocabulary rows.

The embedding looks up the ids that fall in its rows (zeros elsewhere) and
all-sums the result, so every rank gets the whole embedding; the head (or a
tied embedding used as the head) computes its block of logits and the blocks
are all-gathered, padded to the largest block, so every rank gets the whole
logits and mlx-lm's samplers work unchanged. Gathering the logits costs one
all-gather of ``vocab`` values per token: cheaper to program against than a
shard-wise argmax and exact, since each logit is computed whole on one rank.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxdist.group import Group
from mlxdist.lm.decoder import text_model
from mlxdist.world import all_gather, all_sum

__all__ = ["VocabParallelEmbedding", "VocabParallelHead", "apply_vocab_parallel"]


def _rows(module: nn.Module, start: int, stop: int) -> nn.Module:
    """``module`` (embedding or linear, float or quantized) cut to rows ``[start, stop)``, evaluated."""
    rows = [(path, mx.contiguous(value[start:stop])) for path, value in tree_flatten(module.parameters())]
    module.update(tree_unflatten(rows))
    mx.eval(module.parameters())
    mx.clear_cache()
    return module


class _VocabBlock(nn.Module):
    """What both vocabulary-parallel modules share: the row block and the logits gather."""

    def __init__(self, inner: nn.Module, sizes: Sequence[int], group: Group) -> None:
        super().__init__()
        rank = group.rank()
        self.group = group
        self.start = sum(sizes[:rank])
        self.stop = self.start + sizes[rank]
        self.inner = _rows(inner, self.start, self.stop)
        self.padded = max(sizes)
        # Positions of the real rows among the gathered, padded blocks (underscored: not a parameter).
        self._keep = mx.array(
            [r * self.padded + i for r, size in enumerate(sizes) for i in range(size)], dtype=mx.uint32
        )

    def gather_logits(self, local: mx.array) -> mx.array:
        """Every rank's block of logits (last axis), in vocabulary order."""
        pad = self.padded - local.shape[-1]
        if pad:
            local = mx.pad(local, [(0, 0)] * (local.ndim - 1) + [(0, pad)])
        blocks = all_gather(mx.moveaxis(local, -1, 0), group=self.group)
        return mx.moveaxis(mx.take(blocks, self._keep, axis=0), 0, -1)


class VocabParallelEmbedding(_VocabBlock):
    """An embedding whose rows are split over the group; it also serves as a tied head.

    Args:
        embedding: The whole ``nn.Embedding`` or ``nn.QuantizedEmbedding``
            (lazy weights are read only for this rank's rows). It is modified.
        sizes: Rows per rank, summing to the vocabulary size.
        group: The group.
    """

    def __call__(self, ids: mx.array) -> mx.array:
        """The embeddings of ``ids`` (the same on every rank; one all-sum)."""
        local = ids.astype(mx.int32) - self.start
        inside = (local >= 0) & (local < self.stop - self.start)
        rows = self.inner(mx.where(inside, local, 0))
        return all_sum(mx.where(inside[..., None], rows, mx.zeros_like(rows)), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        """Logits of the tied head: this rank's block, gathered."""
        return self.gather_logits(self.inner.as_linear(x))


class VocabParallelHead(_VocabBlock):
    """An output projection (``lm_head``) whose vocabulary rows are split over the group.

    Args:
        head: The whole ``nn.Linear`` or ``nn.QuantizedLinear``. It is modified.
        sizes: Rows per rank.
        group: The group.
    """

    def __call__(self, x: mx.array) -> mx.array:
        """The whole logits (the same on every rank; one all-gather)."""
        return self.gather_logits(self.inner(x))


def apply_vocab_parallel(model: nn.Module, sizes: Sequence[int], group: Group) -> int:
    """Split the embedding and, if untied, the head of an mlx-lm model by vocabulary rows.

    Args:
        model: An mlx-lm model with ``model.model.embed_tokens`` (and
            ``model.lm_head`` unless its embeddings are tied).
        sizes: Rows per rank.
        group: The group.

    Returns:
        Bytes of the unsharded embedding and head.
    """
    model = text_model(model)
    whole = sum(v.nbytes for _, v in tree_flatten(model.model.embed_tokens.parameters()))
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, sizes, group)
    if "lm_head" in model:
        whole += sum(v.nbytes for _, v in tree_flatten(model.lm_head.parameters()))
        model.lm_head = VocabParallelHead(model.lm_head, sizes, group)
    return whole
