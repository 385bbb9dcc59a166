"""Every implementation the main job times, as ONE table: :data:`COMPETITORS`.

A row names a competitor (``name``, the CSV's ``impl`` column; ``label``, its column in the
table and its line in the plots; ``style``, the line style), says which cost-model formula
counts its work (``kind``: ``benchmarks/cost_model.py``) and how to build one call of it in
each mode (``eval``: the forward of the adapter; ``train``: a step of the whole layer,
forward + backward incl. ``gx``). A builder takes the case's :class:`Setup` (and the
backend, for the per-backend row) and returns an :class:`Impl`: a zero-argument callable
that runs one call on rotating inputs, plus what the harness measures around it.

``python -m benchmarks`` (``benchmarks/run.py``), its report and plots
(``benchmarks/report.py``) and the pytest-benchmark tests (``tests/bench/test_benchmarks.py``)
all read this table, so adding a competitor is adding one row.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import moram_kernels as mk
from moram_kernels.backends.reference import moram_dense

from .baselines import AuthorsMoRAMLinear, LoRALinear, compiled_dense, fastest_gemm, lora_delta
from .grid import Case
from .timing import saved_for_backward

__all__ = ["Competitor", "COMPETITORS", "Impl", "Setup", "entries", "lookup", "display_order", "rel_err",
           "AUTHORS", "COMPILED", "FLOOR", "BASE", "LORA_N", "LORA_R"]


@dataclass
class Impl:
    """One competitor built on one case, in one mode."""

    run: Callable[[], object]               # one call, next rotating input
    output: Callable[[], Tensor]            # the output on the first input, for the check
    dense_tn: float = 0.0                   # [T, N] fp32 tensors it keeps alive, for the skip rule
    saved: Callable[[], int] | None = None  # train: bytes saved for backward
    module: nn.Module | None = None         # train: the module stepped (tests check its gradients)
    prepare: Callable[[], None] = lambda: None   # train: call before using ``module`` directly
    variant: str = ""                       # the floor: which of torch's GEMMs was fastest


class Setup:
    """Random inputs for one case: ``keys [N, d_in]``, ``values [N, d_out]``, a frozen base
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
        self.base.requires_grad_(False)
        self._layer: mk.MoRAMLinear | None = None
        self._train_xs: list[Tensor] | None = None
        self._floor_pick: tuple[str, Callable[[Tensor], Tensor]] | None = None

    @property
    def hyper(self) -> dict:
        c = self.case
        return dict(k=c.k, tau=c.tau, delta=c.delta, eps=c.eps)

    @property
    def train_xs(self) -> list[Tensor]:
        """The inputs as leaves that require grad, as in a hidden layer (shared by every
        train-mode competitor of this case)."""
        if self._train_xs is None:
            self._train_xs = [x.detach().clone().requires_grad_(True) for x in self.xs]
        return self._train_xs

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


# ---- building blocks of the builders ----------------------------------------------------------

def _forward(s: Setup, f: Callable[[Tensor], Tensor], dense_tn: float = 0.0) -> Impl:
    """An eval-mode call ``f(x)`` under no_grad, on the rotating inputs."""
    nxt = itertools.cycle(s.xs).__next__
    x0 = s.xs[0]

    def run():
        with torch.no_grad():
            return f(nxt())

    def out():
        with torch.no_grad():
            return f(x0)
    return Impl(run, out, dense_tn)


def _step(s: Setup, module: nn.Module, dense_tn: float = 0.0, prepare: Callable[[], None] = lambda: None) -> Impl:
    """A train step of ``module``: forward, backward of ``gy``, gradients cleared."""
    xs, gy = s.train_xs, s.gy
    params = [p for p in module.parameters() if p.requires_grad]
    nxt = itertools.cycle(xs).__next__

    def step():
        prepare()
        x = nxt()
        y = module(x)
        y.backward(gy)
        x.grad = None
        for p in params:
            p.grad = None
        return y

    def out():
        prepare()
        return module(xs[0]).detach()

    def saved():
        prepare()
        return _saved(module, xs[0])
    return Impl(step, out, dense_tn, saved, module, prepare)


def _saved(module: nn.Module, x: Tensor) -> int:
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
    return saved_for_backward(lambda: module(x), exclude)[1]


def _floor(s: Setup, backend=None) -> Impl:
    """The fastest torch GEMM of ``x @ keys.T`` in the case's dtype (picked once per case);
    the bare scoring GEMM has no backward, so the train row times the same forward."""
    if s._floor_pick is None:
        s._floor_pick = fastest_gemm(s.xs[0], s.keys)
    name, fn = s._floor_pick
    impl = _forward(s, fn, dense_tn=1)
    impl.variant = name
    return impl


def _backend_train(s: Setup, backend: str) -> Impl:
    layer = s.moram_layer()

    def use():
        layer.backend = backend
    return _step(s, layer, dense_tn=3 if backend == "reference" else 0, prepare=use)


# ---- the table --------------------------------------------------------------------------------

Builder = Callable[[Setup, "str | None"], Impl]


