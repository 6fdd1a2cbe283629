"""Worker: average_gradients and clip_grad_norm_sharded on every rank, checked
against numpy references built from every rank's inputs (each rank can
regenerate them all from their seeds) and against mlx's own average_gradients.

Exits non-zero (an assertion) on the first mismatch.
"""

from __future__ import annotations

from collections import namedtuple
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn.utils
import mlx.optimizers
import numpy as np
from mlx.utils import tree_flatten, tree_map

import mlxdist
from mlxdist.group import Group
from mlxdist.nn.gradients import average_gradients, clip_grad_norm_sharded

BFLOAT16_EPS = 2.0**-8
FLOAT16_EPS = 2.0**-11
FLOAT32_EPS = 2.0**-24
EPS = {
    mx.float32: FLOAT32_EPS,
    mx.float16: FLOAT16_EPS,
    mx.bfloat16: BFLOAT16_EPS,
    mx.float64: 2.0**-53,
}

Pair = namedtuple("Pair", ["weight", "bias"])


@contextmanager
def wire_log() -> Iterator[list[tuple[str, int]]]:
    """Record (dtype name, bytes) of every Group.all_sum call made inside."""
    calls: list[tuple[str, int]] = []
    original = Group.all_sum

    def counting(self: Group, x: Any, *, stream: Any = None, out: Any = None) -> Any:
        calls.append((str(x.dtype).removeprefix("mlx.core."), x.nbytes))
        return original(self, x, stream=stream, out=out)

    Group.all_sum = counting
    try:
        yield calls
    finally:
        Group.all_sum = original


def as_f64(x: mx.array) -> np.ndarray:
    """An mlx array of any float dtype as a float64 numpy array."""
    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x).astype(np.float64)


def random_tree(rank: int, build: Callable[[np.random.Generator], Any]) -> Any:
    """Rank ``rank``'s tree from ``build``, seeded by the rank (any rank can rebuild it)."""
    return build(np.random.default_rng(1000 + rank))


def rank_mean(
    size: int, build: Callable[[np.random.Generator], Any]
) -> list[tuple[np.ndarray, float]]:
    """Each leaf's exact mean over ranks (float64), from every rank's tree, with the
    largest magnitude any rank's leaf holds (the scale of the rounding errors)."""
    flats = [[as_f64(v) for _, v in tree_flatten(random_tree(r, build))] for r in range(size)]
    return [
        (np.mean(np.stack(column), axis=0), max(float(np.abs(c).max(initial=0.0)) for c in column))
        for column in zip(*flats)
    ]


def assert_close(
    result: Any, expected: list[tuple[np.ndarray, float]], template: Any, rel: float
) -> None:
    """Same structure, shapes and dtypes as ``template``; values within rel * scale."""
    flat_result, flat_template = tree_flatten(result), tree_flatten(template)
    assert [k for k, _ in flat_result] == [k for k, _ in flat_template]
    assert type(result) is type(template)
    for (key, got), (_, like), (want, scale) in zip(flat_result, flat_template, expected):
        assert got.shape == like.shape and got.dtype == like.dtype, (key, got.shape, got.dtype)
        err = float(np.abs(as_f64(got) - want).max(initial=0.0))
        assert err <= rel * max(scale, 1e-30), f"{key}: error {err} > {rel} * {scale}"


def float32_leaves(rng: np.random.Generator) -> list[mx.array]:
    """Ten float32 arrays of ten elements (400 bytes)."""
    return [mx.array(rng.standard_normal(10).astype(np.float32)) for _ in range(10)]


def check_bucket_counts(size: int) -> None:
    """One all-reduce per bucket: 1 by default, 2 at 200 bytes, 10 at 0."""
    expected = rank_mean(size, float32_leaves)
    for limit, calls in ((None, 1), (200, 2), (0, 10)):
        tree = random_tree(mlxdist.world().rank(), float32_leaves)
        kwargs = {} if limit is None else {"all_reduce_size": limit}
        with wire_log() as log:
            result = average_gradients(tree, **kwargs)
        assert len(log) == calls, (limit, log)
        assert sum(nbytes for _, nbytes in log) == 400, log
        assert_close(result, expected, tree, 4 * FLOAT32_EPS * size)


