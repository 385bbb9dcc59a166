"""Argument checks of the functional API (a leaf module: it imports nothing of the package).

Every error names the argument, with the messages the C++ eager entry (csrc/eager.cpp)
gives for the same mistakes.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

__all__ = ["check_real", "validate", "check_extras"]


def check_real(name: str, v, *, positive: bool = False, finite: bool = False) -> float:
    """``v`` as a float: a real number, not NaN, finite with ``finite``, and finite and
    > 0 with ``positive``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if positive and not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    if finite and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_delta(delta) -> float:
    """The eval threshold as a float: not NaN and at most 1. It drops the atoms whose
    normalised score ``p_i / ||p||`` (in [-1, 1]) is below it, so above 1 it would drop
    every atom and switch the adapter off without a word; <= 0 disables it."""
    delta = check_real("delta", delta)
    if delta > 1:
        raise ValueError(f"delta must be <= 1 (it is compared with normalised scores, which lie in "
                         f"[-1, 1]: above 1 every atom is dropped), got {delta}")
    return delta


def _check_vector(name: str, t: Tensor, n: int, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}], got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def validate(x, keys, values, k, tau, delta, eps, value_scale, backend):
    """The arguments of :func:`moram_kernels.moram`, checked: ``(k, tau, delta, eps,
    value_scale)`` with ints and floats made plain, and ``value_scale`` None, a float or
    a checked ``[N]`` tensor (returned as given)."""
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
    tau = check_real("tau", tau, positive=True)
    delta = check_delta(delta)
    eps = check_real("eps", eps, positive=True)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if isinstance(value_scale, Tensor):
        _check_vector("value_scale", value_scale, keys.shape[0], x)
    elif value_scale is not None:
        value_scale = check_real("value_scale", value_scale, finite=True)
    return int(k), tau, delta, eps, value_scale


def check_extras(x: Tensor, keys0: Tensor, keys1: Tensor, scale0, scale1, gram0) -> None:
    """The tensors :class:`~moram_kernels.MoRAMLinear` adds to a call: the per-atom value
    scales ``[N_s]`` of each segment and the frozen segment's Gram matrix ``[d_in, d_in]``
    (floating point, on x's device), so that a wrong one fails here rather than in the
    backward."""
    if scale0 is not None:
        _check_vector("value_scale", scale0, keys0.shape[0], x)
    if scale1 is not None:
        _check_vector("scale1", scale1, keys1.shape[0], x)
    if gram0 is not None:
        d = x.shape[-1]
        if not isinstance(gram0, Tensor):
            raise TypeError(f"gram0 must be a torch.Tensor, got {type(gram0).__name__}")
        if gram0.dim() != 2 or gram0.shape[0] != d or gram0.shape[1] != d:
            raise ValueError(f"gram0 must have shape [d_in, d_in] = [{d}, {d}], got {tuple(gram0.shape)}")
        if gram0.device != x.device:
            raise ValueError(f"gram0 is on {gram0.device} but x is on {x.device}")
        if not gram0.is_floating_point():
            raise TypeError(f"gram0 must be a floating-point tensor, got {gram0.dtype}")
