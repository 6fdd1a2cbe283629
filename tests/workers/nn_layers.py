"""Worker: mlxdist.nn's tensor-parallel layers on real ranks, against unsharded layers.

Every rank builds the same global weights and inputs from shared seeds,
computes the unsharded reference itself, and checks its shard of the sharded
computation against it. Every check runs on every rank in the same order (so
the collectives match); failures are collected and reported together, and the
worker exits 1 if there was any.

Usage: nn_layers.py BACKEND
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import mlxdist
from mlxdist import all_sum
from mlxdist.nn import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
    quantization_spec,
    shard_inplace,
    shard_linear,
    sum_gradients,
)
from mlxdist.nn.base import global_linear_parameters
from nn_experts import checks as expert_checks
from nn_uneven import checks as uneven_checks

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# (rtol, atol) for values of magnitude ~1: the sharded computation adds the
# same products in another order (and, row-parallel, rounds each rank's
# partial sum to the dtype before the all-sum).
TOLERANCE = {mx.float32: (1e-4, 1e-5), mx.float16: (1e-2, 5e-3), mx.bfloat16: (5e-2, 3e-2)}
# Gradients pass through four layers and a loss: twice as loose.
GRAD_TOLERANCE = {dtype: (2 * r, 2 * a) for dtype, (r, a) in TOLERANCE.items()}

# Candidates to ask MLX about; only those mx.quantize and mx.quantized_matmul
# accept on this build are tested.
CANDIDATE_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
CANDIDATE_BITS = range(1, 9)
CANDIDATE_GROUP_SIZES = (16, 32, 64, 128)

group = mlxdist.init(sys.argv[1], strict=True)
N, RANK = group.size(), group.rank()
assert N > 1, "run this worker on two or more ranks"
failures: list[str] = []


def check(name: str, fn: Callable[[], None]) -> None:
    """Run one check; report (not raise) its failure so later checks still run on every rank.

    The report is printed at once: a failure that leaves the ranks' collectives
    out of step may end the job before the summary.
    """
    try:
        fn()
    except Exception:  # noqa: BLE001 - every failure is reported
        failures.append(name)
        print(f"[rank {RANK}] FAILED {name}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def f32(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def assert_close(got: mx.array, want: mx.array, dtype: mx.Dtype, what: str, tolerance=TOLERANCE) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    rtol, atol = tolerance[dtype]
    np.testing.assert_allclose(f32(got), f32(want), rtol=rtol, atol=atol, err_msg=what)


def expect(error: type[BaseException], fn: Callable[[], Any], *fragments: str) -> None:
    try:
        fn()
    except error as exc:
        message = str(exc)
        for fragment in fragments:
            assert fragment in message, f"{error.__name__} message lacks {fragment!r}: {message}"
        return
    raise AssertionError(f"expected {error.__name__}")


def linear(input_dims: int, output_dims: int, seed: int, bias: bool = True, dtype=mx.float32) -> nn.Linear:
    mx.random.seed(seed)
    layer = nn.Linear(input_dims, output_dims, bias=bias)
    layer.set_dtype(dtype)
    return layer


def inputs(shape: tuple[int, ...], seed: int, dtype=mx.float32) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def shard_of(x: mx.array, axis: int = -1) -> mx.array:
    """This rank's contiguous slice of ``x`` along ``axis``."""
    step = x.shape[axis] // N
    index = [slice(None)] * x.ndim
    index[axis] = slice(RANK * step, (RANK + 1) * step)
    return x[tuple(index)]


def segment_shards(x: mx.array, bounds: list[int], axis: int = -1) -> mx.array:
    """This rank's slice of every segment of ``x`` along ``axis``, concatenated."""
    parts = []
    for start, stop in zip(bounds, bounds[1:]):
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        parts.append(shard_of(x[tuple(index)], axis))
    return mx.concatenate(parts, axis=axis)


# -- single layers -------------------------------------------------------------


