"""Every implementation timed on one case, as a zero-argument callable that runs one
call (eval forward, or train step: forward + backward) on rotating inputs."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import moram_kernels as mk
from moram_kernels.backends.reference import moram_dense

from .baselines import AuthorsMoRAMLinear, LoRALinear, compiled_dense, lora_delta
from .grid import Case

AUTHORS, COMPILED, FLOOR = "authors", "authors+compile", "floor:x@keys.T"
BASE = "base:layer"          # train mode: the frozen base layer's own step (forward + gx)
LORA_N, LORA_R = "lora:R=N", "lora:R=r"


def backend_impl(name: str) -> str:
    return "moram:" + name


@dataclass
class Impl:
    name: str
    kind: str                               # "moram", "lora" or "floor": which work formula
    run: Callable[[], object]               # one call, next rotating input
    output: Callable[[], Tensor] | None     # the output on the first input, for the check
    rank: int = 0                           # LoRA rank
    compiled: bool = False
    dense_tn: float = 0.0                   # [T, N] fp32 tensors it keeps alive, for the skip rule
    saved: Callable[[], int] | None = None  # bytes saved for backward (train)
    backend: str | None = None              # the moram backend it forces, if any
    tensors: list[Tensor] = field(default_factory=list)


class Setup:
    """Random inputs for one case: ``keys [N, d_in]``, ``values [N, d_out]``, a base
    ``nn.Linear``, ``n_rot`` inputs ``x [T, d_in]`` (rotated per call) and ``gy [T, d_out]``."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0, n_rot: int = 2):
        g = torch.Generator().manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0) -> Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.case, self.device, self.dtype = case, device, dtype
        # keys ~ N(0, 1/d_in) keep raw scores O(1), like Kaiming-initialised atoms
        self.keys = randn(case.n, case.d_in, scale=case.d_in ** -0.5)
        self.values = randn(case.n, case.d_out, scale=0.02)
        self.xs = [randn(case.t, case.d_in) for _ in range(n_rot)]
        self.gy = randn(case.t, case.d_out)
        self.base = nn.Linear(case.d_in, case.d_out, device=device, dtype=dtype)
        with torch.no_grad():
            self.base.weight.copy_(randn(case.d_out, case.d_in, scale=case.d_in ** -0.5))
            self.base.bias.copy_(randn(case.d_out, scale=0.1))
        self._layer: mk.MoRAMLinear | None = None

    def moram_layer(self) -> mk.MoRAMLinear:
        """A MoRAMLinear over these atoms: the first N - r frozen, the last r trainable."""
        if self._layer is None:
            c = self.case
            layer = mk.MoRAMLinear(self.base, r=c.r, k=c.k, tau=c.tau, delta=c.delta, alpha=c.alpha, eps=c.eps)
            nf = c.n - c.r
            layer._set_bank(frozen_keys=self.keys[:nf].clone(), frozen_values=self.values[:nf].clone(),
                            keys=self.keys[nf:].clone(), values=self.values[nf:].clone(),
                            task_sizes=torch.tensor([nf, c.r] if nf else [c.r], device=self.device))
            self._layer = layer.train()
        return self._layer


def _cycle(xs: list[Tensor]):
    return itertools.cycle(xs).__next__


def eval_impls(s: Setup, backends: list[str], compile: bool) -> list[Impl]:
    c = s.case
    hyper = dict(k=c.k, tau=c.tau, delta=c.delta, eps=c.eps)
    keys, values = s.keys, s.values
    x0 = s.xs[0]

    def wrap(f: Callable[[Tensor], Tensor]):
        nxt = _cycle(s.xs)

        def run():
            with torch.no_grad():
                return f(nxt())

        def out():
            with torch.no_grad():
                return f(x0)
        return run, out

    impls = [Impl(FLOOR, "floor", *wrap(lambda x: x @ keys.t()), dense_tn=1)]
    impls.append(Impl(AUTHORS, "moram", *wrap(lambda x: moram_dense(x, keys, values, **hyper)), dense_tn=5))
    if compile:
        cd = compiled_dense(**hyper)
        impls.append(Impl(COMPILED, "moram", *wrap(lambda x: cd(x, keys, values)), compiled=True, dense_tn=5))
    for b in backends:
        impls.append(Impl(backend_impl(b), "moram",
                          *wrap(lambda x, b=b: mk.moram(x, keys, values, backend=b, **hyper)),
                          dense_tn=2 if b == "reference" else 0, backend=b))
    ka, va = keys[:c.r], values[:c.r]
    impls.append(Impl(LORA_N, "lora", *wrap(lambda x: lora_delta(x, keys, values)), rank=c.n, dense_tn=1))
    impls.append(Impl(LORA_R, "lora", *wrap(lambda x: lora_delta(x, ka, va)), rank=c.r))
    return impls


