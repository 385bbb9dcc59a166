"""The MoRAM custom ops, their fake kernels and autograd, and the functional :func:`moram`.

Two ops live in the ``moram_kernels`` namespace:

* ``moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta,
  eps, backend) -> (y, idx, p_sel, norm)``
* ``moram_bwd(...) -> (gx, gkeys0, gvalues0, gkeys1, gvalues1)``

Both forward to the backend named by ``backend`` (already resolved by the dispatch
table), so ``torch.compile(fullgraph=True)`` sees one opaque node per call and no
graph break. ``gram0`` (``keys0^T keys0``) is only read by the backward.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import backends as _dispatch
from ._precision import autocast_dtype, compute_dtype
from .backends.reference import _gate, effective_k

__all__ = ["moram", "moram_segments"]


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


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@moram_fwd_op.register_fake
def _(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps, backend):
    t = x.shape[0]
    acc = _acc_dtype(x)
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
    with _autocast_off(x.device.type):
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


def _autocast_off(device_type: str):
    """Autocast disabled for ``device_type`` when it is on (a no-op context otherwise)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


# ---- validation: every error names the argument -------------------------------------------

def _check_real(name: str, v, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if positive and not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    return v


def _validate(x, keys, values, k, tau, delta, eps, value_scale, backend):
    for name, t in (("x", x), ("keys", keys), ("values", values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d_in]")
    if keys.dim() != 2:
        raise ValueError(f"keys must be 2-D [N, d_in], got shape {tuple(keys.shape)}")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [N, d_out], got shape {tuple(values.shape)}")
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"keys and values must hold the same number of atoms, "
                         f"got keys N = {keys.shape[0]} and values N = {values.shape[0]}")
    if x.shape[-1] != keys.shape[1]:
        raise ValueError(f"x has d_in = {x.shape[-1]} in its last dimension, "
                         f"but keys have d_in = {keys.shape[1]}")
    for name, t in (("keys", keys), ("values", values)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tau = _check_real("tau", tau, positive=True)
    delta = _check_real("delta", delta)
    eps = _check_real("eps", eps, positive=True)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    n = keys.shape[0]
    scale = None
    if isinstance(value_scale, Tensor):
        if value_scale.shape != (n,):
            raise ValueError(f"value_scale must have shape [N] = [{n}], got {tuple(value_scale.shape)}")
        if value_scale.device != x.device:
            raise ValueError(f"value_scale is on {value_scale.device} but x is on {x.device}")
        if not value_scale.is_floating_point():
            raise TypeError(f"value_scale must be a floating-point tensor, got {value_scale.dtype}")
        # not detached: its gradient is computed (see ``_scale_grads``)
        scale = value_scale.to(_acc_dtype(x)).contiguous()
    elif value_scale is not None:
        v = _check_real("value_scale", value_scale)
        scale = torch.full((n,), v, dtype=_acc_dtype(x), device=x.device)
    return int(k), tau, delta, eps, scale


def _empty_delta(x2, segments, dtype) -> Tensor:
    """The delta when there are no atoms or no tokens: exact zeros ``[T, d_out]`` in
    ``dtype`` that still take part in autograd like any PyTorch op. Each product runs over
    an empty dimension (no atoms, or no tokens), so the output and every gradient are zeros
    of the right shape and dtype, and a NaN in ``x`` cannot leak in (nothing is multiplied
    by it)."""
    y = None
    for keys, values, scale in segments:
        p = x2.to(dtype) @ keys.to(dtype).t()                           # [T, N_s], T or N_s is 0
        if scale is not None:
            p = p * scale.to(dtype)
        term = p @ values.to(dtype)
        y = term if y is None else y + term
    return y


# ---- the functional API ---------------------------------------------------------------------

# ---- the eager path to the compiled kernels ---------------------------------------------------

_EAGER_BACKENDS = ("cpu", "cuda")
_PLAIN = (Tensor, torch.nn.Parameter)
_C_eager: list = []          # [the extension's eager function, or None], filled on first use


def _eager_entry():
    if not _C_eager:
        from .backends import compiled
        fn = compiled.eager()
        if fn is not None and all(_dispatch.why_unavailable(n) is not None for n in _EAGER_BACKENDS):
            fn = None
        _C_eager.append(fn)
    return _C_eager[0]


def _eager_call(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps, backend):
    """``(y, idx)`` from the C++ entry point of the cpu/cuda kernels (validation and autograd
    in C++, a few µs of overhead), or None when this call must take the custom op instead:
    under torch.compile, a tensor subclass, a torch function/dispatch mode or autocast,
    mixed dtypes, a scale that requires grad, an empty bank or batch, arguments of other
    types than the usual ones, or a backend other than cpu/cuda. ``keys1``/``values1`` None: no second
    segment."""
    fn = _C_eager[0] if _C_eager else _eager_entry()
    if (fn is None or type(x) is not Tensor or type(keys0) not in _PLAIN or type(values0) not in _PLAIN
            or type(k) is not int or type(tau) is not float or type(delta) is not float
            or type(eps) is not float or (backend is not None and type(backend) is not str)
            or x.dim() < 1 or keys0.dim() != 2 or values0.dim() != 2):
        return None
    dt = x.dtype    # one dtype throughout: mixed dtypes take the casts of the custom-op path
    if keys0.dtype is not dt or values0.dtype is not dt:
        return None
    n = keys0.shape[0]
    if keys1 is not None:
        if (type(keys1) not in _PLAIN or type(values1) not in _PLAIN or keys1.dim() != 2
                or keys1.dtype is not dt or values1.dtype is not dt):
            return None
        n += keys1.shape[0]
    for s in (scale0, scale1, gram0):
        if s is not None and (type(s) is not Tensor or s.requires_grad):
            return None
    if (n == 0 or x.numel() == 0 or torch.compiler.is_compiling()
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_any_autocast_enabled()):
        return None
    kk = k if 2 <= k <= n else effective_k(k, n)
    try:
        b = _dispatch.select_cached(backend, x.device, x.dtype, keys0.dtype, values0.dtype,
                                    x.shape[-1], values0.shape[1], n, kk)
    except (TypeError, ValueError, RuntimeError):
        return None   # the custom-op path validates first, then raises this error again
    if b.name not in _EAGER_BACKENDS:
        return None
    return fn(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps)


def moram_segments(x, keys0, values0, scale0, keys1, values1, scale1, *, k, tau, delta, eps,
                   gram0=None, backend=None) -> tuple[Tensor, Tensor | None]:
    """MoRAM delta over two atom segments, ``[..., d_in] -> [..., d_out]``, plus the
    ``[T, K]`` selected atom ids (None when nothing was selected).

    Inputs are assumed validated. ``keys0``/``values0`` is typically a frozen bank and
    ``keys1``/``values1`` the trainable atoms; neither is concatenated.

    Dtypes follow :mod:`moram_kernels._precision`: every tensor is cast to the compute
    dtype here, under autograd (a no-op for tensors already in it, such as
    ``MoRAMLinear``'s cached frozen bank), so each gradient returns in its input's dtype.
    The result has x's dtype, or the autocast dtype inside an autocast region.
    """
    out = _eager_call(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps,
                      backend)
    if out is not None:
        return out
    lead, d_out = x.shape[:-1], values0.shape[1]
    n = keys0.shape[0] + keys1.shape[0]
    dev = x.device.type
    cd = compute_dtype(x.dtype, (keys0.dtype, keys1.dtype, values0.dtype, values1.dtype), dev)
    out_dtype = x.dtype if autocast_dtype(dev) is None or x.dtype == torch.float64 else cd
    # a view whenever the strides allow it (a strided 2-D x reaches the backend as it is;
    # every backend takes any strides), a copy only when reshape must make one
    x2 = x.reshape(-1, x.shape[-1])
    t = x2.shape[0]
    if n == 0 or t == 0:
        with _autocast_off(dev):
            y = _empty_delta(x2, ((keys0, values0, scale0), (keys1, values1, scale1)), out_dtype)
        return y.reshape(*lead, d_out), None
    kk = effective_k(k, n)
    inp = _dispatch.Inputs(x.device, cd, cd, cd, x.shape[-1], d_out, n, kk)
    b = _dispatch.select(backend, inp)
    with _autocast_off(dev):
        y, idx, _, _ = moram_fwd_op(x2.to(cd), keys0.to(cd), values0.to(cd), scale0,
                                    keys1.to(cd), values1.to(cd), scale1, gram0,
                                    kk, tau, delta, eps, b.name)
    return y.to(out_dtype).reshape(*lead, d_out), idx


def moram(x: Tensor, keys: Tensor, values: Tensor, *, k: int, tau: float, delta: float = 0.0,
          eps: float = 1e-12, value_scale=None, backend: str | None = None) -> Tensor:
    """MoRAM adapter delta (docs/op.md, "Forward"), ``[..., d_in] -> [..., d_out]``.

    ``keys [N, d_in]`` and ``values [N, d_out]`` hold the atoms; ``k`` atoms are kept per
    token (effective K = min(max(k, 2), N)), softmaxed at temperature ``tau``, and those
    whose normalised score is below ``delta`` dropped (0 disables it). ``value_scale`` is
    None, a float or a ``[N]`` tensor multiplying each value row. Differentiable with
    respect to ``x``, ``keys``, ``values`` and a ``value_scale`` tensor (each gradient in
    its own input's dtype); returns the dtype of ``x`` (the autocast dtype inside
    ``torch.autocast``, as ``F.linear`` does). It computes in the lowest precision of x and
    the atoms with fp32 accumulation (:mod:`moram_kernels._precision`). With no atoms or no
    tokens the output is zeros that still take part in autograd (zero gradients).
    """
    if value_scale is None or type(value_scale) is Tensor:
        out = _eager_call(x, keys, values, value_scale, None, None, None, None, k, tau, delta, eps,
                          backend)
        if out is not None:
            return out[0]
    k, tau, delta, eps, scale = _validate(x, keys, values, k, tau, delta, eps, value_scale, backend)
    empty_k = keys.new_empty(0, keys.shape[1])
    empty_v = values.new_empty(0, values.shape[1])
    y, _ = moram_segments(x, keys, values, scale, empty_k, empty_v, None,
                          k=k, tau=tau, delta=delta, eps=eps, backend=backend)
    return y