def check_single_layers(dtype: mx.Dtype) -> None:
    for bias in (True, False):
        full = linear(24, 8 * N, seed=1, bias=bias, dtype=dtype)
        x = inputs((2, 3, 24), 2, dtype)
        want = full(x)
        column = shard_linear(full, "all-to-sharded", group=group)
        assert isinstance(column, AllToShardedLinear) and column.weight.dtype == dtype
        assert_close(column(x), shard_of(want), dtype, f"all-to-sharded bias={bias}")

        full = linear(8 * N, 12, seed=3, bias=bias, dtype=dtype)
        x = inputs((2, 3, 8 * N), 4, dtype)
        row = shard_linear(full, "sharded-to-all", group=group)
        assert isinstance(row, ShardedToAllLinear) and row.weight.dtype == dtype
        assert_close(row(shard_of(x)), full(x), dtype, f"sharded-to-all bias={bias}")


class Stack(nn.Module):
    """column, row, column, row with activations in between."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = nn.gelu(x)
        return x


def check_stack(dtype: mx.Dtype) -> None:
    dims = [(12, 8 * N), (8 * N, 10), (10, 4 * N), (4 * N, 6)]
    full = Stack([linear(i, o, seed=10 + k, dtype=dtype) for k, (i, o) in enumerate(dims)])
    shardings = ["all-to-sharded", "sharded-to-all"] * 2
    sharded = Stack([shard_linear(l, s, group=group) for l, s in zip(full.layers, shardings)])
    x = inputs((5, 12), 20, dtype)
    target = inputs((5, 6), 21, dtype)

    def loss(model: nn.Module, x: mx.array) -> mx.array:
        return ((model(x) - target).astype(mx.float32) ** 2).mean()

    want_loss, want_grads = nn.value_and_grad(full, loss)(full, x)
    got_loss, got_grads = nn.value_and_grad(sharded, loss)(sharded, x)
    assert_close(got_loss, want_loss, dtype, "stack loss", GRAD_TOLERANCE)
    for k, sharding in enumerate(shardings):
        want, got = want_grads["layers"][k], got_grads["layers"][k]
        if sharding == "all-to-sharded":
            assert_close(got["weight"], shard_of(want["weight"], 0), dtype, f"d weight {k}", GRAD_TOLERANCE)
            assert_close(got["bias"], shard_of(want["bias"], 0), dtype, f"d bias {k}", GRAD_TOLERANCE)
        else:
            assert_close(got["weight"], shard_of(want["weight"], 1), dtype, f"d weight {k}", GRAD_TOLERANCE)
            assert_close(got["bias"], want["bias"], dtype, f"d bias {k}", GRAD_TOLERANCE)
    # The replicated input's gradient needs sum_gradients' all-sum.
    want_dx = mx.grad(lambda x: loss(full, x))(x)
    got_dx = mx.grad(lambda x: loss(sharded, x))(x)
    assert_close(got_dx, want_dx, dtype, "d input", GRAD_TOLERANCE)


class MLP(nn.Module):
    """Llama's feed-forward block."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def llama_mlp(hidden: int, intermediate: int, dtype: mx.Dtype) -> MLP:
    return MLP(
        linear(hidden, intermediate, 30, bias=False, dtype=dtype),
        linear(hidden, intermediate, 31, bias=False, dtype=dtype),
        linear(intermediate, hidden, 32, bias=False, dtype=dtype),
    )


def shard_mlp(full: MLP) -> MLP:
    return MLP(
        shard_linear(full.gate_proj, "all-to-sharded", group=group),
        shard_linear(full.up_proj, "all-to-sharded", group=group),
        shard_linear(full.down_proj, "sharded-to-all", group=group),
    )


def check_mlp(dtype: mx.Dtype) -> None:
    full = llama_mlp(32, 16 * N, dtype)
    x = inputs((3, 32), 33, dtype)
    assert_close(shard_mlp(full)(x), full(x), dtype, "llama mlp")


def check_quantized_mlp() -> None:
    """4-bit: shard_linear of a quantized MLP, and nn.quantize of a sharded float MLP."""
    full = llama_mlp(64, 64 * N, mx.float32)
    x = inputs((3, 64), 34)
    sharded_float = shard_mlp(full)
    nn.quantize(full, group_size=32, bits=4)
    want = full(x)
    assert_close(shard_mlp(full)(x), want, mx.float32, "shard_linear of a 4-bit mlp")
    nn.quantize(sharded_float, group_size=32, bits=4)
    assert isinstance(sharded_float.down_proj, QuantizedShardedToAllLinear)
    assert isinstance(sharded_float.gate_proj, QuantizedAllToShardedLinear)
    assert_close(sharded_float(x), want, mx.float32, "nn.quantize of a sharded mlp")