def train_impls(s: Setup, backends: list[str], compile: bool) -> list[Impl]:
    c = s.case
    layer = s.moram_layer()
    xs = [x.detach().clone().requires_grad_(True) for x in s.xs]
    gy = s.gy

    def step_fn(module: nn.Module, before: Callable[[], None] = lambda: None):
        params = [p for p in module.parameters() if p.requires_grad]
        nxt = _cycle(xs)

        def step():
            before()
            x = nxt()
            y = module(x)
            y.backward(gy)
            x.grad = None
            for p in params:
                p.grad = None
            return y

        def out():
            before()
            return module(xs[0]).detach()

        def saved():
            before()
            _, nbytes = _saved(module, xs[0])
            return nbytes
        return dict(run=step, output=out, saved=saved)

    keys = s.keys
    x_nograd = [x.detach() for x in xs]
    nxt_floor = _cycle(x_nograd)

    def floor():
        with torch.no_grad():
            return nxt_floor() @ keys.t()

    def floor_out():
        with torch.no_grad():
            return x_nograd[0] @ keys.t()

    impls = [Impl(FLOOR, "floor", floor, floor_out, dense_tn=1)]
    # the base layer alone: each layer step minus this is the adapter's share of the step
    impls.append(Impl(BASE, "base", **step_fn(s.base)))
    impls.append(Impl(AUTHORS, "moram", **step_fn(AuthorsMoRAMLinear(layer).train()), dense_tn=8))
    if compile:
        impls.append(Impl(COMPILED, "moram", **step_fn(AuthorsMoRAMLinear(layer, compile=True).train()),
                          compiled=True, dense_tn=8))
    for b in backends:
        def use(b=b):
            layer.backend = b
        impls.append(Impl(backend_impl(b), "moram", **step_fn(layer, use), dense_tn=3 if b == "reference" else 0,
                          backend=b))
    for name, rank in ((LORA_N, c.n), (LORA_R, c.r)):
        lora = LoRALinear(s.base, rank, scaling=c.scaling)
        impls.append(Impl(name, "lora", **step_fn(lora), rank=rank, dense_tn=3 if name == LORA_N else 0))
    return impls


def _saved(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    from .timing import saved_for_backward

    def exclude() -> list[Tensor]:
        out = [x, *module.parameters(), *module.buffers()]
        # MoRAMLinear's cached Gram matrix of the frozen keys (and cast bank) lives as long
        # as the layer, whether or not a backward is pending, so it is not memory a step holds
        for m in module.modules():
            caches = getattr(m, "_caches", None)
            if caches is not None:
                for v in (caches.gram.value, caches.bank.value):
                    out += [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, Tensor)]
        return out
    return saved_for_backward(lambda: module(x), exclude)


# ---- nominal work: the same count for every MoRAM implementation ------------------------------

def work(case: Case, mode: str, impl: Impl, elem_bytes: int) -> tuple[float, float]:
    """Nominal (FLOPs, bytes) of one call.

    MoRAM implementations all get the sparse algorithm's useful work, so GFLOP/s ranks
    them exactly as time does: scoring ``2 T N d_in``, value gather ``2 T K d_out``; the
    train step adds the frozen base layer (forward and ``gx``), the backward's gather-dot
    and sparse ``gx`` (``2 T K (d_in + d_out)``), the dense normalisation term
    (``2 T min(N, d_in) d_in``, through the Gram matrix when that is cheaper) and the
    trainable atoms' gradients. LoRA gets its own dense count; the floor is one GEMM.
    Bytes count each tensor read or written once (value rows: those that can be drawn).
    """
    t, n, di, do, kk, r = case.t, case.n, case.d_in, case.d_out, case.kk, case.r
    e = elem_bytes
    base_f, base_b = 2 * t * di * do, e * di * do
    if impl.kind == "floor":
        return 2 * t * n * di, e * (t * di + n * di + t * n)
    if impl.kind == "base":
        return 2 * base_f, 2 * base_b
    if impl.kind == "lora":
        rk = impl.rank
        f = 2 * t * rk * (di + do)
        b = e * (t * di + rk * (di + do) + t * do)
        if mode == "eval":
            return f, b
        return 3 * f + 2 * base_f, 2 * b + 2 * base_b + e * rk * (di + do)
    f = 2 * t * n * di + 2 * t * kk * do
    b = e * (t * di + n * di + min(n, t * kk) * do + t * do)
    if mode == "eval":
        return f, b
    f_bwd = 2 * t * kk * (di + do) + 2 * t * min(n, di) * di + 2 * t * r * di + 2 * t * min(kk, r) * do
    return f + f_bwd + 2 * base_f, 2 * b + 2 * base_b + e * r * (di + do)


def dense_flops(case: Case, mode: str) -> float:
    """FLOPs of the authors' dense layer, for estimating run time before running it."""
    f = 2 * case.t * case.n * (case.d_in + case.d_out)
    return f if mode == "eval" else 3 * f + 4 * case.t * case.d_in * case.d_out


def refusal(case: Case, s: "Setup", backend: str) -> str | None:
    """Why the dispatch table would refuse this backend for these inputs, if it would."""
    from moram_kernels import backends as _dispatch
    inp = _dispatch.Inputs(s.device, s.dtype, s.dtype, s.dtype, case.d_in, case.d_out, case.n, case.kk)
    reasons = _dispatch._BY_NAME[backend].refuses(inp, True)
    return "; ".join(reasons) if reasons else None


def estimated_gb(case: Case, impl: Impl) -> float:
    return impl.dense_tn * case.t * case.n * 4 / 1e9


def rel_err(y: Tensor, ref: Tensor) -> float:
    y, ref = y.double(), ref.double()
    scale = ref.abs().max().item()
    return (y - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def is_finite(v: float) -> bool:
    return not (math.isnan(v) or math.isinf(v))
