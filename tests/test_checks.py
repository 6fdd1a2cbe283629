"""The check harness itself (tests/support/checks.py): a check that cannot fail proves nothing."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import mlxdist
from support import Checks


def test_expect_equal_refuses_a_wrong_dtype_shape_or_value():
    c = Checks(mlxdist.init(), suite="harness")
    ints = np.array([1, 2], np.int32)
    assert c.expect_equal("same", ints.copy(), ints)
    assert c.expect_equal("a list of ints fits int32", ints, [1, 2])
    assert c.expect_equal("mlx and numpy dtypes compare by name", mx.array(ints), ints)
    assert c.expect_equal("bfloat16 named", mx.array([1.0, 2.0], mx.bfloat16), np.array([1, 2], np.float32),
                          dtype=mx.bfloat16)
    wrong = [
        c.expect_equal("float result, int reference", ints.astype(np.float32), ints),
        c.expect_equal("int64 result, int32 reference", ints.astype(np.int64), ints),
        c.expect_equal("float result, list of ints", ints.astype(np.float32), [1, 2]),
        c.expect_equal("int result, list of halves", ints, [1.5, 2.5]),
        c.expect_equal("bfloat16 result, float32 reference", mx.array(ints, mx.bfloat16), ints.astype(np.float32)),
        c.expect_equal("shape", ints[None], ints),
        c.expect_equal("values", ints + 1, ints),
        c.expect_equal("dtype= given", ints, ints, dtype=np.int64),
    ]
    assert wrong == [False] * len(wrong)
    assert c.count == 4 + len(wrong) and len(c.failures) == len(wrong)