# -- quantized layers ------------------------------------------------------------


def supported_quantizations() -> list[tuple[str, int, int]]:
    """(mode, bits, group_size) that this MLX build quantizes and multiplies with."""
    found = []
    w, x = mx.ones((4, 256)), mx.ones((1, 256))
    for mode in CANDIDATE_MODES:
        for bits in CANDIDATE_BITS:
            for group_size in CANDIDATE_GROUP_SIZES:
                try:
                    q = mx.quantize(w, group_size, bits, mode=mode)
                    biases = q[2] if len(q) > 2 else None
                    mx.eval(mx.quantized_matmul(x, q[0], q[1], biases, True, group_size, bits, mode=mode))
                except (ValueError, RuntimeError):
                    continue
                found.append((mode, bits, group_size))
    return found


def check_quantized(mode: str, bits: int, group_size: int, dtype: mx.Dtype) -> None:
    input_dims = 2 * group_size * N
    for bias in (True, False):
        full = linear(input_dims, 4 * N, seed=40, bias=bias, dtype=dtype)
        quantized = nn.QuantizedLinear.from_linear(full, group_size, bits, mode=mode)
        x = inputs((3, input_dims), 41, dtype)
        want = quantized(x)
        what = f"{mode} bits={bits} group_size={group_size} bias={bias}"
        column = shard_linear(quantized, "all-to-sharded", group=group)
        row = shard_linear(quantized, "sharded-to-all", group=group)
        assert isinstance(column, QuantizedAllToShardedLinear) and isinstance(row, QuantizedShardedToAllLinear)
        for layer in (column, row):
            assert (layer.group_size, layer.bits, layer.mode) == (group_size, bits, mode), what
            assert layer.trainable_parameters() == {}, f"{what}: not frozen"
            assert ("biases" in layer) == ("biases" in quantized), f"{what}: biases present iff affine"
        assert_close(column(x), shard_of(want), dtype, f"quantized all-to-sharded {what}")
        assert_close(row(shard_of(x)), want, dtype, f"quantized sharded-to-all {what}")


def check_quantized_constructors() -> None:
    column = QuantizedAllToShardedLinear(64, 4 * N, group_size=32, bits=4, group=group, key=5)
    row = QuantizedShardedToAllLinear(64 * N, 8, bias=True, mode="mxfp4", group=group, key=6)
    assert row.group_size == 32 and row.bits == 4 and "biases" not in row
    assert column.trainable_parameters() == {} and row.trainable_parameters() == {}
    # The shards quantize slices of the float matrix the key draws.
    weights = {
        "column": global_linear_parameters(64, 4 * N, False, mx.random.key(5))["weight"],
        "row": global_linear_parameters(64 * N, 8, False, mx.random.key(6))["weight"],
    }
    for layer, name, axis in ((column, "column", 0), (row, "row", 1)):
        expected = mx.quantize(shard_of(weights[name], axis), layer.group_size, layer.bits, mode=layer.mode)
        assert mx.array_equal(layer.weight, expected[0]) and mx.array_equal(layer.scales, expected[1]), name
    # So the row-parallel layer computes what the unsharded quantized layer does.
    full = nn.Linear(64 * N, 8, bias=False)
    full.weight = weights["row"]
    reference = nn.QuantizedLinear.from_linear(full, row.group_size, row.bits, mode=row.mode)
    x = inputs((2, 64 * N), 7)
    assert_close(row(shard_of(x)), reference(x), mx.float32, "constructed quantized row")


# -- constructors, segments, modules ----------------------------------------------


def gather(x: mx.array, axis: int) -> mx.array:
    """Every rank's ``x`` concatenated along ``axis``."""
    moved = mx.moveaxis(x, axis, 0)
    return mx.moveaxis(mlxdist.all_gather(moved, group=group), 0, axis)


