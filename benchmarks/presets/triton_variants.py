"""``python -m benchmarks --preset triton-variants [--arch 90 80] [--jobs 2] [--filter scan] [--sample]
[--csv out.csv]``: every Triton kernel variant compiled for sm_90 and sm_80 without a GPU, with shared memory,
registers, spills, tensor-core and ``cp.async`` use, programs per SM and waves at the
gpu-check shape.

This preset is the CI's Triton compile check, ``.ci/triton_compile_check.py`` (its
docstring states the limits it enforces and the occupancy model), run through the main
job's command line; its options and exit code are the check's.
"""

from __future__ import annotations

import os
import sys

CI = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".ci")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # imported by name from .ci/ (not a package), so that the check's worker processes
    # find its functions however they are started
    if CI not in sys.path:
        sys.path.insert(0, CI)
    import triton_compile_check
    return triton_compile_check.main(argv, prog)
