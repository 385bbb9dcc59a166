"""The ``cpu`` backend: the C++/OpenMP kernels of ``csrc/cpu/moram_cpu.cpp``."""

from . import _C_loader

_why = _C_loader.why_unavailable("cpu")
if _why is not None:  # the dispatch table never imports this module then
    raise ImportError(f"moram_kernels._cpu needs the extension built with CPU kernels: {_why}")

from ._C_ops import moram_bwd, moram_fwd  # noqa: E402

__all__ = ["moram_fwd", "moram_bwd"]