def check_constructors() -> None:
    # An explicit key: each rank holds its slice of the matrix the key draws.
    column = AllToShardedLinear(6, 2 * N, group=group, key=11)
    row = ShardedToAllLinear(2 * N, 6, group=group, key=12)
    want_column = global_linear_parameters(6, 2 * N, True, mx.random.key(11))
    want_row = global_linear_parameters(2 * N, 6, True, mx.random.key(12))
    assert mx.array_equal(gather(column.weight, 0), want_column["weight"])
    assert mx.array_equal(gather(column.bias, 0), want_column["bias"])
    assert mx.array_equal(gather(row.weight, 1), want_row["weight"])
    assert mx.array_equal(row.bias, want_row["bias"])
    # No key, every rank's global random state different: the ranks still agree.
    mx.random.seed(1000 + RANK)
    column = AllToShardedLinear(6, 2 * N, group=group)
    row = ShardedToAllLinear(2 * N, 6, group=group)
    same = mx.array_equal(mlxdist.all_max(row.bias, group=group), mlxdist.all_min(row.bias, group=group))
    assert same, "the row-parallel bias differs across ranks"
    # The gathered layers are one consistent linear layer.
    full_column = nn.Linear(6, 2 * N)
    full_column.update({"weight": gather(column.weight, 0), "bias": gather(column.bias, 0)})
    full_row = nn.Linear(2 * N, 6)
    full_row.update({"weight": gather(row.weight, 1), "bias": row.bias})
    x = inputs((3, 6), 13)
    assert_close(row(column(x)), full_row(full_column(x)), mx.float32, "constructed column+row")


def check_segments() -> None:
    d = 32
    sizes = {"q": 4 * N, "k": 2 * N, "v": 2 * N}
    parts = {name: linear(d, size, seed=50 + k) for k, (name, size) in enumerate(sizes.items())}
    x = inputs((3, d), 53)

    def fused(names: list[str]) -> nn.Module:
        layer = nn.Linear(d, sum(sizes[n] for n in names))
        layer.weight = mx.concatenate([parts[n].weight for n in names], axis=0)
        layer.bias = mx.concatenate([parts[n].bias for n in names], axis=0)
        return layer

    def separate(names: list[str]) -> mx.array:
        return mx.concatenate([shard_linear(parts[n], "all-to-sharded", group=group)(x) for n in names], -1)

    # segments=3: q, k and v of one size.
    equal = {"q": parts["k"], "k": parts["k"], "v": parts["v"]}
    layer = nn.Linear(d, 3 * 2 * N)
    layer.weight = mx.concatenate([equal[n].weight for n in "qkv"], axis=0)
    layer.bias = mx.concatenate([equal[n].bias for n in "qkv"], axis=0)
    want = mx.concatenate([shard_linear(equal[n], "all-to-sharded", group=group)(x) for n in "qkv"], -1)
    got = shard_linear(layer, "all-to-sharded", segments=3, group=group)(x)
    assert_close(got, want, mx.float32, "segments=3")
    quantized = nn.QuantizedLinear.from_linear(layer, 32, 4)
    want_q = mx.concatenate(
        [shard_of(y) for y in mx.split(quantized(x), 3, axis=-1)], axis=-1
    )
    assert_close(shard_linear(quantized, "all-to-sharded", segments=3, group=group)(x), want_q,
                 mx.float32, "quantized segments=3")

    # Unequal q, k, v (grouped-query attention): split indices and fractions.
    names = ["q", "k", "v"]
    total = sum(sizes.values())
    indices = [sizes["q"], sizes["q"] + sizes["k"]]
    fractions = [i / total for i in indices]
    for segments in (indices, fractions):
        got = shard_linear(fused(names), "all-to-sharded", segments=segments, group=group)(x)
        assert_close(got, separate(names), mx.float32, f"segments={segments}")

    # Row-parallel over a fused input: each rank holds its slice of every segment.
    full = linear(total, 5, seed=54)
    h = inputs((3, total), 55)
    bounds = [0, *indices, total]
    for segments in (indices, fractions):
        row = shard_linear(full, "sharded-to-all", segments=segments, group=group)
        assert_close(row(segment_shards(h, bounds)), full(h), mx.float32, f"row segments={segments}")
    # Quantized row-parallel with split indices in unpacked features.
    wide = linear(64 * N * 2, 5, seed=56)
    quantized = nn.QuantizedLinear.from_linear(wide, 32, 4)
    h = inputs((3, 64 * N * 2), 57)
    split = [64 * N]
    row = shard_linear(quantized, "sharded-to-all", segments=split, group=group)
    assert_close(row(segment_shards(h, [0, 64 * N, 128 * N])), quantized(h), mx.float32, "quantized row segments")


