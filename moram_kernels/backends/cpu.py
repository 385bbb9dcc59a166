"""The ``cpu`` backend: the C++/OpenMP kernels of ``csrc/cpu/moram_cpu.cpp``, reached through
the compiled ops of :mod:`moram_kernels.backends.compiled`."""

from .compiled import require

moram_fwd, moram_bwd = require("cpu")

__all__ = ["moram_fwd", "moram_bwd"]
