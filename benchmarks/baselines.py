"""The layers every MoRAM backend is timed against.

* :class:`AuthorsMoRAMLinear`: the authors' layer. On every call it concatenates the
  frozen bank and the trainable atoms, then runs the dense formulation
  (:func:`moram_kernels.backends.reference.moram_dense`) under plain autograd.
* :func:`compiled_authors_linear` / :func:`compiled_dense`: ``torch.compile`` of the same
  code. Tensors are arguments (never attributes), so one compiled graph with dynamic
  shapes serves every layer of a sweep instead of recompiling per module instance.
* :class:`LoRALinear` / :func:`lora_delta`: a plain LoRA adapter, for the cost of a dense
  adapter of the same rank.
* :func:`fastest_gemm`: the fastest of torch's ways to compute the scoring product
  ``x @ keys.T`` in the inputs' dtype, the floor every moram row is measured against.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moram_kernels import MoRAMLinear
from moram_kernels.backends.reference import moram_dense

__all__ = ["authors_moram_linear", "AuthorsMoRAMLinear", "compiled_authors_linear", "compiled_dense",
           "LoRALinear", "lora_delta", "gemm_variants", "fastest_gemm"]


def authors_moram_linear(x: Tensor, weight: Tensor, bias: Tensor | None, frozen_keys: Tensor,
                         frozen_values: Tensor, keys: Tensor, values: Tensor, *, scaling: float,
                         k: int, tau: float, delta: float, eps: float) -> Tensor:
    """The authors' layer as one function, ``[T, d_in] -> [T, d_out]``.

    ``frozen_* [N_f, d]`` already carry their scale; the trainable ``values [r, d_out]``
    are multiplied by ``scaling`` (= alpha / r) on every call, as the authors do.
    """
    all_keys = torch.cat([frozen_keys, keys])
    all_values = torch.cat([frozen_values, values * scaling])
    return F.linear(x, weight, bias) + moram_dense(x, all_keys, all_values, k=k, tau=tau,
                                                   delta=delta, eps=eps)


def _raise_recompile_limits() -> None:
    # A sweep recompiles for each (k, tau, ...) set and for size-1 specialisations; the
    # default limit of 8 would silently fall back to eager and mislabel eager timings.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    # Duck sizing would tie N to T whenever they happen to be equal, then recompile for
    # the next shape; one graph per hyper-parameter set is what a sweep wants.
    import torch.fx.experimental._config as fx_config
    fx_config.use_duck_shape = False


@functools.lru_cache(maxsize=None)
def compiled_authors_linear(scaling: float, k: int, tau: float, delta: float, eps: float):
    """``torch.compile(authors_moram_linear)`` with the hyper-parameters bound (cached)."""
    _raise_recompile_limits()
    fn = functools.partial(authors_moram_linear, scaling=scaling, k=k, tau=tau, delta=delta, eps=eps)
    return torch.compile(fn, dynamic=True)


@functools.lru_cache(maxsize=None)
def compiled_dense(k: int, tau: float, delta: float, eps: float):
    """``torch.compile(moram_dense)`` with the hyper-parameters bound (cached)."""
    _raise_recompile_limits()
    fn = functools.partial(moram_dense, k=k, tau=tau, delta=delta, eps=eps)
    return torch.compile(fn, dynamic=True)


class AuthorsMoRAMLinear(nn.Module):
    """The authors' layer over the same tensors as a :class:`MoRAMLinear` (shared, not
    copied), ``[..., d_in] -> [..., d_out]``. ``compile=True`` runs the compiled graph."""

    def __init__(self, layer: MoRAMLinear, compile: bool = False):
        super().__init__()
        self.layer = layer
        self.compile = compile

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        hyper = dict(scaling=m.scaling, k=m.k, tau=m.tau, delta=m.delta if not self.training else 0.0,
                     eps=m.eps)
        fn = compiled_authors_linear(**hyper) if self.compile else functools.partial(authors_moram_linear, **hyper)
        lead = x.shape[:-1]
        y = fn(x.reshape(-1, x.shape[-1]), m.base_layer.weight, m.base_layer.bias, m.frozen_keys,
               m.frozen_values, m.keys, m.values)
        return y.reshape(*lead, y.shape[-1])


def lora_delta(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(x A^T) B``: ``x [T, d_in]``, ``a [R, d_in]``, ``b [R, d_out]`` -> ``[T, d_out]``."""
    return (x @ a.t()) @ b


class LoRALinear(nn.Module):
    """``base(x) + scaling * (x A^T) B`` with a frozen base and trainable ``A [R, d_in]``,
    ``B [R, d_out]``; ``[..., d_in] -> [..., d_out]``."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 1.0):
        super().__init__()
        self.base_layer = base
        base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        # B random rather than zero so the backward carries real numbers
        self.lora_b = nn.Parameter(torch.randn(rank, base.out_features, device=w.device, dtype=w.dtype) * 0.02)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + lora_delta(x, self.lora_a, self.lora_b) * self.scaling


def gemm_variants(keys: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """torch's ways to compute ``x @ keys.T`` (``[T, d] -> [T, N]``) in the inputs' dtype:
    the NT product as written, ``F.linear`` (the addmm road of ``nn.Linear``), the NN
    product on keys transposed once, and the transposed product ``(keys @ x.T).T``. Which
    wins depends on the dtype, the BLAS (MKL, oneDNN for bf16 on AMX) and the shape."""
    keys_t = keys.t().contiguous()
    return {
        "x@keys.T": lambda x: x @ keys.t(),
        "F.linear": lambda x: F.linear(x, keys),
        "mm(x,keysT)": lambda x: torch.mm(x, keys_t),
        "(keys@x.T).T": lambda x: (keys @ x.t()).t(),
    }


def fastest_gemm(x: Tensor, keys: Tensor, reps: int = 3, variants=None) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The fastest of :func:`gemm_variants` (or ``variants``) on ``x``: each run once to warm
    up, then the best of ``reps`` timed calls, interleaved. A variant whose warm-up call took
    over 4x the quickest warm-up is not timed again (torch's bf16 NN product on an AVX2 CPU
    takes ~70x the others: seconds a call at T=2048, d=1024, N=4096). Returns ``(name, fn)``."""
    variants = gemm_variants(keys) if variants is None else variants
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        warm = {}
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn(x)
            sync()
            warm[name] = time.perf_counter() - t0
        quick = min(warm.values())
        variants = {name: fn for name, fn in variants.items() if warm[name] <= 4 * quick}
        best = {name: math.inf for name in variants}
        for _ in range(reps):
            for name, fn in variants.items():
                sync()
                t0 = time.perf_counter()
                fn(x)
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
    name = min(best, key=best.get)
    return name, variants[name]
