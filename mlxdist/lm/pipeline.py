"""Pipeline parallelism for mlx-lm models: contiguous decoder blocks per rank.

Rank ``r`` runs blocks ``[start_r, stop_r)``; the hidden state goes from rank
``r`` to ``r + 1`` with send/recv on the given group, and the last rank's
output is all-gathered so every rank computes the same logits (and, decoding
greedily or with a shared seed, the same tokens). Embeddings, the final norm
and the head are on every rank.
"""

from __future__ import annotations

from typing import Any, Optional

import inspect

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.ministral3 import _get_llama_4_attn_scale

from mlxdist.group import Group
from mlxdist.lm.decoder import text_model
from mlxdist.lm.kinds import has_latent_attention
from mlxdist.world import all_gather, recv_like, send

__all__ = ["PIPELINED", "PipelineStage", "apply_pipeline_parallel"]

# The mlx-lm model modules whose inner model the stage reproduces (checked by the tests: a stage over
# every block computes what the family's inner model does). A stage replaces the family's own forward,
# so any other family could be silently wrong under PP; mistral loads through llama.
PIPELINED = frozenset(
    f"mlx_lm.models.{name}"
    for name in ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "qwen3_moe", "mixtral", "gpt_oss",
                 "glm4_moe", "deepseek_v3", "glm4_moe_lite", "minimax", "deepseek_v2", "kimi_k25", "deepseek_v32",
                 "minimax_m3_vl", "ministral3", "mistral4", "exaone_moe", "step3p5", "qwen3_5")
)

# The inner models that build a causal mask of their own kind: the one latent attention family whose
# inner model passes the mask as mlx-lm's "causal" rather than as an array.
_CAUSAL_MASK = frozenset({"mlx_lm.models.mistral4"})

# The inner models that multiply the embeddings by sqrt(hidden_size) before the first block.
_SCALED_EMBEDDINGS = frozenset({"mlx_lm.models.gemma3_text"})


class PipelineStage(nn.Module):
    """The inner model (``model.model``) of an mlx-lm decoder, reduced to this rank's blocks.

    It takes the inner model's place and call signature, so the outer model
    (head, tied embeddings), caches and ``mlx_lm.generate`` work unchanged.

    Args:
        inner: The family's inner model (``embed_tokens``, ``layers``, ``norm``).
        start: First block this rank runs.
        stop: One past the last.
        group: The group the hidden state travels over.
    """

    def __init__(self, inner: nn.Module, start: int, stop: int, group: Group) -> None:
        super().__init__()
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers[start:stop]
        self.norm = inner.norm
        # Each block's kind of mask: a linear-attention block's (is_linear: qwen3_5's gated delta nets), or
        # a local window's, where the block's own use_sliding (ministral3) or is_sliding_window
        # (exaone_moe), its attention's is_sliding (gemma3, step3p5) or the inner model's layer_types
        # (gpt-oss) say so, or the causal one.
        self.sliding_window = (getattr(inner, "sliding_window", None) or getattr(inner, "window_size", None)
                               or getattr(getattr(inner, "args", None), "sliding_window", None))
        types = getattr(inner, "layer_types", None) or [None] * len(inner.layers)
        if getattr(inner, "layer_types", None):
            self.layer_types = list(types)  # every block's (the family's make_cache reads them)
        self.mask_kinds = [
            "linear" if getattr(layer, "is_linear", False) is True
            else "sliding" if (bool(getattr(layer, "use_sliding", False))
                               or bool(getattr(layer, "is_sliding_window", False))
                               or bool(getattr(getattr(layer, "self_attn", None), "is_sliding", False))
                               or types[index] == "sliding_attention")
            else "full"
            for index, layer in zip(range(start, stop), inner.layers[start:stop])
        ]
        self.group = group
        self.start, self.stop = start, stop
        # gemma's inner models scale the embeddings by sqrt(hidden_size) (rounded to bfloat16) first.
        scaled = type(inner).__module__ in _SCALED_EMBEDDINGS
        self.embed_scale = float(inner.args.hidden_size) ** 0.5 if scaled else None
        # Latent attention masks its scores with mx.where: it needs the mask as an array.
        self.array_mask = type(inner).__module__ not in _CAUSAL_MASK and any(
            has_latent_attention(layer) for layer in self.layers
        )
        # Blocks that take llama-4's attention scale (ministral3, mistral4) get it computed as their inner
        # model does, from the positions and rope_parameters.
        self.llama_4_scale: Optional[tuple[float, int]] = None
        if self.layers and "attn_scale" in inspect.signature(type(self.layers[0]).__call__).parameters:
            rope = inner.args.rope_parameters
            self.llama_4_scale = (rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"])

    @property
    def pipeline_layers(self) -> list:
        """This rank's blocks (the name qwen2's outer model reads)."""
        return self.layers

    def _mask(self, h: mx.array, cache: list, kind: str) -> Any:
        """The mask of this rank's blocks of one kind, from the first such block's cache (as inner models do)."""
        for local, c in zip(self.mask_kinds, cache):
            if isinstance(getattr(c, "caches", None), (list, tuple)):  # a CacheList: its attention's cache first
                c = c.caches[0]
            if local == kind == "linear":
                return create_ssm_mask(h, c)
            if local == kind:
                return create_attention_mask(
                    h, c, window_size=self.sliding_window if kind == "sliding" else None,
                    return_array=self.array_mask,
                )
        return None

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list] = None,
        input_embeddings: Optional[mx.array] = None,
        mask: Optional[mx.array] = None,
    ) -> mx.array:
        """Run this rank's blocks between its neighbours'.

        Args:
            inputs: Token ids ``(B, L)``.
            cache: This rank's per-block caches, or None.
            input_embeddings: Embeddings to use instead of ``inputs``'.
            mask: A mask for every block (minimax's outer model passes one), or
                None to build the causal and local-window masks here.

        Returns:
            The normalised hidden state of the last block, ``(B, L, D)``, the
            same on every rank.
        """
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if self.embed_scale is not None:
            h = h * mx.array(self.embed_scale, mx.bfloat16).astype(h.dtype)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            masks = {kind: self._mask(h, cache, kind) for kind in set(self.mask_kinds)}
        else:
            masks = {kind: mask for kind in self.mask_kinds}
        extra: tuple = ()
        if self.llama_4_scale is not None:
            offset = cache[0].offset if cache[0] is not None else 0
            extra = (_get_llama_4_attn_scale(h.shape[1], offset, *self.llama_4_scale).astype(h.dtype),)
        rank, size = self.group.rank(), self.group.size()
        if rank > 0:
            h = recv_like(h, rank - 1, group=self.group)
        for layer, kind, c in zip(self.layers, self.mask_kinds, cache):
            h = layer(h, *extra, masks[kind], cache=c)
        if rank < size - 1:
            h = send(h, rank + 1, group=self.group)
            # Whoever evaluates only the caches (prefill chunks) still sends.
            if cache[-1] is not None:
                _tie(cache[-1], h)
        batch = h.shape[0]
        h = all_gather(h, group=self.group)[(size - 1) * batch :]
        return self.norm(h)


