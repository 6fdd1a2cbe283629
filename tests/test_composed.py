"""broadcast, gather, scatter, all_to_all and the object collectives
(tests/suites/composed.py) on the size-1 world; the launched sizes run in
test_collectives.py's jobs (2 and 4 ranks beside the battery, 3 alone)."""

from __future__ import annotations

import mlxdist
from suites import composed
from support import run_here


def test_composed_on_size_one_world():
    group = mlxdist.init()
    assert group.size() == 1
    checks = run_here(composed.run, group)
    assert checks.count > 200
    assert not checks.failures, "\n".join(checks.failures[:20])
