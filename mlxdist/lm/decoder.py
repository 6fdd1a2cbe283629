"""Where a checkpoint's decoder lives: the model itself, or a text model inside a wrapper.

Most mlx-lm models keep their decoder blocks at ``model.model.layers``.
Multimodal wrappers (gemma3, kimi_k25, ...) keep a whole text model under
an attribute such as ``language_model``, whose own ``model.layers`` holds
the blocks. :func:`text_model` finds that text model by its shape, not by
the wrapper's family, so the planner, the sharding and the pipeline stage
all work on the same object.
"""

from __future__ import annotations

import mlx.nn as nn

__all__ = ["text_model"]

_DEPTH = 3


def _holds_blocks(module: object) -> bool:
    # A child, not a property forwarding to a wrapped text model's (kimi_k25's ``model``).
    inner = module.get("model") if isinstance(module, nn.Module) else None
    return isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), (list, tuple)) and bool(
        inner.layers
    )


def text_model(model: nn.Module) -> nn.Module:
    """The module whose ``model.layers`` are the decoder blocks.

    Args:
        model: A loaded mlx-lm model (weights may be lazy).

    Returns:
        ``model`` itself when its child ``model`` has ``layers``; otherwise the first
        child module (breadth first, at most three levels down) that has
        them; otherwise ``model`` unchanged (the planner then names what it
        could not find).
    """
    level = [model]
    for _ in range(_DEPTH + 1):
        for module in level:
            if _holds_blocks(module):
                return module
        level = [child for module in level for child in module.children().values() if isinstance(child, nn.Module)]
    return model