def nested_tree(rng: np.random.Generator) -> Any:
    """Dicts, lists, tuples and a named tuple; strided, scalar, empty and lazy leaves."""
    def f32(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    return {
        "blocks": [
            {"attn": Pair(f32(4, 6), f32(6)), "norm": (f32(6),)},
            {"attn": Pair(f32(6, 4).T, f32(6)), "norm": (f32(),)},  # transposed: strided
        ],
        "empty": f32(0, 3),
        "lazy": f32(3, 3) * 2 + 1,
        "big": f32(300),
    }


def check_structure(size: int) -> None:
    """Structure, shapes and dtypes come back; values are the mean over ranks."""
    expected = rank_mean(size, nested_tree)
    rank = mlxdist.world().rank()
    for limit in (64, 0, 10**9):
        tree = random_tree(rank, nested_tree)
        result = average_gradients(tree, group=mlxdist.world(), all_reduce_size=limit)
        assert isinstance(result["blocks"][0]["attn"], Pair)
        assert isinstance(result["blocks"][1]["norm"], tuple)
        assert result["empty"].shape == (0, 3)
        assert_close(result, expected, tree, 4 * FLOAT32_EPS * size)
    # A second call with other values and the same layout reuses the buffers.
    shifted = tree_map(lambda x: x + 3, random_tree(rank, nested_tree))
    shifted_expected = [(mean + 3, scale + 3) for mean, scale in expected]
    assert_close(average_gradients(shifted), shifted_expected, shifted, 8 * FLOAT32_EPS * size)


def mixed_tree(rng: np.random.Generator) -> list[mx.array]:
    """Float32, float16, bfloat16 and float64 leaves, interleaved."""
    dtypes = [mx.float32, mx.float16, mx.bfloat16, mx.float64] * 3
    return [
        mx.array(rng.standard_normal(5 + i).astype(np.float32)).astype(dtype)
        for i, dtype in enumerate(dtypes)
    ]


def check_mixed_dtypes(size: int) -> None:
    """One bucket per dtype, each summed in its own dtype; or all upcast to float32."""
    rank = mlxdist.world().rank()
    tree = random_tree(rank, mixed_tree)
    expected = rank_mean(size, mixed_tree)
    with wire_log() as log:
        result = average_gradients(tree)
    assert len(log) == 4, log  # one bucket per dtype
    wire_codes = {code for code, _ in log}
    assert wire_codes == {"float32", "float16", "bfloat16", "float64"}
    for got, want, leaf in zip(result, expected, tree):  # the wire sums in each leaf's dtype
        assert_close([got], [want], [leaf], 2 * EPS[leaf.dtype] * size)
    with wire_log() as log:
        result = average_gradients(tree, all_reduce_size=0)
    assert len(log) == len(tree), log
    # Sent as float32, every leaf is summed in float32 and rounded once to its dtype.
    with wire_log() as log:
        upcast = average_gradients(tree, communication_type=mx.float32)
    assert log == [("float32", 4 * sum(leaf.size for leaf in tree))], log
    for got, want, leaf in zip(upcast, expected, tree):
        assert_close([got], [want], [leaf], 2 * max(EPS[leaf.dtype], FLOAT32_EPS) * size)


def check_cast_on_wire(size: int) -> None:
    """float32 leaves sent as bfloat16 or float16: half the bytes, within their rounding."""
    rank = mlxdist.world().rank()
    tree = random_tree(rank, float32_leaves)
    expected = rank_mean(size, float32_leaves)
    for wire, code, eps in (
        (mx.bfloat16, "bfloat16", BFLOAT16_EPS),
        ("float16", "float16", FLOAT16_EPS),
    ):
        with wire_log() as log:
            result = average_gradients(tree, communication_type=wire)
        assert log == [(code, 200)], log  # half of the 400 float32 bytes
        assert_close(result, expected, tree, 2 * eps * size)
        exact = max(float(np.abs(as_f64(g) - mean).max()) for g, (mean, _) in zip(result, expected))
        assert exact > 0, "a cast on the wire left no rounding: was it sent as float32?"


def check_against_mlx(size: int, backend: str) -> None:
    """mlx's own average_gradients over mx.distributed, on the same process-wide group."""
    tree = random_tree(mlxdist.world().rank(), nested_tree)
    ours = average_gradients(tree, all_reduce_size=256)
    theirs = mlx.nn.utils.average_gradients(tree, group=mx.distributed.init(backend=backend))
    scales = [scale for _, scale in rank_mean(size, nested_tree)]
    anchor = [(as_f64(v), scale) for (_, v), scale in zip(tree_flatten(theirs), scales)]
    # Both sum in float32, in orders that may differ (ring reduces by segment).
    assert_close(ours, anchor, tree, 8 * FLOAT32_EPS * size)


def shard_tree(rng: np.random.Generator) -> dict[str, mx.array]:
    """One rank's shard: rows of a weight and of a bias."""
    return {
        "w": mx.array(rng.standard_normal((3, 4)).astype(np.float32)),
        "b": mx.array(rng.standard_normal((2,)).astype(np.float32)),
    }


def check_clip(size: int) -> None:
    """Against mlx's clip_grad_norm on the concatenated shards, computed on every rank."""
    rank = mlxdist.world().rank()
    shards = [random_tree(r, shard_tree) for r in range(size)]
    full = {k: mx.concatenate([s[k] for s in shards]) for k in shards[0]}
    for max_norm in (0.5, 1e6):
        clipped, norm = clip_grad_norm_sharded(shards[rank], max_norm)
        want_clipped, want_norm = mlx.optimizers.clip_grad_norm(full, max_norm)
        assert norm.shape == () and abs(norm.item() - want_norm.item()) <= 1e-5 * want_norm.item()
        for key, leaf in shards[rank].items():
            rows = leaf.shape[0]
            want = np.array(want_clipped[key][rank * rows : (rank + 1) * rows])
            assert clipped[key].dtype == leaf.dtype and clipped[key].shape == leaf.shape
            assert np.allclose(np.array(clipped[key]), want, rtol=1e-5, atol=1e-6), key
    # Low-precision shards keep their dtype; their squares are summed in float32.
    low = {k: v.astype(mx.bfloat16) for k, v in shards[rank].items()}
    clipped, norm = clip_grad_norm_sharded(low, 0.5)
    squares = sum(np.sum(as_f64(v.astype(mx.bfloat16)) ** 2) for s in shards for v in s.values())
    assert abs(norm.item() - np.sqrt(squares)) <= 1e-5 * np.sqrt(squares), (norm.item(), squares)
    for key, leaf in low.items():
        want = as_f64(leaf) * 0.5 / (np.sqrt(squares) + 1e-6)
        assert clipped[key].dtype == mx.bfloat16
        assert np.allclose(as_f64(clipped[key]), want, rtol=BFLOAT16_EPS, atol=1e-7), key
    # A rank holding an empty shard still joins the sum.
    own = shards[rank] if rank == 0 else {}
    _, norm = clip_grad_norm_sharded(own, 1.0)
    want_norm = float(np.sqrt(sum(np.sum(as_f64(v) ** 2) for v in shards[0].values())))
    assert abs(norm.item() - want_norm) <= 1e-5 * want_norm, (norm.item(), want_norm)


def main() -> None:
    """Run every check on this rank."""
    group = mlxdist.init()
    assert group.size() > 1, "launch this worker with at least 2 ranks"
    backend = group.backend.value
    check_bucket_counts(group.size())
    check_structure(group.size())
    check_mixed_dtypes(group.size())
    check_cast_on_wire(group.size())
    check_against_mlx(group.size(), backend)
    check_clip(group.size())
    print(f"grad_ops rank {group.rank()}/{group.size()} {backend}: ok", flush=True)


if __name__ == "__main__":
    main()
