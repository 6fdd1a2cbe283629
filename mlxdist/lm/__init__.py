"""Sharded inference of mlx-lm checkpoints over an :class:`mlxdist.Group`.

mlx-lm loads checkpoints, tokenizes and generates; mlxdist shards:
tensor parallel (:mod:`mlxdist.lm.tensor`, with :mod:`mlxdist.nn`'s layers)
on any number of ranks that each get a query head (evenly when the heads
divide, else in uneven shares, :mod:`mlxdist.lm.split`; optionally the
vocabulary too, :mod:`mlxdist.lm.vocab`), pipeline parallel
(:mod:`mlxdist.lm.pipeline`) otherwise, chosen by :func:`mlxdist.lm.plan.choose`.

Example (run under ``python -m mlxdist.launch -n 2 -- python script.py``)::

    import mlxdist
    from mlxdist.lm import generate_tokens, load

    model, tokenizer, plan = load("path/to/mlx-checkpoint", mlxdist.init())
    out = generate_tokens(model, tokenizer.encode("Hello"), max_tokens=32)
    print(plan.mode, tokenizer.decode(out.tokens))

Requires the ``lm`` extra (``pip install "mlxdist[lm]"``).
"""

try:
    import mlx_lm  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("mlxdist.lm needs mlx-lm (Python >= 3.11): pip install 'mlxdist[lm]'") from exc

from mlxdist.lm.generation import Generation, generate_tokens, logits
from mlxdist.lm.loading import load
from mlxdist.lm.memory import parameter_bytes, peak_rss_bytes, rss_bytes
from mlxdist.lm.plan import MODES, Plan, choose, layer_ranges, model_split, tp_violations
from mlxdist.lm.split import TensorSplit, tensor_split

__all__ = [
    "load",
    "Plan",
    "MODES",
    "choose",
    "layer_ranges",
    "tp_violations",
    "model_split",
    "TensorSplit",
    "tensor_split",
    "generate_tokens",
    "Generation",
    "logits",
    "parameter_bytes",
    "peak_rss_bytes",
    "rss_bytes",
]
