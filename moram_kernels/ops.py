"""The torch contract of the MoRAM op: two custom ops, their fake kernels and their autograd.

Two ops live in the ``moram_kernels`` namespace:

* ``moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta,
  eps, backend) -> (y, idx, p_sel, norm)``
* ``moram_bwd(...) -> (gx, gkeys0, gvalues0, gkeys1, gvalues1)``

Both forward to the backend named by ``backend`` (already resolved by the dispatch
table), so ``torch.compile(fullgraph=True)`` sees one opaque node per call and no
graph break. ``gram0`` (``keys0^T keys0``) is only read by the backward.

Callers (:mod:`moram_kernels.functional`) hand these ops tensors already in the compute
dtype and a K already effective; the functional API, its checks and the eager road to
the C++ entry live in ``functional.py``, ``_checks.py`` and ``eager.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends as _dispatch
from ._precision import acc_dtype, autocast_off
from .backends.reference import _gate

__all__ = ["moram_fwd_op", "moram_bwd_op"]


def _impl(backend: str):
    return _dispatch._BY_NAME[backend].impl()


@torch.library.custom_op("moram_kernels::moram_fwd", mutates_args=())
def moram_fwd_op(
    x: Tensor, keys0: Tensor, values0: Tensor, scale0: Optional[Tensor],
    keys1: Tensor, values1: Tensor, scale1: Optional[Tensor], gram0: Optional[Tensor],
    k: int, tau: float, delta: float, eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_impl(backend).moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1,
                                          k, tau, delta, eps))


@moram_fwd_op.register_fake
def _(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps, backend):
    t = x.shape[0]
    acc = acc_dtype(x.dtype)
    return (x.new_empty(t, values0.shape[1]),
            x.new_empty(t, k, dtype=torch.int64),
            x.new_empty(t, k, dtype=acc),
            x.new_empty(t, dtype=acc))


@torch.library.custom_op("moram_kernels::moram_bwd", mutates_args=())
def moram_bwd_op(
    gy: Tensor, x: Tensor, keys0: Tensor, values0: Tensor, scale0: Optional[Tensor],
    keys1: Tensor, values1: Tensor, scale1: Optional[Tensor], gram0: Optional[Tensor],
    idx: Tensor, p_sel: Tensor, norm: Tensor, tau: float, delta: float, eps: float,
    need_x: bool, need_seg0: bool, need_seg1: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _impl(backend).moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
                                   idx, p_sel, norm, tau, delta, eps, need_x, need_seg0, need_seg1)
    # custom ops return tensors, never None: an unneeded gradient is an empty tensor
    return tuple(x.new_empty(0) if g is None else g for g in out)


@moram_bwd_op.register_fake
def _(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0, idx, p_sel, norm,
      tau, delta, eps, need_x, need_seg0, need_seg1, backend):
    def like(t, need):
        return torch.empty_like(t) if need else x.new_empty(0)
    return (like(x, need_x), like(keys0, need_seg0), like(values0, need_seg0),
            like(keys1, need_seg1), like(values1, need_seg1))


def _setup_context(ctx, inputs, output):
    x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps, backend = inputs
    _, idx, p_sel, norm = output
    ctx.mark_non_differentiable(idx, p_sel, norm)
    ctx.save_for_backward(x, keys0, values0, scale0, keys1, values1, scale1, gram0, idx, p_sel, norm)
    ctx.hyper = (tau, delta, eps, backend)


def _scale_grads(gy, values0, values1, idx, p_sel, norm, tau, delta, need0, need1):
    """Gradients of the per-atom value scales, from what the forward saved:
    ``dL/ds_i = sum over tokens t that selected i of w_ti m_ti p_ti <b_i, gy_t>``
    (``m`` the threshold mask). Gathers the K selected value rows per token once; the
    backends never see the scales' gradient, so every backend gets it the same way."""
    n0 = values0.shape[0]
    acc = p_sel.dtype
    w, m = _gate(p_sel, norm, tau, delta)
    rows = torch.where(idx < n0, idx, idx - n0)                  # row within its own segment
    gyf = gy.to(acc)
    out = []
    for seg, vseg, need in ((0, values0, need0), (1, values1, need1)):
        if not need or vseg.shape[0] == 0:
            out.append(p_sel.new_zeros(0) if need else None)
            continue
        inside = (idx < n0) if seg == 0 else (idx >= n0)
        local = torch.where(inside, rows, torch.zeros_like(rows))
        dots = torch.einsum("tkd,td->tk", vseg.to(acc)[local], gyf)
        contrib = torch.where(inside, w * m * p_sel * dots, torch.zeros_like(dots))
        g = torch.zeros(vseg.shape[0], dtype=acc, device=gy.device)
        out.append(g.index_add_(0, local.reshape(-1), contrib.reshape(-1)))
    return out


def _backward(ctx, gy, _gidx, _gpsel, _gnorm):
    x, keys0, values0, scale0, keys1, values1, scale1, gram0, idx, p_sel, norm = ctx.saved_tensors
    tau, delta, eps, backend = ctx.hyper
    need = ctx.needs_input_grad
    need_x, need_seg0, need_seg1 = need[0], need[1] or need[2], need[4] or need[5]
    gx = gk0 = gv0 = gk1 = gv1 = gs0 = gs1 = None
    # the forward's inputs already carry the compute dtype: a backward run inside an
    # autocast region must not re-cast what the kernels' own GEMMs see
    with autocast_off(x.device.type):
        if need_x or need_seg0 or need_seg1:
            gx, gk0, gv0, gk1, gv1 = moram_bwd_op(
                gy.to(x.dtype).contiguous(), x, keys0, values0, scale0, keys1, values1, scale1,
                gram0, idx, p_sel, norm, tau, delta, eps, need_x, need_seg0, need_seg1, backend)
        if need[3] or need[6]:
            gs0, gs1 = _scale_grads(gy, values0, values1, idx, p_sel, norm, tau, delta,
                                    need[3], need[6])
    return (gx if need_x else None,
            gk0 if need[1] else None, gv0 if need[2] else None, gs0,
            gk1 if need[4] else None, gv1 if need[5] else None, gs1,
            None, None, None, None, None, None)


moram_fwd_op.register_autograd(_backward, setup_context=_setup_context)

