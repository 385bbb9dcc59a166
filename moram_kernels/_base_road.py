"""The frozen base layer's GEMMs on CPUs without a native bf16/fp16 matrix unit.

On an x86 CPU without AVX512-BF16 or AMX (every AVX2 CPU, e.g. AMD EPYC before Zen 4),
torch multiplies bf16 and fp16 matrices in a slow generic loop, and for the layout of a
linear layer's input gradient (``gy @ W``) far slower still: at T = 512, d = 1024 on an AVX2
EPYC, 1.8 s against 19 ms for the same product in fp32. A MoRAM layer's base ``nn.Linear``
is frozen, so a bf16 train step there spends almost all its time in that one product.

:func:`base_forward` runs such a base layer on the *fp32 road*: x and the weight are widened
to fp32 (exactly: every bf16/fp16 value is an fp32 value), multiplied by torch's fp32 GEMM,
and the result rounded once to the input dtype: what torch's own bf16 GEMM computes (it
accumulates in fp32 too), up to the order of the sum. The weight is widened in slices of
about a million elements, so no fp32 copy of a large weight is ever held. The backward
gives ``gx`` the same way; the weight and bias get no gradient (they are frozen).

It is taken only where it cannot change what the layer means: a plain ``nn.Linear`` (no
subclass, no hooks on it, no global module hooks) with a frozen weight and bias of x's
dtype, plain CPU tensors (no DTensor or other subclass), outside autocast and outside
``torch.compile``. Anything else calls the base layer as it is.

``MORAM_CPU_LOWP`` (the cpu backend's switch for its own GEMMs) picks the road here too:
``auto`` (default) takes the fp32 road on x86 CPUs without the native unit, ``fp32`` takes
it on every CPU, ``native`` never takes it.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

__all__ = ["base_forward", "base_forward_owned", "fp32_road"]

_LOWP = (torch.bfloat16, torch.float16)
# the widened weight slice: about 4 MiB of fp32 (a million elements)
SLICE_ELEMENTS = 1 << 20
# below this many rows the forward keeps torch's own product (a GEMV-sized call is quick
# in bf16 too, and widening the whole weight would cost more than the product); the
# backward takes the fp32 road at every size
MIN_FORWARD_ROWS = 16

_native: dict[torch.dtype, bool] = {}


def _cpu_multiplies_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has a matrix unit for ``dtype``, read once from torch's cpuinfo, as
    the cpu backend reads it: AVX512-BF16 or AMX-BF16 for bf16, AVX512-FP16 or AMX-FP16 for
    fp16. Off x86 torch's own product is taken to be the right one."""
    if dtype not in _native:
        caps = torch._C._cpu._get_cpu_capability()
        if caps.get("architecture", platform.machine()).lower() not in ("x86_64", "amd64", "x86", "i686"):
            _native[dtype] = True
        else:
            want = ("amx_bf16", "avx512_bf16") if dtype == torch.bfloat16 else ("amx_fp16", "avx512_fp16")
            _native[dtype] = any(bool(caps.get(k, False)) for k in want)
    return _native[dtype]


def fp32_road(dtype: torch.dtype) -> bool:
    """Whether a base layer computing in ``dtype`` on the CPU takes the fp32 road now
    (``MORAM_CPU_LOWP`` is read on every call, like the cpu backend reads it)."""
    if dtype not in _LOWP:
        return False
    mode = os.environ.get("MORAM_CPU_LOWP", "auto") or "auto"
    if mode not in ("auto", "native", "fp32"):
        raise ValueError(f"MORAM_CPU_LOWP must be auto, native or fp32, got {mode!r}")
    if mode != "auto":
        return mode == "fp32"
    return not _cpu_multiplies_natively(dtype)


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _takes_road(base: nn.Module, x: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in _LOWP or type(base) is not nn.Linear:
        return False
    w, b = base.weight, base.bias
    if (w.dtype is not x.dtype or w.requires_grad or w.device.type != "cpu"
            or (b is not None and (b.dtype is not x.dtype or b.requires_grad))):
        return False
    if not (_plain(x) and _plain(w) and _plain(b)) or not _no_hooks(base):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return fp32_road(x.dtype)


def base_forward(base: nn.Module, x: Tensor) -> Tensor:
    """``base(x)``, on the fp32 road where it is taken (see the module docstring)."""
    return base_forward_owned(base, x)[0]


def base_forward_owned(base: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    """``(base(x), owned)``: ``owned`` when the result is a new tensor nothing else holds or
    saved (the fp32 road's, or ``F.linear``'s for a plain ``nn.Linear`` without hooks on
    plain tensors, which is all ``nn.Linear.forward`` does), so the caller may add the
    adapter's output into it in place instead of allocating another ``[T, d_out]``."""
    if _takes_road(base, x):
        # 2-D in the Function, reshaped outside it: an output that is a view made inside a
        # custom Function may not be modified in place
        y2 = _Fp32Linear.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias)
        return y2.view(*x.shape[:-1], base.weight.shape[0]), True
    if (type(base) is nn.Linear and _no_hooks(base) and _plain(x) and _plain(base.weight)
            and _plain(base.bias)):
        return F.linear(x, base.weight, base.bias), True
    return base(x), False


def _slices(rows: int, cols: int):
    step = max(1, SLICE_ELEMENTS // max(1, cols))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def linear_fp32(x2: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """fp32 ``x2 @ w.T + b`` for a 2-D low-precision ``x2``, ``w`` widened slice by slice."""
    xf = x2.float()
    if w.numel() <= SLICE_ELEMENTS:
        out = xf @ w.float().t()
    else:
        out = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32, device=x2.device)
        for lo, hi in _slices(w.shape[0], w.shape[1]):
            out[:, lo:hi] = xf @ w[lo:hi].float().t()
    if b is not None:
        out += b.float()
    return out


def input_grad_fp32(gy2: Tensor, w: Tensor) -> Tensor:
    """fp32 ``gy2 @ w`` for a 2-D low-precision ``gy2``, ``w`` widened slice by slice."""
    gyf = gy2.float()
    gx = torch.zeros(gy2.shape[0], w.shape[1], dtype=torch.float32, device=gy2.device)
    for lo, hi in _slices(w.shape[0], w.shape[1]):
        gx.addmm_(gyf[:, lo:hi], w[lo:hi].float())
    return gx


class _Fp32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(w)
        if x.shape[0] < MIN_FORWARD_ROWS:       # x is 2-D here
            return F.linear(x, w, b)
        return linear_fp32(x, w, b).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):
        (w,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = input_grad_fp32(gy, w).to(gy.dtype)
        return gx, None, None
