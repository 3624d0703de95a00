"""``python -m hwlm.cli``: the same as the ``hwlm`` command."""

import os
import sys
from pathlib import Path


def unshadow_checkout() -> None:
    """``python -m`` puts the working directory first on ``sys.path``. In a checkout of hwlm that
    is the repository root, whose ``kernels/`` folder (installed as ``hwlm.kernels``) would be
    found as the ``kernels`` distribution that transformers >= 5.25 imports. hwlm itself is
    already imported (from its installed location) when this runs."""
    cwd = Path.cwd()
    if (cwd / "kernels" / "numba").is_dir() and (cwd / "hwlm" / "cli").is_dir():
        sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != cwd]


if __name__ == "__main__":
    unshadow_checkout()
    from hwlm.cli.main import main

    sys.exit(main())
