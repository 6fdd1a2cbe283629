"""The layers of expert parallelism: a switch projection holding a range of experts, and
the switch class that computes only its own experts' slots.

:func:`mlxdist.nn.experts.place_experts` puts them in place of an mlx-lm
switch layer's projections and class; they are called as the originals are,
with the router's global expert ids.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

__all__ = ["ExpertLinear", "LocalSlots", "SELECT_MIN_SLOTS", "local_class"]


class ExpertLinear(nn.Module):
    """A switch projection holding a contiguous range of experts, called with global expert ids.

    It replaces mlx-lm's ``SwitchLinear``/``QuantizedSwitchLinear`` under
    expert parallelism with the same parameter names (``weight``, ``scales``,
    ``biases``, ``bias``). Indices outside ``[first, first + count)`` are
    computed on a local expert (the shape is fixed), and where ``masks`` is
    set (the switch's output projection) their outputs are replaced by exact
    zeros, so those slots add nothing to this rank's partial sum.

    Args:
        parameters: The local experts' arrays, sliced along the expert axis.
        first: The global id of the first local expert.
        masks: Whether to zero the slots of other ranks' experts.
        quantization: ``(group_size, bits, mode)`` for a quantized weight, or None.
    """

    def __init__(
        self,
        parameters: dict[str, mx.array],
        first: int,
        masks: bool,
        quantization: Optional[tuple[int, int, str]] = None,
    ) -> None:
        super().__init__()
        self.first = int(first)
        self.count = int(parameters["weight"].shape[0])
        self.masks = bool(masks)
        self.quantized = quantization is not None
        if quantization is not None:
            self.group_size, self.bits, self.mode = int(quantization[0]), int(quantization[1]), str(quantization[2])
        for name, value in parameters.items():
            self[name] = value
        if quantization is not None:
            self.freeze()

    @property
    def num_experts(self) -> int:
        """The number of local experts."""
        return self.count

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """Apply each slot's expert (global ``indices``) to ``x``, as a switch projection does.

        Args:
            x: Inputs broadcastable against ``indices`` as mlx-lm's switch layers pass them.
            indices: Global expert ids (any integer dtype).
            sorted_indices: Whether ``indices`` are sorted (kept sorted after the remap).

        Returns:
            The projected slots; zero for other ranks' experts where ``masks`` is set.
        """
        local = indices.astype(mx.int32) - self.first
        ids = mx.clip(local, 0, self.count - 1)
        if not self.quantized:
            y = mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=ids, sorted_indices=sorted_indices)
        else:
            extra = {"global_scale": self["global_scale"]} if "global_scale" in self else {}
            y = mx.gather_qmm(
                x,
                self["weight"],
                self["scales"],
                self.get("biases"),
                rhs_indices=ids,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                sorted_indices=sorted_indices,
                **extra,
            )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][ids], -2)
        if self.masks:
            inside = (local >= 0) & (local < self.count)
            y = mx.where(mx.expand_dims(inside, (-1, -2)), y, mx.zeros((), dtype=y.dtype))
        return y


class LocalSlots:
    """What :func:`place_experts` adds to a switch layer's class: only local slots computed.

    With at least ``select_min_slots`` routed slots (prefill, batches), the
    switch reads which slots fall on its experts (one host synchronisation),
    runs its own computation on those slots only and scatters them into exact
    zeros; below it (decode), every slot runs on a local expert and the
    output projection zeroes the others' (fixed shapes). Set
    ``select_min_slots = None`` to keep fixed shapes always (``mx.compile``).
    """

    select_min_slots: Optional[int] = None
    expert_first: int = 0
    expert_count: int = 0

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """The switch's output for global ``indices``: zero for other ranks' experts.

        Args:
            x: The block's input, ``[..., hidden]``.
            indices: The router's global top-k expert ids, ``[..., k]``.

        Returns:
            ``[..., k, hidden]``, this rank's part.
        """
        minimum = self.select_min_slots
        if minimum is None or indices.size < minimum:
            return super().__call__(x, indices)  # type: ignore[misc]
        ids = indices.reshape(-1).astype(mx.int32)
        inside = (ids >= self.expert_first) & (ids < self.expert_first + self.expert_count)
        slots = np.flatnonzero(np.array(inside))
        top_k = indices.shape[-1]
        if slots.size == 0:
            shape = (*indices.shape, x.shape[-1])
            return mx.zeros(shape, dtype=x.dtype)
        chosen = mx.array(slots.astype(np.int32))
        picked = super().__call__(x.reshape(-1, x.shape[-1])[chosen // top_k], ids[chosen][:, None])  # type: ignore[misc]
        out = mx.zeros((ids.size, picked.shape[-1]), dtype=picked.dtype).at[chosen].add(picked[:, 0])
        return out.reshape(*indices.shape, picked.shape[-1])


# Below this many slots (one sequence decoding) no host synchronisation; selecting halved the
# compute at 2 ranks at every size measured (benchmarks/bench_experts.py).
SELECT_MIN_SLOTS = 64

_LOCAL_CLASSES: dict[type, type] = {}


def local_class(cls: type) -> type:
    """The subclass of a switch layer's class that adds :class:`LocalSlots` (one per class).

    Args:
        cls: The switch layer's class (e.g. mlx-lm's ``SwitchGLU``).

    Returns:
        ``ExpertParallel<name>``, a subclass of ``LocalSlots`` and ``cls``.
    """
    if cls not in _LOCAL_CLASSES:
        _LOCAL_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (LocalSlots, cls), {})
    return _LOCAL_CLASSES[cls]
