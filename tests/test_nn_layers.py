"""mlxdist.nn's tensor-parallel layers.

On real ranks (2 of ring and MPI, 3 of ring, 4 of MPI) tests/workers/nn_layers.py checks every
layer, quantization mode, sharding function and error against unsharded
layers computed in the same worker, and mlx-lm MoE blocks through MoEAllSum
(tests/workers/nn_experts.py: TP and EP, both dispatch paths). In this process, on the size-1 world:
the layers equal MLX's unsharded ones, the slicing arithmetic against numpy,
and the errors that need no peers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxdist
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
from mlxdist.nn.slicing import parse_rule, physical_ranges, predicate_for, rank_ranges, segment_bounds

from support.shared import worker_output

CANDIDATE_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


@pytest.mark.parametrize(("backend", "n"), [("ring", 2), ("mpi", 2), ("ring", 3), ("mpi", 4)])
def test_layers_on_ranks(n: int, backend: str) -> None:
    """Every multi-rank check, for one (ranks, backend) configuration (in the launch it
    shares with the gradient workers, tests/support/shared.py)."""
    output = worker_output("nn_layers.py", n, backend)
    passed = [line for line in output if "all checks passed" in line]
    assert len(passed) == n, "".join(output[-40:])


@pytest.fixture(scope="module")
def solo() -> mlxdist.Group:
    group = mlxdist.world()
    assert group.size() == 1, "these tests run in the unlaunched pytest process"
    return group


def modes_mlx_supports() -> list[str]:
    """The candidate modes this MLX build quantizes with its defaults."""
    found = []
    for mode in CANDIDATE_MODES:
        try:
            mx.eval(mx.quantize(mx.ones((2, 512)), mode=mode))
        except ValueError:
            continue
        found.append(mode)
    return found


def test_probe_finds_affine() -> None:
    assert "affine" in modes_mlx_supports()


def test_size_one_layers_equal_linear(solo: mlxdist.Group) -> None:
    mx.random.seed(1)
    full = nn.Linear(16, 12)
    x = mx.random.normal((3, 16))
    for sharding in ("all-to-sharded", "sharded-to-all"):
        layer = shard_linear(full, sharding, group=solo)
        assert mx.array_equal(layer.weight, full.weight) and mx.array_equal(layer.bias, full.bias)
        np.testing.assert_allclose(np.array(layer(x)), np.array(full(x)), rtol=1e-6, atol=1e-6)
        # A single process communicates nothing, so the layer compiles.
        np.testing.assert_allclose(np.array(mx.compile(layer)(x)), np.array(full(x)), rtol=1e-6, atol=1e-6)
        assert layer.input_dims == 16 and layer.output_dims == 12


@pytest.mark.parametrize("mode", modes_mlx_supports())
def test_size_one_quantized_equals_quantized_linear(solo: mlxdist.Group, mode: str) -> None:
    mx.random.seed(2)
    quantized = nn.QuantizedLinear.from_linear(nn.Linear(256, 8), mode=mode)
    x = mx.random.normal((2, 256))
    kinds = {"all-to-sharded": QuantizedAllToShardedLinear, "sharded-to-all": QuantizedShardedToAllLinear}
    for sharding, kind in kinds.items():
        layer = shard_linear(quantized, sharding, group=solo)
        assert isinstance(layer, kind) and layer.trainable_parameters() == {}
        assert (layer.group_size, layer.bits, layer.mode) == (quantized.group_size, quantized.bits, mode)
        assert mx.array_equal(layer(x), quantized(x))


@pytest.mark.parametrize("mode", modes_mlx_supports())
def test_quantization_defaults_match_quantized_linear(mode: str) -> None:
    reference = nn.QuantizedLinear(512, 4, mode=mode)
    spec = quantization_spec(None, None, mode)
    assert (spec.group_size, spec.bits, spec.mode) == (reference.group_size, reference.bits, mode)
    assert spec.has_biases == ("biases" in reference)


def test_to_quantized_matches_nn_quantize(solo: mlxdist.Group) -> None:
    mx.random.seed(3)
    full = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64))
    sharded = nn.Sequential(shard_linear(full.layers[0], "all-to-sharded", group=solo),
                            shard_linear(full.layers[1], "sharded-to-all", group=solo))
    nn.quantize(full, group_size=32, bits=4)
    nn.quantize(sharded, group_size=32, bits=4)
    assert isinstance(sharded.layers[0], QuantizedAllToShardedLinear)
    x = mx.random.normal((2, 64))
    assert mx.array_equal(sharded(x), full(x))


def test_constructor_key_gives_the_global_matrix(solo: mlxdist.Group) -> None:
    want = global_linear_parameters(6, 4, True, mx.random.key(9))
    for kind in (AllToShardedLinear, ShardedToAllLinear):
        layer = kind(6, 4, group=solo, key=9)
        assert mx.array_equal(layer.weight, want["weight"]) and mx.array_equal(layer.bias, want["bias"])
    scale = 1 / np.sqrt(6)
    weight = np.array(want["weight"])
    assert weight.shape == (4, 6) and np.all(np.abs(weight) <= scale)
    assert "bias" not in AllToShardedLinear(6, 4, bias=False, group=solo)


def test_sum_gradients_is_identity_on_one_process(solo: mlxdist.Group) -> None:
    x = mx.arange(3, dtype=mx.float32)
    assert mx.array_equal(mx.grad(lambda x: (sum_gradients(solo)(x) * x).sum())(x), 2 * x)


def test_segment_bounds() -> None:
    assert segment_bounds(1, 12) == [0, 12]
    assert segment_bounds(3, 12) == [0, 4, 8, 12]
    assert segment_bounds([4, 10], 12) == [0, 4, 10, 12]
    # 1/3 of 96 is 31.99... in floating point: fractions round to the nearest index.
    assert segment_bounds([1 / 3, 2 / 3], 96) == [0, 32, 64, 96]
    assert segment_bounds([], 12) == [0, 12]
    for bad in (0, -1, 5, [4, 4], [10, 4], [0, 4], [4, 12], [0.5, 2], [0.0], [1.0], "qkv", 2.5, True, None):
        with pytest.raises(mlxdist.InvalidArgumentError, match="segments"):
            segment_bounds(bad, 12)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_rank_ranges_match_numpy_split(size: int) -> None:
    bounds = [0, 8, 20, 32]
    data = np.arange(32)
    pieces = [np.split(data[a:b], size) for a, b in zip(bounds, bounds[1:])]
    for rank in range(size):
        got = np.concatenate([data[a:b] for a, b in rank_ranges(bounds, size, rank, "w")])
        want = np.concatenate([segment[rank] for segment in pieces])
        np.testing.assert_array_equal(got, want)


def test_rank_ranges_name_the_indivisible_segment() -> None:
    with pytest.raises(mlxdist.ShapeError, match=r"segment 0 \[0, 8\) of length 8 is not divisible by 3"):
        rank_ranges([0, 8, 20, 32], 3, 0, "w")
    with pytest.raises(mlxdist.ShapeError, match="length 9 is not divisible by 2"):
        rank_ranges([0, 9], 2, 0, "w")


def test_physical_ranges_of_packed_arrays() -> None:
    # 4-bit weights, 8 per uint32 word; group_size 32: one scale per 32 inputs.
    assert physical_ranges([(32, 64)], 512 // 8, 512, "w") == [(4, 8)]
    assert physical_ranges([(32, 64)], 512 // 32, 512, "scales") == [(1, 2)]
    with pytest.raises(mlxdist.ShapeError, match="quantization group"):
        physical_ranges([(16, 48)], 512 // 32, 512, "scales")


def test_predicates_and_rules() -> None:
    column, row = predicate_for("all-to-sharded", 3), predicate_for("sharded-to-all")
    weight, experts, bias = mx.zeros((4, 8)), mx.zeros((2, 4, 8)), mx.zeros((4,))
    assert column("l.weight", weight) == (0, 3) and column("l.weight", experts) == (1, 3)
    assert column("l.bias", bias) == (-1, 3) and column("l.biases", weight) == (0, 3)
    assert row("l.bias", bias) is None and row("l.weight", weight) == (-1, 1)
    assert row("l.biases", weight) == (-1, 1)
    assert parse_rule(-1, "w", 2) == (1, 1) and parse_rule(None, "w", 2) is None
    assert parse_rule((0, [2]), "w", 2) == (0, [2])
    with pytest.raises(mlxdist.ArgumentTypeError, match="'w'"):
        parse_rule("rows", "w", 2)
    with pytest.raises(TypeError):
        parse_rule((True, 1), "w", 2)
    with pytest.raises(mlxdist.InvalidArgumentError, match="axis -3"):
        parse_rule(-3, "w", 2)
    with pytest.raises(mlxdist.InvalidArgumentError, match="all-to-sharded"):
        predicate_for("rows")


def test_shard_inplace_on_one_process_keeps_parameters(solo: mlxdist.Group) -> None:
    mx.random.seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    shard_inplace(model, lambda path, w: 0 if path.endswith("weight") else None, group=solo)
    for key, value in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(value), before[key])


def test_errors_without_peers(solo: mlxdist.Group) -> None:
    linear = nn.Linear(8, 8)
    with pytest.raises(mlxdist.ArgumentTypeError, match="Conv1d"):
        shard_linear(nn.Conv1d(2, 2, 3), "all-to-sharded", group=solo)
    with pytest.raises(mlxdist.ArgumentTypeError, match="already sharded"):
        shard_linear(shard_linear(linear, "all-to-sharded", group=solo), "sharded-to-all", group=solo)
    with pytest.raises(mlxdist.InvalidArgumentError, match="sharding"):
        shard_linear(linear, "columns", group=solo)
    with pytest.raises(mlxdist.ArgumentTypeError, match="mlxdist.Group"):
        shard_linear(linear, "all-to-sharded", group=mx.distributed.init())
    with pytest.raises(mlxdist.ArgumentTypeError, match="QuantizedLinear"):
        QuantizedShardedToAllLinear.from_quantized_linear(linear, group=solo)
    with pytest.raises(mlxdist.ArgumentTypeError, match="mlx.nn.Linear"):
        ShardedToAllLinear.from_linear(nn.QuantizedLinear(64, 8), group=solo)
    with pytest.raises(mlxdist.ArgumentTypeError, match="predicate"):
        shard_inplace(linear, 3, group=solo)
    with pytest.raises(mlxdist.InvalidArgumentError, match="segments"):
        shard_inplace(linear, lambda p, w: 0, segments=3, group=solo)
    with pytest.raises(mlxdist.InvalidArgumentError, match="output_dims"):
        AllToShardedLinear(4, 0, group=solo)
    with pytest.raises(mlxdist.ArgumentTypeError, match="key"):
        AllToShardedLinear(4, 4, group=solo, key="seed")
    with pytest.raises(mlxdist.InvalidArgumentError, match="mode='nope'"):
        QuantizedAllToShardedLinear(64, 8, mode="nope", group=solo)
    with pytest.raises(mlxdist.InvalidArgumentError, match="group_size"):
        quantization_spec(-1, 4, "affine")
    with pytest.raises(mlxdist.ShapeError, match="input_dims=48 must be a multiple of group_size=64"):
        QuantizedAllToShardedLinear(48, 8, group=solo)
    with pytest.raises(mlxdist.UnsupportedOperationError, match="quantize_input"):
        shard_linear(linear, "all-to-sharded", group=solo).to_quantized(mode="mxfp8", quantize_input=True)


def test_split_sizes() -> None:
    from mlxdist.nn import split_sizes

    assert split_sizes(8, 2) == [4, 4] and split_sizes(8, 3) == [3, 3, 2]
    assert split_sizes(256, 3, 32) == [96, 96, 64]
    assert split_sizes(6, [2, 1]) == [4, 2] and split_sizes(4, [2, 1]) == [3, 1]
    # Every rank gets at least one unit, however small its weight.
    assert split_sizes(8, [10, 1, 1]) == [6, 1, 1]
    for total, weights, unit in ((97, [3, 1, 2], 1), (640, [1, 1, 1, 1, 5], 32), (7, 7, 1)):
        sizes = split_sizes(total, weights, unit)
        assert sum(sizes) == total and all(s >= unit and s % unit == 0 for s in sizes)
    with pytest.raises(mlxdist.ShapeError, match="3 ranks"):
        split_sizes(64, 3, 32)
    for bad in (dict(weights=[1, 0]), dict(weights=[]), dict(weights=["a"]), dict(unit=0), dict(unit=5)):
        args = {"total": 64, "weights": 2, "unit": 1, **bad}
        with pytest.raises(mlxdist.InvalidArgumentError):
            split_sizes(args["total"], args["weights"], args["unit"])


@pytest.mark.parametrize("size", [2, 3])
def test_uneven_ranges_match_numpy_split(size: int) -> None:
    from mlxdist.nn.shares import uneven_ranges

    bounds, data = [0, 12, 20], np.arange(20)
    sizes = [[5, 4, 3][:size], [3, 3, 2][:size]]
    sizes = [row[:-1] + [length - sum(row[:-1])] for row, length in zip(sizes, (12, 8))]
    for rank in range(size):
        got = np.concatenate([data[a:b] for a, b in uneven_ranges(bounds, sizes, size, rank, "w")])
        cuts = [np.split(data[a:b], np.cumsum(row)[:-1])[rank] for (a, b), row in zip([(0, 12), (12, 20)], sizes)]
        np.testing.assert_array_equal(got, np.concatenate(cuts))
    with pytest.raises(mlxdist.ShapeError, match="add up to"):
        uneven_ranges([0, 12], [1] * size, size, 0, "w")


def test_size_one_sizes_and_ranges(solo: mlxdist.Group) -> None:
    full = nn.Linear(8, 6)
    x = mx.random.normal((2, 8))
    column = shard_linear(full, "all-to-sharded", sizes=[6], group=solo)
    assert mx.array_equal(column(x), full(x)) and column.output_dims == 6
    # A replicated block: rows 0-1 twice, then 4-5.
    repeated = shard_linear(full, "all-to-sharded", ranges=[[(0, 2), (0, 2), (4, 6)]], group=solo)
    want = full(x)
    assert mx.array_equal(repeated(x), mx.concatenate([want[:, :2], want[:, :2], want[:, 4:]], axis=-1))
    with pytest.raises(mlxdist.ShapeError, match="exactly once"):
        shard_linear(nn.Linear(6, 2), "sharded-to-all", ranges=[[(0, 4), (2, 6)]], group=solo)
