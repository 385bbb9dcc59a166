"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda/`` behind the backend contract of
:mod:`moram_kernels.reference`, reached through ``torch.ops.moram_kernels_C.*`` (the op
dispatches to its CUDA kernel for CUDA tensors). K is at most 64."""

from __future__ import annotations

import torch

from . import _C_loader

_why = _C_loader.why_unavailable("cuda")
if _why is not None:  # the dispatch table never imports this module then
    raise ImportError(f"moram_kernels._cuda needs the extension built with CUDA kernels: {_why}")

_ops = torch.ops.moram_kernels_C


def moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, K, tau, delta, eps):
    """``-> (y [T, d_out] dtype of x, idx [T, K] int64, p_sel [T, K] fp32, norm [T] fp32)``."""
    y, idx, p_sel, norm = _ops.moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1,
                                         int(K), float(tau), float(delta), float(eps))
    return y, idx, p_sel, norm


def moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
              idx, p_sel, norm, tau, delta, eps, need_x, need_seg0, need_seg1):
    """``-> (gx, gkeys0, gvalues0, gkeys1, gvalues1)``; None where not needed (the op
    returns an empty tensor there)."""
    out = _ops.moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
                         idx, p_sel, norm, float(tau), float(delta), float(eps),
                         bool(need_x), bool(need_seg0), bool(need_seg1))
    needed = (need_x, need_seg0, need_seg0, need_seg1, need_seg1)
    return tuple(g if n else None for g, n in zip(out, needed))
