"""``python -m mlxdist.lm``: the same as ``mlxdist-generate``."""

import sys

from mlxdist.lm.cli import main

if __name__ == "__main__":
    sys.exit(main())
