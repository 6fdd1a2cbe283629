"""One rank of the shared battery (tests/battery.py): BACKEND SIZE thorough|core.

Exits non-zero on any mismatch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxdist  # noqa: E402
from battery import run_battery  # noqa: E402

group = mlxdist.init(sys.argv[1], strict=True)
assert group.size == int(sys.argv[2]), (group.size, sys.argv[2])
battery = run_battery(group, thorough=sys.argv[3] == "thorough")
group.barrier()
for failure in battery.failures:
    print("FAIL", failure)
print(f"rank {group.rank}: {battery.checks} checks, {len(battery.failures)} failures")
sys.exit(1 if battery.failures else 0)
