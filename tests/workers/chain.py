"""Run several worker scripts in order in one launched process: ``chain.py SCRIPT [ARG...] [-- SCRIPT ...]``.

Each script runs as ``__main__`` with its own ``sys.argv`` (the first one
forms the world; the later ones' ``mlxdist.init()`` joins it). After each, the
rank prints ``CHAIN <script> rank=<r> status=<exit status>``; a script that
fails (non-zero exit or an exception) ends the chain with its status, since
the world may be unusable after it.
"""

import os
import runpy
import sys
import traceback
from pathlib import Path


def _rank() -> str:
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return os.environ[name]
    return "?"


def main(argv: list[str]) -> int:
    """Run the scripts in ``argv`` (separated by ``--``); the first failure's status, else 0."""
    parts: list[list[str]] = [[]]
    for word in argv:
        if word == "--":
            parts.append([])
        else:
            parts[-1].append(word)
    here = Path(__file__).resolve().parent
    for script, *args in (p for p in parts if p):
        sys.argv = [str(here / script), *args]
        try:
            runpy.run_path(str(here / script), run_name="__main__")
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported, then the chain ends
            traceback.print_exc()
            status = 1
        print(f"CHAIN {script} rank={_rank()} status={status}", flush=True)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