@dataclass(frozen=True)
class Competitor:
    """One row of :data:`COMPETITORS`. In the per-backend row, ``{backend}`` in ``name``
    and ``label`` stands for each moram backend timed (:func:`entries` fills it in)."""

    name: str                       # the CSV's impl column
    label: str                      # column of the markdown table, line of the plots
    kind: str                       # cost-model formula (benchmarks/cost_model.py:work)
    eval: Builder | None            # one eval forward; None: not timed in eval mode
    train: Builder | None           # one train step; None: not timed in train mode
    style: str = "-"                # matplotlib line style in the plots
    compiled: bool = False          # torch.compile: compiled before timing, see --compile
    per_backend: bool = False       # one entry per moram backend timed
    rank: Callable[[Case], int] | None = None     # LoRA rank, for the cost model
    backend: str | None = None      # filled in by entries() for the per-backend row

    def build(self, mode: str, s: Setup) -> Impl:
        builder = self.eval if mode == "eval" else self.train
        if builder is None:
            raise ValueError(f"{self.name} is not timed in {mode} mode")
        return builder(s, self.backend)

    def lora_rank(self, case: Case) -> int:
        return self.rank(case) if self.rank else 0


AUTHORS, COMPILED, FLOOR = "authors", "authors+compile", "floor:x@keys.T"
BASE = "base:layer"          # train mode: the frozen base layer's own step (forward + gx)
LORA_N, LORA_R = "lora:R=N", "lora:R=r"

COMPETITORS: list[Competitor] = [
    # the authors' layer: dense formulation (moram_dense); in train mode it concatenates the
    # frozen and trainable atoms on every call under plain autograd
    Competitor(AUTHORS, "authors", "moram",
               eval=lambda s, b: _forward(s, lambda x: moram_dense(x, s.keys, s.values, **s.hyper), dense_tn=5),
               train=lambda s, b: _step(s, AuthorsMoRAMLinear(s.moram_layer()).train(), dense_tn=8)),
    Competitor(COMPILED, "compiled", "moram", compiled=True,
               eval=lambda s, b: _forward(s, lambda x, f=compiled_dense(**s.hyper): f(x, s.keys, s.values),
                                          dense_tn=5),
               train=lambda s, b: _step(s, AuthorsMoRAMLinear(s.moram_layer(), compile=True).train(), dense_tn=8)),
    # every moram backend timed: mk.moram in eval, MoRAMLinear with layer.backend forced in train
    Competitor("moram:{backend}", "{backend}", "moram", per_backend=True,
               eval=lambda s, b: _forward(s, lambda x: mk.moram(x, s.keys, s.values, backend=b, **s.hyper),
                                          dense_tn=2 if b == "reference" else 0),
               train=_backend_train),
    # LoRA as wide as the bank (a dense adapter of rank N), and one task's adapter (rank r)
    Competitor(LORA_N, "LoRA R=N", "lora", style="--", rank=lambda c: c.n,
               eval=lambda s, b: _forward(s, lambda x: lora_delta(x, s.keys, s.values), dense_tn=1),
               train=lambda s, b: _step(s, LoRALinear(s.base, s.case.n, scaling=s.case.scaling), dense_tn=3)),
    Competitor(LORA_R, "LoRA R=r", "lora", style="--", rank=lambda c: c.r,
               eval=lambda s, b: _forward(s, lambda x: lora_delta(x, s.keys[:s.case.r], s.values[:s.case.r])),
               train=lambda s, b: _step(s, LoRALinear(s.base, s.case.r, scaling=s.case.scaling))),
    # the floor of exact top-K: the bare scoring GEMM, the fastest of torch's variants in the
    # case's dtype (timed first: its rate predicts the others')
    Competitor(FLOOR, "x@keys.T", "floor", style="--", eval=_floor, train=_floor),
    # train only: the frozen base layer's own step; a layer step minus this is the adapter's share
    Competitor(BASE, "base layer", "base", style=":", eval=None,
               train=lambda s, b: _step(s, s.base)),
]


def entries(backends: list[str], compile: bool, mode: str | None = None) -> list[Competitor]:
    """The table's rows with the per-backend row expanded over ``backends``, without the
    compiled ones unless ``compile``, and only those timed in ``mode`` if given."""
    out = []
    for c in COMPETITORS:
        if c.compiled and not compile:
            continue
        if mode is not None and (c.eval if mode == "eval" else c.train) is None:
            continue
        if c.per_backend:
            out += [dataclasses.replace(c, name=c.name.format(backend=b), label=c.label.format(backend=b),
                                        backend=b) for b in backends]
        else:
            out.append(c)
    return out


def _matches(c: Competitor, name: str) -> bool:
    if not c.per_backend:
        return c.name == name
    head, tail = c.name.split("{backend}")
    return name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail)


def lookup(name: str) -> Competitor:
    """The row of a CSV ``impl`` name, with the backend filled in for the per-backend row."""
    for c in COMPETITORS:
        if _matches(c, name):
            if not c.per_backend:
                return c
            head, tail = c.name.split("{backend}")
            b = name[len(head):len(name) - len(tail)]
            return dataclasses.replace(c, name=name, label=c.label.format(backend=b), backend=b)
    raise KeyError(f"{name!r} is not a competitor of benchmarks/competitors.py")


def display_order(names: list[str]) -> list[str]:
    """``names`` in the table's order (backends in their given order, at their row)."""
    return [n for c in COMPETITORS for n in names if _matches(c, n)]


def rel_err(y: Tensor, ref: Tensor) -> float:
    y, ref = y.double(), ref.double()
    scale = ref.abs().max().item()
    return (y - ref).abs().max().item() / (scale if scale > 0 else 1.0)