def _tie(cache: Any, h: mx.array) -> None:
    """Make ``cache``'s first stored array depend on ``h``, so evaluating the cache evaluates ``h``."""
    if isinstance(getattr(cache, "caches", None), (list, tuple)):  # a CacheList (deepseek_v32's, with its indexer's)
        _tie(cache.caches[0], h)
    elif isinstance(getattr(cache, "keys", None), mx.array):  # key/value caches
        cache.keys = mx.depends(cache.keys, h)
    elif isinstance(getattr(cache, "cache", None), list) and isinstance(cache[0], mx.array):  # an ArraysCache
        cache[0] = mx.depends(cache[0], h)
    else:
        raise TypeError(f"the pipeline stage cannot tie its send to a {type(cache).__name__}")  # a new cache kind


def apply_pipeline_parallel(model: nn.Module, start: int, stop: int, group: Group) -> int:
    """Keep blocks ``[start, stop)`` of ``model`` and wire them into the pipeline.

    The other blocks' lazy weights are dropped unread; this rank's are
    materialised block by block.

    Args:
        model: A lazily loaded mlx-lm model with ``model.model.{embed_tokens, layers, norm}``.
        start: First block of this rank.
        stop: One past its last block.
        group: The group.

    Returns:
        Bytes of all decoder blocks of the whole model.
    """
    model = text_model(model)
    blocks_bytes = sum(v.nbytes for block in model.model.layers for _, v in tree_flatten(block.parameters()))
    total = len(model.model.layers)
    model.model = PipelineStage(model.model, start, stop, group)
    family_caches = getattr(type(model), "make_cache", None)
    if family_caches is not None:
        # A family's make_cache may build one cache per block of the whole model (gemma3 from its
        # config, gpt-oss from layer_types): this rank keeps those of its own blocks.
        def make_cache() -> list:
            caches = family_caches(model)
            return caches[start:stop] if len(caches) == total else caches

        object.__setattr__(model, "make_cache", make_cache)
    for block in model.model.layers:
        mx.eval(block.parameters())
    return blocks_bytes
