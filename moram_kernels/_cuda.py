"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda/`` (K is at most 64)."""

from . import _C_loader

_why = _C_loader.why_unavailable("cuda")
if _why is not None:  # the dispatch table never imports this module then
    raise ImportError(f"moram_kernels._cuda needs the extension built with CUDA kernels: {_why}")

from ._C_ops import moram_bwd, moram_fwd  # noqa: E402

__all__ = ["moram_fwd", "moram_bwd"]
