"""One rank of a launched check run: ``worker.py [key=value ...] MODULE:FUNCTION ...``.

Joins the launched world (strict: a rank that formed no world fails), runs
each suite (a function of :class:`support.checks.Checks`, in a module under
tests/) in order with a barrier after each, prints every failure and one
summary line per suite, and exits 1 if any check failed or a suite raised.
``size=N`` makes the worker check that the world has N ranks.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/

import mlxdist  # noqa: E402
from support.checks import Checks  # noqa: E402


def main(argv: list[str]) -> int:
    """Run the suites named in ``argv``; the process's exit status."""
    options = dict(word.split("=", 1) for word in argv if "=" in word)
    targets = [word for word in argv if "=" not in word]
    group = mlxdist.init(strict=True)
    if "size" in options and group.size() != int(options["size"]):
        print(f"FAIL world has {group.size()} ranks, expected {options['size']}", flush=True)
        return 1
    failed = False
    for target in targets:
        module_name, function_name = target.split(":")
        suite = getattr(importlib.import_module(module_name), function_name)
        checks = Checks(group, suite=target, options=options)
        try:
            suite(checks)
        except BaseException:  # noqa: BLE001 - reported, then the rank fails
            # The other ranks may now wait on this one: exit at once, the
            # launcher ends them.
            for line in checks.failures:
                print("FAIL", line, flush=True)
            print(f"FAIL {target} rank {group.rank()} raised:\n{traceback.format_exc()}", flush=True)
            return 1
        group.barrier()
        for line in checks.failures:
            print("FAIL", line, flush=True)
        print(checks.summary(), flush=True)
        failed = failed or bool(checks.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
