"""Tiny random-weight checkpoints in mlx-lm's on-disk format, for tests and benchmarks.

:func:`write_checkpoint` writes ``config.json``, ``model.safetensors`` and a
word-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that
``mlx_lm.load`` and :func:`mlxdist.lm.load` read offline. Weights are drawn
with a larger scale than a trained model's initialisation (embeddings
N(0, 1), linear weights N(0, (2 / sqrt(fan_in))^2)) so that greedy decoding
walks through varied tokens instead of repeating one.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mlxdist.errors import InvalidArgumentError

__all__ = ["FAMILIES", "DTYPES", "CHAT_TEMPLATE", "add_chat_template", "model_config", "write_checkpoint",
           "write_tokenizer"]

# model_type -> extra config keys the family needs.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True},
}

DTYPES: dict[str, mx.Dtype] = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

# A chat template over the special tokens: each message "<s>ROLE\nCONTENT</s>\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def model_config(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    head_dim: Optional[int] = None,
) -> dict[str, Any]:
    """The ``config.json`` of a small model of one family.

    Args:
        family: ``"llama"``, ``"mistral"``, ``"qwen2"`` or ``"qwen3"``.
        hidden_size: Model width.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads.
        intermediate_size: MLP width.
        vocab_size: Tokens (see :func:`write_tokenizer` for the range).
        head_dim: Per-head width (default ``hidden_size // num_heads``).

    Returns:
        The config dict (no quantization entry).

    Raises:
        InvalidArgumentError: unknown family.
    """
    if family not in FAMILIES:
        raise InvalidArgumentError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    return {
        "model_type": family,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or hidden_size // num_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **FAMILIES[family],
    }


def _model_classes(model_type: str) -> tuple[type, type]:
    from mlx_lm.utils import MODEL_REMAPPING

    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    return module.Model, module.ModelArgs


def _random_parameters(model: nn.Module, key: mx.array) -> dict[str, Any]:
    """Every parameter redrawn: norms 1, embeddings N(0, 1), linear weights N(0, (2/sqrt(fan_in))^2)."""
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(flat))
    drawn = {}
    for (path, value), k in zip(flat, keys):
        if "norm" in path:
            drawn[path] = mx.ones(value.shape)
        elif "embed_tokens" in path:
            drawn[path] = mx.random.normal(value.shape, key=k)
        elif value.ndim == 2:
            drawn[path] = mx.random.normal(value.shape, key=k) * (2.0 / math.sqrt(value.shape[-1]))
        else:  # biases
            drawn[path] = mx.random.normal(value.shape, key=k) * 0.1
    return tree_map_with_path(lambda path, value: drawn[path], model.parameters())


def write_tokenizer(path: Union[str, Path], vocab_size: int) -> None:
    """Write a byte-level BPE tokenizer with ``vocab_size`` tokens.

    Ids 0, 1, 2 are ``<unk>``, ``<s>`` (bos) and ``</s>`` (eos), then the 256
    byte symbols, then merges of two lowercase letters (``"ab"``, ``"ac"``...)
    up to ``vocab_size``, so any text encodes and every id decodes. Byte-level
    BPE is what transformers' Qwen2 tokenizer (chosen for qwen2/qwen3
    checkpoints whatever the file says) can rebuild.

    Args:
        path: The checkpoint directory (created if missing).
        vocab_size: The number of tokens (at most 3 + 256 + 26 * 26).

    Raises:
        InvalidArgumentError: vocab_size out of range.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [(a, b) for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]
    base = len(SPECIAL_TOKENS) + len(alphabet)
    if not base <= vocab_size <= base + len(pairs):
        raise InvalidArgumentError(f"vocab_size must be in [{base}, {base + len(pairs)}], got {vocab_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    merges = pairs[: vocab_size - base]
    vocab.update({a + b: base + i for i, (a, b) in enumerate(merges)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_checkpoint(
    path: Union[str, Path],
    family: str = "llama",
    *,
    dtype: str = "float32",
    bits: Optional[int] = None,
    group_size: int = 32,
    seed: int = 0,
    **dims: int,
) -> Path:
    """Write a random-weight checkpoint that ``mlx_lm.load`` reads offline.

    Args:
        path: The directory to write (created if missing; files overwritten).
        family: A key of :data:`FAMILIES`.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the weights'
            dtype (and the quantization scales' dtype when ``bits`` is set).
        bits: Quantize linear and embedding layers to this many bits with
            ``mx.quantize`` (affine), or None for dense weights.
        group_size: Quantization group size.
        seed: PRNG seed: the same arguments give the same weights.
        **dims: Passed to :func:`model_config` (``hidden_size``,
            ``num_layers``, ``num_heads``, ``num_kv_heads``,
            ``intermediate_size``, ``vocab_size``, ``head_dim``).

    Returns:
        The checkpoint directory.

    Raises:
        InvalidArgumentError: unknown family or dtype, or a quantization MLX
            rejects for these shapes.
    """
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = model_config(family, **dims)
    model_class, args_class = _model_classes(family)
    model = model_class(args_class.from_dict(config))
    model.update(_random_parameters(model, mx.random.key(seed)))
    model.set_dtype(DTYPES[dtype])
    if bits is not None:
        try:
            nn.quantize(model, group_size=group_size, bits=bits)
        except ValueError as exc:
            raise InvalidArgumentError(f"cannot quantize this model: {exc}") from None
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        config["quantization_config"] = dict(config["quantization"])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path, config["vocab_size"])
    return path


def add_chat_template(path: Union[str, Path], template: str = CHAT_TEMPLATE) -> Path:
    """Give a written checkpoint's tokenizer a chat template.

    Args:
        path: The checkpoint directory (:func:`write_checkpoint`'s).
        template: The Jinja template (default :data:`CHAT_TEMPLATE`).

    Returns:
        ``path``.
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    return path
