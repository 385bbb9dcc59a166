"""The ``cuda`` backend: the C++/CUDA kernels of ``csrc/cuda/`` (K at most 64), reached
through the compiled ops of :mod:`moram_kernels.backends.compiled`."""

from .compiled import require

moram_fwd, moram_bwd = require("cuda")

__all__ = ["moram_fwd", "moram_bwd"]
