"""The functional API: :func:`moram` (``mk.moram``) and :func:`moram_segments`, the
two-segment form :class:`~moram_kernels.MoRAMLinear` calls.

One road per call, chosen by :func:`moram_kernels.eager.why_not_eager` (asked inline, not
through a wrapper: the eager road costs a few µs and every frame shows): the eager C++
entry of the cpu/cuda kernels when it says None, else the custom op of
:mod:`moram_kernels.ops` after the casts the dtype policy asks for
(:func:`moram_kernels._precision.call_dtypes`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import backends as _dispatch
from . import eager as _eager
from .eager import why_not_eager as _why_not_eager
from ._checks import check_extras, validate
from ._precision import acc_dtype, autocast_off, call_dtypes
from .backends.reference import effective_k
from .ops import moram_fwd_op

__all__ = ["moram", "moram_segments"]


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


def moram_segments(x, keys0, values0, scale0, keys1, values1, scale1, *, k, tau, delta, eps,
                   gram0=None, backend=None) -> tuple[Tensor, Tensor | None]:
    """MoRAM delta over two atom segments, ``[..., d_in] -> [..., d_out]``, plus the
    ``[T, K]`` selected atom ids (None when nothing was selected).

    ``x``, the atoms, ``k``, ``tau``, ``delta`` and ``eps`` are assumed validated;
    ``scale0``/``scale1`` (fp32 ``[N_s]`` or None) and ``gram0`` (``keys0^T keys0``
    ``[d_in, d_in]`` or None) are checked here. ``keys0``/``values0`` is typically a
    frozen bank and ``keys1``/``values1`` the trainable atoms; neither is concatenated.

    Dtypes follow :func:`moram_kernels._precision.call_dtypes`: every tensor is cast to
    the compute dtype here, under autograd (a no-op for tensors already in it, such as
    ``MoRAMLinear``'s cached frozen bank), so each gradient returns in its input's dtype.
    The result has x's dtype, or the autocast dtype inside an autocast region.
    """
    if _why_not_eager(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps,
                      backend) is None:
        return _eager.ENTRY[0](x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps)
    check_extras(x, keys0, keys1, scale0, scale1, gram0)
    lead, d_out = x.shape[:-1], values0.shape[1]
    n = keys0.shape[0] + keys1.shape[0]
    dev = x.device.type
    cd, out_dtype = call_dtypes(x, (keys0.dtype, keys1.dtype, values0.dtype, values1.dtype))
    # a view whenever the strides allow it (a strided 2-D x reaches the backend as it is;
    # every backend takes any strides), a copy only when reshape must make one
    x2 = x.reshape(-1, x.shape[-1])
    t = x2.shape[0]
    if n == 0 or t == 0:
        with autocast_off(dev):
            y = _empty_delta(x2, ((keys0, values0, scale0), (keys1, values1, scale1)), out_dtype)
        return y.reshape(*lead, d_out), None
    kk = effective_k(k, n)
    inp = _dispatch.Inputs(x.device, cd, cd, cd, x.shape[-1], d_out, n, kk)
    b = _dispatch.select(backend, inp)
    with autocast_off(dev):
        y, idx, _, _ = moram_fwd_op(x2.to(cd), keys0.to(cd), values0.to(cd), scale0,
                                    keys1.to(cd), values1.to(cd), scale1, gram0,
                                    kk, tau, delta, eps, b.name)
    return y.to(out_dtype).reshape(*lead, d_out), idx


@functools.lru_cache(maxsize=64)
def _scale_vector(n: int, scale: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``[n]`` vector of a float scale, for ``moram``'s ``value_scale`` and
    ``MoRAMLinear``'s trainable values (cached, shared, never modified; built outside
    inference mode so that a training call may save it for backward)."""
    with torch.inference_mode(False):
        return torch.full((n,), scale, device=device, dtype=dtype)


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
    if (type(value_scale) in (float, int) and math.isfinite(value_scale) and type(x) is Tensor
            and type(keys) is Tensor and keys.dim() == 2 and not torch.compiler.is_compiling()):
        # a plain finite number becomes its [N] vector here, cached, so the call can take
        # the eager road (one decoded token spent ~35 µs of its ~90 µs on the slower road)
        value_scale = _scale_vector(keys.shape[0], float(value_scale), x.device, acc_dtype(x.dtype))
    if (value_scale is None or type(value_scale) is Tensor) and _why_not_eager(
            x, keys, values, value_scale, None, None, None, None, k, tau, delta, eps, backend) is None:
        return _eager.ENTRY[0](x, keys, values, value_scale, None, None, None, None, k, tau, delta, eps)[0]
    k, tau, delta, eps, value_scale = validate(x, keys, values, k, tau, delta, eps, value_scale, backend)
    n, acc = keys.shape[0], acc_dtype(x.dtype)
    if isinstance(value_scale, Tensor):
        # not detached: its gradient is computed (see ``ops._scale_grads``)
        scale = value_scale.to(acc).contiguous()
    else:
        scale = None if value_scale is None else torch.full((n,), value_scale, dtype=acc, device=x.device)
    y, _ = moram_segments(x, keys, values, scale, keys.new_empty(0, keys.shape[1]),
                          values.new_empty(0, values.shape[1]), None,
                          k=k, tau=tau, delta=delta, eps=eps, backend=backend)
    return y
