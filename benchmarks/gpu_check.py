"""``python benchmarks/gpu_check.py [options]``: the GPU check run by path, the same as
``python -m benchmarks --preset gpu-check [options]``. The check itself is
``benchmarks/presets/gpu_check.py``; this file only re-exports it (``import gpu_check``
from this folder also works)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.presets.gpu_check import *  # noqa: E402,F401,F403
from benchmarks.presets.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/gpu_check.py"))