class ConvNet(nn.Module):
    """conv (output channels sharded) -> relu -> conv (input channels sharded) -> sum -> bias."""

    def __init__(self, reduce: Callable[[mx.array], mx.array], spread: Callable[[mx.array], mx.array]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4 * N, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(4 * N, 5, kernel_size=3, padding=1, bias=False)
        self.bias2 = mx.zeros((5,))
        self.head = nn.Linear(5, 2)
        self._reduce, self._spread = reduce, spread

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.relu(self.conv1(self._spread(x)))
        return self.head(self._reduce(self.conv2(h)) + self.bias2)


def check_conv_shard_inplace() -> None:
    mx.random.seed(60)
    full = ConvNet(lambda y: y, lambda y: y)
    full.bias2 = mx.random.normal((5,))
    sharded = ConvNet(lambda y: all_sum(y, group=group), sum_gradients(group))
    sharded.update(full.parameters())

    def predicate(path: str, weight: mx.array):
        if path.startswith("conv1."):
            return 0
        if path == "conv2.weight":
            return -1
        return None

    shard_inplace(sharded, predicate, group=group)
    assert sharded.conv1.weight.shape == (4, 3, 3, 3) and sharded.conv2.weight.shape == (5, 3, 3, 4)
    assert sharded.head.weight.shape == (2, 5)
    x = inputs((2, 6, 6, 3), 61)
    assert_close(sharded(x), full(x), mx.float32, "conv model shard_inplace")

    def loss(model: nn.Module, x: mx.array) -> mx.array:
        return (model(x) ** 2).sum()

    assert_close(mx.grad(lambda x: loss(sharded, x))(x), mx.grad(lambda x: loss(full, x))(x),
                 mx.float32, "conv model input gradient", GRAD_TOLERANCE)


def check_shard_inplace_strings() -> None:
    """String shardings on plain layers: the parameters become those shard_linear holds."""
    full = linear(8, 4 * N, seed=70)
    layer = linear(8, 4 * N, seed=70)
    shard_inplace(layer, "all-to-sharded", group=group)
    column = shard_linear(full, "all-to-sharded", group=group)
    assert mx.array_equal(layer.weight, column.weight) and mx.array_equal(layer.bias, column.bias)
    full = linear(4 * N, 8, seed=71)
    layer = linear(4 * N, 8, seed=71)
    shard_inplace(layer, "sharded-to-all", group=group)
    assert mx.array_equal(layer.weight, shard_of(full.weight, 1)) and mx.array_equal(layer.bias, full.bias)
    # A quantized module is cut in unpacked input features.
    quantized = nn.QuantizedLinear.from_linear(linear(64 * N, 8, seed=72), 64, 4)
    want = shard_linear(quantized, "sharded-to-all", group=group)
    shard_inplace(quantized, "sharded-to-all", group=group)
    for name in ("weight", "scales", "biases"):
        assert mx.array_equal(quantized[name], want[name]), name


def check_module_behaviour() -> None:
    a = shard_linear(linear(8, 2 * N, seed=80), "all-to-sharded", group=group)
    b = shard_linear(linear(8, 2 * N, seed=81), "all-to-sharded", group=group)
    assert set(dict(tree_flatten(a.parameters()))) == {"weight", "bias"}
    a.load_weights(list(tree_flatten(b.parameters())))
    x = inputs((2, 8), 82)
    assert mx.array_equal(a(x), b(x)), "load_weights"
    a.freeze()
    assert a.trainable_parameters() == {}
    a.unfreeze()
    assert set(a.trainable_parameters()) == {"weight", "bias"}
    q = shard(nn.QuantizedLinear.from_linear(linear(64, 2 * N, seed=83), 32, 4))
    q.unfreeze()
    assert q.trainable_parameters() == {}, "quantized layer's own parameters stay frozen"


def check_functional() -> None:
    x = mx.arange(4, dtype=mx.float32) + RANK
    want = sum(np.arange(4, dtype=np.float32) + r for r in range(N))
    np.testing.assert_array_equal(np.array(all_sum(x, group=group)), want)
    # all_sum: identity backward; sum_gradients: all-sum backward.
    grad = mx.grad(lambda x: (all_sum(x, group=group) ** 2).sum())(x)
    np.testing.assert_allclose(np.array(grad), 2 * want)
    c = mx.full((4,), float(RANK + 1))
    grad = mx.grad(lambda x: (sum_gradients(group)(x) * c).sum())(x)
    np.testing.assert_allclose(np.array(grad), np.full(4, sum(r + 1 for r in range(N)), np.float32))
    _, tangent = mx.jvp(lambda x: all_sum(x, group=group), [x], [mx.ones(4)])
    np.testing.assert_allclose(np.array(tangent[0]), np.full(4, N, np.float32))


def shard(layer: nn.Module, sharding: str = "all-to-sharded", **kwargs: Any) -> nn.Module:
    return shard_linear(layer, sharding, group=group, **kwargs)


def check_shape_errors() -> None:
    odd = 2 * N + 1
    ShapeError = mlxdist.ShapeError
    expect(ShapeError, lambda: AllToShardedLinear(8, odd, group=group), f"output_dims={odd}", f"{N} ranks")
    expect(ShapeError, lambda: ShardedToAllLinear(odd, 8, group=group), f"input_dims={odd}")
    expect(ShapeError, lambda: shard(linear(8, odd, 1)), "divisible")
    expect(ShapeError, lambda: shard(linear(odd, 8, 1), "sharded-to-all"), "divisible")
    # 3 segments of N + 1 rows: the segments do not divide even when the whole does.
    expect(ShapeError, lambda: shard(linear(8, 3 * (N + 1), 1), segments=3), "segment 0 [0, ")
    if N % 2:
        # Whole groups of a power-of-two size never split into odd shares that are not whole groups.
        return
    # 4-bit row-parallel with (in_dims / N) % group_size != 0.
    misaligned = nn.QuantizedLinear.from_linear(linear(64, 8, 1), 64, 4)
    rule = "(input_dims / N) % group_size"
    expect(ShapeError, lambda: shard(misaligned, "sharded-to-all"), "group_size=64", rule)
    expect(ShapeError, lambda: QuantizedShardedToAllLinear(64, 8, group_size=64, group=group), rule)
    mlp = shard_mlp(llama_mlp(64, 64, mx.float32))
    expect(ShapeError, lambda: nn.quantize(mlp, group_size=64, bits=4), "group_size=64")


def check_compiled_stack() -> None:
    """A column/row/column/row stack under mx.compile: the forward, and the
    compiled gradients, equal the unsharded model's."""
    dims = [(12, 8 * N), (8 * N, 10), (10, 4 * N), (4 * N, 6)]
    full = Stack([linear(i, o, seed=90 + k) for k, (i, o) in enumerate(dims)])
    shardings = ["all-to-sharded", "sharded-to-all"] * 2
    sharded = Stack([shard_linear(l, s, group=group) for l, s in zip(full.layers, shardings)])
    x = inputs((5, 12), 95)
    target = inputs((5, 6), 96)

    def loss(model: nn.Module, x: mx.array) -> mx.array:
        return ((model(x) - target) ** 2).mean()

    forward = mx.compile(lambda x: sharded(x))
    assert_close(forward(x), full(x), mx.float32, "compiled forward")
    assert_close(forward(x * 2), full(x * 2), mx.float32, "compiled forward, second call")
    grad_input = mx.compile(mx.grad(lambda x: loss(sharded, x)))
    assert_close(grad_input(x), mx.grad(lambda x: loss(full, x))(x), mx.float32, "compiled d input", GRAD_TOLERANCE)
    value_and_grad = nn.value_and_grad(sharded, loss)
    step = mx.compile(lambda x: value_and_grad(sharded, x), inputs=sharded.state)
    got_loss, got_grads = step(x)
    want_loss, want_grads = nn.value_and_grad(full, loss)(full, x)
    assert_close(got_loss, want_loss, mx.float32, "compiled loss", GRAD_TOLERANCE)
    for k, sharding in enumerate(shardings):
        axis = 0 if sharding == "all-to-sharded" else 1
        got, want = got_grads["layers"][k]["weight"], shard_of(want_grads["layers"][k]["weight"], axis)
        assert_close(got, want, mx.float32, f"compiled d weight {k}", GRAD_TOLERANCE)


def check_argument_errors() -> None:
    InvalidArgumentError = mlxdist.InvalidArgumentError
    expect(InvalidArgumentError, lambda: shard(linear(8, 4 * N, 1), segments=5), "segments=5")
    for bad in ([8, 4], [0.5, 2], "qkv", 0, [0.25, 1.5], [0, 4]):
        expect(InvalidArgumentError, lambda: shard(linear(8, 4 * N, 1), segments=bad), "segments")
    expect(InvalidArgumentError, lambda: shard(linear(8, 8, 1), "column"), "all-to-sharded")
    expect(InvalidArgumentError, lambda: shard_inplace(linear(8, 8, 1), lambda p, w: 2, group=group), "axis 2")
    expect(InvalidArgumentError, lambda: shard_inplace(linear(8, 8, 1), lambda p, w: 0, segments=2, group=group))
    expect(InvalidArgumentError, lambda: QuantizedAllToShardedLinear(64, 4 * N, mode="nope", group=group), "nope")
    expect(InvalidArgumentError, lambda: QuantizedAllToShardedLinear(64, 4 * N, bits=0, group=group), "bits")
    expect(InvalidArgumentError, lambda: AllToShardedLinear(0, 4, group=group), "input_dims")


def check_type_errors() -> None:
    TypeError = mlxdist.ArgumentTypeError  # a TypeError and a DistributedError
    expect(TypeError, lambda: shard(nn.Conv2d(3, 4, 3)), "Conv2d")
    expect(TypeError, lambda: shard(shard(linear(8, 4 * N, 1))), "already sharded")
    expect(TypeError, lambda: AllToShardedLinear.from_linear(nn.Embedding(4, 8), group=group), "Embedding")
    expect(TypeError, lambda: QuantizedAllToShardedLinear.from_quantized_linear(linear(8, 8, 1), group=group),
           "QuantizedLinear")
    expect(TypeError, lambda: shard_linear(linear(8, 8, 1), "all-to-sharded", group=mx.distributed.init()),
           "mlxdist.Group")
    expect(TypeError, lambda: shard_inplace(linear(8, 8, 1), lambda p, w: "rows", group=group), "'weight'")


def check_probe(quantizations: list[tuple[str, int, int]]) -> None:
    assert ("affine", 4, 64) in quantizations, f"the probe found only {quantizations}"


def main() -> int:
    quantizations = supported_quantizations()
    check("probe", lambda: check_probe(quantizations))
    for dtype in DTYPES:
        check(f"single layers {dtype}", lambda: check_single_layers(dtype))
        check(f"stack {dtype}", lambda: check_stack(dtype))
        check(f"llama mlp {dtype}", lambda: check_mlp(dtype))
    for mode, bits, group_size in quantizations:
        check(f"quantized {mode}/{bits}/{group_size}",
              lambda: check_quantized(mode, bits, group_size, mx.float32))
    for mode in sorted({mode for mode, _, _ in quantizations}):
        spec = quantization_spec(None, None, mode)
        for dtype in (mx.float16, mx.bfloat16):
            check(f"quantized {mode} {dtype}",
                  lambda: check_quantized(mode, spec.bits, spec.group_size, dtype))
    check("quantized mlp", check_quantized_mlp)
    check("quantized constructors", check_quantized_constructors)
    check("constructors", check_constructors)
    check("segments", check_segments)
    check("conv shard_inplace", check_conv_shard_inplace)
    check("shard_inplace strings", check_shard_inplace_strings)
    check("module behaviour", check_module_behaviour)
    check("functional", check_functional)
    check("shape errors", check_shape_errors)
    check("compiled stack", check_compiled_stack)
    check("argument errors", check_argument_errors)
    check("type errors", check_type_errors)
    for name, fn in uneven_checks(group) + expert_checks(group):
        check(name, fn)
    group.barrier()
    if failures:
        summary = f"rank {RANK}: {len(failures)} checks failed: {', '.join(failures)}"
        print(summary, file=sys.stderr, flush=True)
        return 1
    print(f"rank {RANK}/{N}: all checks passed ({len(quantizations)} quantizations)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
