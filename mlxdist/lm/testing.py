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
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mlxdist.errors import InvalidArgumentError

__all__ = ["FAMILIES", "WRAPPERS", "DTYPES", "CHAT_TEMPLATE", "add_chat_template", "model_config", "random_model",
           "write_checkpoint", "write_tokenizer"]

# model_type -> extra config keys the family needs.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True},
    # Mixture of experts: the routed experts' count comes from model_config's num_experts.
    "qwen3_moe": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
    "mixtral": {"tie_word_embeddings": False, "num_experts_per_tok": 2},
    "gpt_oss": {"num_experts_per_tok": 2, "sliding_window": 128},
    # Shared experts, a router with e_score_correction_bias and grouped top-k, q/k norms, q/k/v
    # biases, partial rotary; the first block dense.
    # Multi-head latent attention (q_a/q_b, kv_a, embed_q/unembed_out), a dense first block, MoE with
    # shared experts and a grouped top-k router with e_score_correction_bias.
    "deepseek_v3": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                    "topk_group": 1, "routed_scaling_factor": 1.5, "first_k_dense_replace": 1,
                    "norm_topk_prob": True, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 16,
                    "v_head_dim": 32, "qk_nope_head_dim": 32, "rope_scaling": None, "attention_bias": False},
    # Latent attention (q_a/q_b, kv_a, embed_q/unembed_out) as deepseek_v3, a dense first block, MoE with
    # shared experts and a grouped top-k router.
    "glm4_moe_lite": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                      "topk_group": 1, "routed_scaling_factor": 1.5, "first_k_dense_replace": 1,
                      "norm_topk_prob": True, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 16,
                      "v_head_dim": 32, "qk_nope_head_dim": 32, "rope_scaling": None, "attention_bias": False},
    # Dense; rope and llama-4 attention scaling under rope_parameters (its scale grows every 8 positions,
    # so a prompt and a few decoded tokens already see several).
    "ministral3": {"tie_word_embeddings": False,
                   "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                                       "original_max_position_embeddings": 8}},
    # q/k norms over all heads' features together, MoE with a sigmoid router, partial rotary.
    "minimax": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "shared_intermediate_size": 0,
                "rotary_dim": 8},
    # Latent attention whose kv_b_proj expands the latent to every head (no embed_q/unembed_out), yarn rope
    # (mlx-lm 0.32.2 needs rope_scaling), a dense first block, MoE with shared experts and group-limited top-k.
    "deepseek_v2": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                    "topk_group": 1, "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5,
                    "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 16,
                    "v_head_dim": 32, "qk_nope_head_dim": 32, "attention_bias": False,
                    "rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 0}},
    # Gated delta net (linear attention) blocks between full-attention blocks (gated queries), under a
    # multimodal wrapper; as many delta-net key heads as query heads, two value heads each (model_config).
    "qwen3_5": {"tie_word_embeddings": False, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                "linear_conv_kernel_dim": 4,
                "full_attention_interval": 2,
                "rope_parameters": {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "mrope_section": [2, 1, 1]}},
    # deepseek_v3's kinds plus a sparse-attention indexer inside the attention (replicated: its own heads);
    # index_topk below the test prompts' length, so the sparse path runs.
    "deepseek_v32": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                     "topk_group": 1, "routed_scaling_factor": 1.5, "first_k_dense_replace": 1,
                     "norm_topk_prob": True, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 16,
                     "v_head_dim": 32, "qk_nope_head_dim": 32, "rope_scaling": None, "attention_bias": False,
                     "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4},
    # deepseek_v3's kinds; rope and llama-4 attention scaling under rope_parameters (as ministral3's).
    "mistral4": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                 "topk_group": 1, "routed_scaling_factor": 1.5, "first_k_dense_replace": 1,
                 "norm_topk_prob": True, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 16,
                 "v_head_dim": 32, "qk_nope_head_dim": 32, "attention_bias": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                                     "original_max_position_embeddings": 8}},
    # Attention with a per-head output gate (g_proj), local and global layers, MoE with a shared expert
    # (share_expert, as wide as the routed ones; set by model_config).
    "step3p5": {"tie_word_embeddings": False, "moe_top_k": 2, "sliding_window": 4},
    # Two latent attentions and two dense MLPs per block (held in lists) beside a MoE with zero experts.
    "longcat_flash": {"tie_word_embeddings": False, "attention_method": "MLA", "zero_expert_type": "identity",
                      "moe_topk": 2, "zero_expert_num": 1, "kv_lora_rank": 32, "q_lora_rank": 64,
                      "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "routed_scaling_factor": 1.0,
                      "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "attention_bias": False},
    # Written whole under text_config (NESTED): attention with per-head q/k norms and partial rotary, a dense
    # first block (moe_layer_freq, set by model_config), MoE with a shared expert.
    "minimax_m3_vl": {"tie_word_embeddings": False, "num_experts_per_tok": 2},
    # Kimi delta attention (linear) in the first block (as many heads as query heads, 32 features each so
    # that its low-rank gates quantize: model_config), NoPE latent attention with a per-head output gate after
    # it, MoE with shared experts and grouped top-k, attention residuals mixed across blocks, under a wrapper.
    "kimi_k3": {"tie_word_embeddings": False, "mla_use_output_gate": True, "q_lora_rank": 64, "kv_lora_rank": 32,
                "qk_nope_head_dim": 32, "qk_rope_head_dim": 0, "v_head_dim": 32, "num_experts_per_token": 2,
                "num_shared_experts": 1, "first_k_dense_replace": 1, "num_expert_group": 2, "topk_group": 1,
                "attn_res_block_size": 2},
    # Local and global attention layers (layer_types, set by model_config), a dense first block (is_moe_layer),
    # MoE with shared experts and a grouped top-k router with e_score_correction_bias.
    "exaone_moe": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "num_shared_experts": 1, "n_group": 2,
                   "topk_group": 1, "sliding_window": 4},
    # Local and global attention layers, q/k norms, a scaled embedding.
    "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window": 16, "sliding_window_pattern": 2},
    # Fused qkv_proj and gate_up_proj: pipeline parallel only.
    "phi3": {"tie_word_embeddings": False},
    "glm4_moe": {"tie_word_embeddings": False, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                 "topk_group": 1, "routed_scaling_factor": 1.5, "first_k_dense_replace": 1, "norm_topk_prob": True,
                 "use_qk_norm": True, "attention_bias": True, "partial_rotary_factor": 0.5, "rope_scaling": None},
}

