"""Checks for tests/workers/nn_layers.py: tensor-parallel layers whose shards differ in size per rank.

Each check builds the unsharded layers from shared seeds on every rank, shards
them with per-rank ``sizes`` (or overlapping column ``ranges``), and compares
this rank's forward output and gradients with the unsharded computation's
(its slice of them), eagerly and under ``mx.compile``, float and quantized.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlxdist
from mlxdist.nn import QuantizedShardedToAllLinear, shard_inplace, shard_linear, split_sizes

RTOL, ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL = 2e-4, 2e-5


def _close(got: mx.array, want: mx.array, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=rtol, atol=atol, err_msg=what)


def _linear(input_dims: int, output_dims: int, seed: int, bias: bool = True) -> nn.Linear:
    mx.random.seed(seed)
    return nn.Linear(input_dims, output_dims, bias=bias)


def _normal(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed))


def _span(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _expect(error: type[BaseException], fn: Callable[[], Any], *fragments: str) -> None:
    try:
        fn()
    except error as exc:
        for fragment in fragments:
            assert fragment in str(exc), f"{error.__name__} message lacks {fragment!r}: {exc}"
        return
    raise AssertionError(f"expected {error.__name__}")


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = nn.gelu(x)
        return x


def checks(group: mlxdist.Group) -> list[tuple[str, Callable[[], None]]]:
    """The uneven-shard checks, in the order every rank runs them."""
    n, rank = group.size(), group.rank()
    odd = 3 * n + 1  # divisible by no group size > 1
    weighted = list(range(n, 0, -1))  # rank 0 the largest share

    def single_layers() -> None:
        for bias in (True, False):
            for sizes in (split_sizes(odd, n), split_sizes(6 * n, weighted)):
                full = _linear(24, sum(sizes), seed=101, bias=bias)
                x = _normal((2, 3, 24), 102)
                column = shard_linear(full, "all-to-sharded", sizes=sizes, group=group)
                assert column.output_dims == sum(sizes) and column.weight.shape[0] == sizes[rank]
                _close(column(x), full(x)[..., _span(sizes, rank)], f"column sizes={sizes} bias={bias}")
                full = _linear(sum(sizes), 10, seed=103, bias=bias)
                h = _normal((2, 3, sum(sizes)), 104)
                row = shard_linear(full, "sharded-to-all", sizes=sizes, group=group)
                assert row.input_dims == sum(sizes) and row.local_input_dims == sizes[rank]
                _close(row(h[..., _span(sizes, rank)]), full(h), f"row sizes={sizes} bias={bias}")

    def overlapping_columns() -> None:
        # A key/value projection of 2 heads of 4: every rank holds head 0, rank r also head r % 2.
        full = _linear(16, 8, seed=105)
        ranges = [[(0, 4), (4 * (r % 2), 4 * (r % 2) + 4)] for r in range(n)]
        layer = shard_linear(full, "all-to-sharded", ranges=ranges, group=group)
        x = _normal((3, 16), 106)
        want = full(x)
        mine = 4 * (rank % 2)
        expected = mx.concatenate([want[:, :4], want[:, mine : mine + 4]], axis=-1)
        _close(layer(x), expected, "overlapping ranges")

    def quantized_layers() -> None:
        group_size = 32
        inputs = group_size * (2 * n + 1)
        for sizes in (split_sizes(inputs, n, group_size), split_sizes(inputs, weighted, group_size)):
            quantized = nn.QuantizedLinear.from_linear(_linear(inputs, odd, seed=107), group_size, 4)
            x = _normal((3, inputs), 108)
            want = quantized(x)
            rows = split_sizes(odd, n)
            column = shard_linear(quantized, "all-to-sharded", sizes=rows, group=group)
            _close(column(x), want[:, _span(rows, rank)], f"quantized column sizes={rows}")
            row = shard_linear(quantized, "sharded-to-all", sizes=sizes, group=group)
            assert isinstance(row, QuantizedShardedToAllLinear) and row.input_dims == inputs
            _close(row(x[:, _span(sizes, rank)]), want, f"quantized row sizes={sizes}")
            inplace = nn.QuantizedLinear.from_linear(_linear(inputs, odd, seed=107), group_size, 4)
            shard_inplace(inplace, "sharded-to-all", sizes=sizes, group=group)
            for name in ("weight", "scales", "biases"):
                assert mx.array_equal(inplace[name], row[name]), f"shard_inplace sizes {name}"

    def stack_gradients(compiled: bool) -> None:
        first, second = split_sizes(odd, n), split_sizes(5 * n, weighted)
        dims = [(12, odd), (odd, 10), (10, 5 * n), (5 * n, 6)]
        full = _Stack([_linear(i, o, seed=110 + k) for k, (i, o) in enumerate(dims)])
        plan = [("all-to-sharded", first), ("sharded-to-all", first)]
        plan += [("all-to-sharded", second), ("sharded-to-all", second)]
        sharded = _Stack([shard_linear(l, s, sizes=z, group=group) for l, (s, z) in zip(full.layers, plan)])
        x, target = _normal((5, 12), 115), _normal((5, 6), 116)

        def loss(model: nn.Module, x: mx.array) -> mx.array:
            return ((model(x) - target) ** 2).mean()

        value_and_grad = nn.value_and_grad(sharded, loss)
        step = (lambda x: value_and_grad(sharded, x))
        forward = lambda x: sharded(x)  # noqa: E731
        grad_input = mx.grad(lambda x: loss(sharded, x))
        if compiled:
            step = mx.compile(step, inputs=sharded.state)
            forward, grad_input = mx.compile(forward), mx.compile(grad_input)
        what = "compiled " if compiled else ""
        _close(forward(x), full(x), f"{what}uneven stack forward")
        want_dx = mx.grad(lambda x: loss(full, x))(x)
        _close(grad_input(x), want_dx, f"{what}uneven stack d input", GRAD_RTOL, GRAD_ATOL)
        got_loss, got_grads = step(x)
        want_loss, want_grads = nn.value_and_grad(full, loss)(full, x)
        _close(got_loss, want_loss, f"{what}uneven stack loss", GRAD_RTOL, GRAD_ATOL)
        for k, (sharding, sizes) in enumerate(plan):
            got, want = got_grads["layers"][k], want_grads["layers"][k]
            part = _span(sizes, rank)
            if sharding == "all-to-sharded":
                _close(got["weight"], want["weight"][part], f"{what}d weight {k}", GRAD_RTOL, GRAD_ATOL)
                _close(got["bias"], want["bias"][part], f"{what}d bias {k}", GRAD_RTOL, GRAD_ATOL)
            else:
                _close(got["weight"], want["weight"][:, part], f"{what}d weight {k}", GRAD_RTOL, GRAD_ATOL)
                _close(got["bias"], want["bias"], f"{what}d bias {k}", GRAD_RTOL, GRAD_ATOL)

    def quantized_gradients() -> None:
        group_size = 32
        hidden = group_size * (2 * n + 1)
        sizes = split_sizes(hidden, weighted, group_size)
        full = _Stack([
            nn.QuantizedLinear.from_linear(_linear(32, hidden, seed=120), 32, 4),
            nn.QuantizedLinear.from_linear(_linear(hidden, 8, seed=121), group_size, 4),
        ])
        sharded = _Stack([
            shard_linear(full.layers[0], "all-to-sharded", sizes=sizes, group=group),
            shard_linear(full.layers[1], "sharded-to-all", sizes=sizes, group=group),
        ])
        x = _normal((4, 32), 122)

        def loss(model: nn.Module, x: mx.array) -> mx.array:
            return (model(x) ** 2).mean()

        want = mx.grad(lambda x: loss(full, x))(x)
        for compiled in (False, True):
            grad = mx.grad(lambda x: loss(sharded, x))
            grad = mx.compile(grad) if compiled else grad
            _close(grad(x), want, f"quantized uneven d input (compiled={compiled})", GRAD_RTOL, GRAD_ATOL)

    def errors() -> None:
        shape, invalid = mlxdist.ShapeError, mlxdist.InvalidArgumentError
        full = _linear(8, odd, seed=130)
        _expect(shape, lambda: shard_linear(full, "all-to-sharded", sizes=[1] * n, group=group), "add up to")
        one_size = [odd]
        _expect(invalid, lambda: shard_linear(full, "all-to-sharded", sizes=one_size, group=group), "positive")
        both = dict(sizes=split_sizes(odd, n), ranges=[[(0, 1)]] * n)
        _expect(invalid, lambda: shard_linear(full, "all-to-sharded", group=group, **both), "not both")
        overlapping = [[(0, odd)]] * n
        row = _linear(odd, 4, seed=131)
        _expect(shape, lambda: shard_linear(row, "sharded-to-all", ranges=overlapping, group=group), "once")
        quantized = nn.QuantizedLinear.from_linear(_linear(64 * n, 4, seed=132), 32, 4)
        misaligned = [64 * n - 16 * (n - 1)] + [16] * (n - 1)
        _expect(shape, lambda: shard_linear(quantized, "sharded-to-all", sizes=misaligned, group=group),
                "group_size=32")
        _expect(shape, lambda: split_sizes(n - 1, n), f"{n} ranks")

    return [
        ("uneven single layers", single_layers),
        ("uneven overlapping columns", overlapping_columns),
        ("uneven quantized layers", quantized_layers),
        ("uneven stack gradients", lambda: stack_gradients(False)),
        ("uneven compiled stack gradients", lambda: stack_gradients(True)),
        ("uneven quantized gradients", quantized_gradients),
        ("uneven errors", errors),
    ]