# Multimodal model_type -> the family of its text model (under ``text_config``; the decoder under
# ``language_model``). Only the text model is written: mlx-lm's loaders drop the vision weights anyway.
WRAPPERS: dict[str, str] = {"gemma3": "gemma3_text", "kimi_k25": "deepseek_v3"}
# Multimodal model_types whose own text config (a FAMILIES entry) goes whole under ``text_config``.
NESTED: frozenset[str] = frozenset({"minimax_m3_vl"})

# model_type -> the config key of its routed experts' count (and of their width, when not
# intermediate_size).
EXPERT_KEYS: dict[str, tuple[str, Optional[str]]] = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "mixtral": ("num_local_experts", None),
    "gpt_oss": ("num_local_experts", None),
    "glm4_moe": ("n_routed_experts", "moe_intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
    "glm4_moe_lite": ("n_routed_experts", "moe_intermediate_size"),
    "minimax": ("num_local_experts", None),
    "deepseek_v2": ("n_routed_experts", "moe_intermediate_size"),
    "deepseek_v32": ("n_routed_experts", "moe_intermediate_size"),
    "mistral4": ("n_routed_experts", "moe_intermediate_size"),
    "kimi_k3": ("num_experts", "moe_intermediate_size"),
    "exaone_moe": ("num_experts", "moe_intermediate_size"),
    "step3p5": ("moe_num_experts", "moe_intermediate_size"),
    "longcat_flash": ("n_routed_experts", "expert_ffn_hidden_size"),
    "minimax_m3_vl": ("num_local_experts", None),
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
    num_experts: int = 4,
) -> dict[str, Any]:
    """The ``config.json`` of a small model of one family.

    Args:
        family: A key of :data:`FAMILIES` or :data:`WRAPPERS`.
        hidden_size: Model width.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads.
        intermediate_size: MLP width.
        vocab_size: Tokens (see :func:`write_tokenizer` for the range).
        head_dim: Per-head width (default ``hidden_size // num_heads``).
        num_experts: Routed experts of a mixture-of-experts family (each
            ``intermediate_size`` features wide).

    Returns:
        The config dict (no quantization entry).

    Raises:
        InvalidArgumentError: unknown family.
    """
    if family in WRAPPERS:
        text = model_config(WRAPPERS[family], hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                            num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
                            head_dim=head_dim, num_experts=num_experts)
        return {"model_type": family, "text_config": text, "vocab_size": vocab_size,
                "bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"]}
    if family not in FAMILIES:
        raise InvalidArgumentError(f"family must be one of {sorted([*FAMILIES, *WRAPPERS])}, got {family!r}")
    extra: dict[str, Any] = {}
    if family in EXPERT_KEYS:
        count, width = EXPERT_KEYS[family]
        extra[count] = num_experts
        if width:
            extra[width] = intermediate_size
    if family == "kimi_k3":
        extra["linear_attn_config"] = {"kda_layers": [1], "num_heads": num_heads, "head_dim": 32,
                                       "short_conv_kernel_size": 4}
    if family == "qwen3_5":
        extra["linear_num_key_heads"], extra["linear_num_value_heads"] = num_heads, 2 * num_heads
    if family == "exaone_moe":
        extra["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
        extra["is_moe_layer"] = [i > 0 for i in range(num_layers)]
    if family == "step3p5":
        extra["share_expert_dim"] = intermediate_size
        extra["num_attention_groups"] = num_kv_heads
    if family == "longcat_flash":
        extra["num_layers"] = num_layers
        extra["ffn_hidden_size"] = intermediate_size
    if family == "minimax_m3_vl":
        extra["dense_intermediate_size"] = extra["shared_intermediate_size"] = intermediate_size
        extra["moe_layer_freq"] = [int(i > 0) for i in range(num_layers)]
    if family == "gpt_oss":
        extra["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(max(2, num_layers))][
            :num_layers
        ]
    config = {
        **extra,
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
    if family in NESTED:
        return {"model_type": family, "text_config": config, "vocab_size": vocab_size, "bos_token_id": 1,
                "eos_token_id": 2}
    return config


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


def write_tokenizer(path: Union[str, Path], vocab_size: int, added_tokens: Sequence[str] = ()) -> None:
    """Write a byte-level BPE tokenizer with ``vocab_size`` tokens.

    Ids 0, 1, 2 are ``<unk>``, ``<s>`` (bos) and ``</s>`` (eos), then the 256
    byte symbols, then merges of two lowercase letters (``"ab"``, ``"ac"``...)
    up to ``vocab_size``, so any text encodes and every id decodes. Byte-level
    BPE is what transformers' Qwen2 tokenizer (chosen for qwen2/qwen3
    checkpoints whatever the file says) can rebuild.

    Args:
        path: The checkpoint directory (created if missing).
        vocab_size: The number of tokens (at most 3 + 256 + 26 * 26).
        added_tokens: Whole-string tokens (e.g. a tool-call format's markers) that take
            the last ids, in order, in place of as many merges; they decode to their text.

    Raises:
        InvalidArgumentError: vocab_size out of range.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [(a, b) for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]
    base = len(SPECIAL_TOKENS) + len(alphabet)
    if not base + len(added_tokens) <= vocab_size <= base + len(pairs):
        raise InvalidArgumentError(f"vocab_size must be in [{base}, {base + len(pairs)}], got {vocab_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    merges = pairs[: vocab_size - base - len(added_tokens)]
    vocab.update({a + b: base + i for i, (a, b) in enumerate(merges)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in added_tokens])
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


def random_model(
    family: str = "llama",
    *,
    dtype: str = "float32",
    bits: Optional[int] = None,
    group_size: int = 32,
    seed: int = 0,
    **dims: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """A random-weight mlx-lm model of one family, built with mlx-lm's own classes (nothing written).

    Args:
        family: A key of :data:`FAMILIES` or :data:`WRAPPERS`.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        bits: Quantize linear and embedding layers to this many bits (affine), or None; the
            family's ``quant_predicate`` decides per layer, as in mlx-lm's converter.
        group_size: Quantization group size.
        seed: PRNG seed: the same arguments give the same weights.
        **dims: Passed to :func:`model_config`.

    Returns:
        ``(model, config)``: the evaluated model and its ``config.json`` dict
        (with the quantization entries when ``bits`` is set).

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
        # As mlx-lm's converter: the family's own quant_predicate may keep a layer whole or give it its own
        # bits and group size (recorded per layer in the config, as the converter does). A group size that
        # does not divide these small models' widths (the converter refuses those) gives way to the default.
        family_predicate = getattr(model, "quant_predicate", None)
        overrides: dict[str, Any] = {}

        def predicate(path: str, module: nn.Module) -> Union[bool, dict]:
            if not hasattr(module, "to_quantized"):
                return False
            verdict = True if family_predicate is None else family_predicate(path, module)
            if isinstance(verdict, dict) and module.weight.shape[-1] % verdict.get("group_size", group_size):
                return True
            if isinstance(verdict, dict):
                overrides[path] = {"mode": "affine", **verdict}
                return overrides[path]
            return verdict

        try:
            nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
        except ValueError as exc:
            raise InvalidArgumentError(f"cannot quantize this model: {exc}") from None
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
        config["quantization_config"] = dict(config["quantization"])
    mx.eval(model.parameters())
    return model, config


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
        family: A key of :data:`FAMILIES` or :data:`WRAPPERS`.
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
    model, config = random_model(family, dtype=dtype, bits=bits, group_size=group_size, seed=seed, **dims)
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
