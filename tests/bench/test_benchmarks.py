"""pytest-benchmark tests: each times one thing the benchmark compares, and checks it
computes what it should. CI runs them once with ``--benchmark-disable``.

    pytest tests/bench/test_benchmarks.py                      # timed, for tracking over time
    pytest tests/bench/test_benchmarks.py --benchmark-disable  # run once, correctness only
"""

from __future__ import annotations

import pytest
import torch

import moram_kernels as mk
from benchmarks.baselines import AuthorsMoRAMLinear, LoRALinear, compiled_dense
from benchmarks.grid import Case
from benchmarks.impls import Setup, rel_err
from moram_kernels.backends.reference import moram_dense

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The Triton interpreter (TRITON_INTERPRET=1 on CPU) is a test tool: the parity suite
# covers it, timing it would mean nothing.
BACKENDS = [b for b in mk.available_backends() if not (b == "triton" and DEVICE.type == "cpu")]
# odd widths, N not a power of two, 2 tasks' worth of frozen atoms plus r trainable ones
CASE = Case("test", 97, 83, 300, 16, 65, r=16, tau=0.05, delta=0.2, alpha=32.0)
RTOL = 2e-5 if DEVICE.type == "cpu" else 2e-3     # relative to the largest |entry|


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(CASE, DEVICE, torch.float32, seed=1)


def _eval_ref(s: Setup) -> torch.Tensor:
    c = s.case
    return moram_dense(s.xs[0].double(), s.keys.double(), s.values.double(), k=c.k, tau=c.tau,
                       delta=c.delta, eps=c.eps)


def _train_step(module, x, gy):
    """One train step; returns the output and every gradient it produced."""
    xg = x.detach().clone().requires_grad_(True)
    y = module(xg)
    y.backward(gy)
    grads = [xg.grad] + [p.grad for p in module.parameters() if p.requires_grad]
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_eval_forward(benchmark, setup, backend):
    c = setup.case
    with torch.no_grad():
        y = benchmark(mk.moram, setup.xs[0], setup.keys, setup.values, k=c.k, tau=c.tau,
                      delta=c.delta, eps=c.eps, backend=backend)
    assert rel_err(y, _eval_ref(setup)) < RTOL


def test_bench_eval_authors(benchmark, setup):
    c = setup.case
    with torch.no_grad():
        y = benchmark(moram_dense, setup.xs[0], setup.keys, setup.values, k=c.k, tau=c.tau,
                      delta=c.delta, eps=c.eps)
        sparse = mk.moram(setup.xs[0].double(), setup.keys.double(), setup.values.double(), k=c.k,
                          tau=c.tau, delta=c.delta, eps=c.eps, backend="reference")
    assert rel_err(y, sparse) < RTOL


def test_bench_eval_authors_compiled(benchmark, setup):
    c = setup.case
    fn = compiled_dense(c.k, c.tau, c.delta, c.eps)
    with torch.no_grad():
        fn(setup.xs[1], setup.keys, setup.values)      # compile outside the timing
        y = benchmark(fn, setup.xs[0], setup.keys, setup.values)
    assert rel_err(y, _eval_ref(setup)) < RTOL


def _authors_train_ref(setup: Setup):
    """The authors' layer in fp64 on the same atoms: output and gradients."""
    layer = setup.moram_layer()
    ref = mk.MoRAMLinear(torch.nn.Linear(CASE.d_in, CASE.d_out).double(), r=CASE.r, k=CASE.k,
                         tau=CASE.tau, delta=CASE.delta, alpha=CASE.alpha, eps=CASE.eps)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref.train()
    return _train_step(AuthorsMoRAMLinear(ref).train(), setup.xs[0].double(), setup.gy.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_train_step(benchmark, setup, backend):
    layer = setup.moram_layer()
    layer.backend = backend
    y, grads = benchmark(_train_step, layer, setup.xs[0], setup.gy)
    y_ref, grads_ref = _authors_train_ref(setup)
    assert rel_err(y, y_ref) < RTOL
    assert len(grads) == len(grads_ref) == 3          # x, trainable keys, trainable values
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < RTOL


def test_bench_train_authors(benchmark, setup):
    layer = setup.moram_layer()
    y, grads = benchmark(_train_step, AuthorsMoRAMLinear(layer).train(), setup.xs[0], setup.gy)
    y_ref, grads_ref = _authors_train_ref(setup)
    assert rel_err(y, y_ref) < RTOL
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < RTOL


def test_bench_train_lora(benchmark, setup):
    lora = LoRALinear(setup.base, rank=CASE.r, scaling=CASE.scaling)
    y, grads = benchmark(_train_step, lora, setup.xs[0], setup.gy)
    x = setup.xs[0]
    with torch.no_grad():
        expect = setup.base(x) + (x @ lora.lora_a.t()) @ lora.lora_b * CASE.scaling
    assert rel_err(y, expect) < RTOL
    # dL/dB = scaling * (x A^T)^T gy
    with torch.no_grad():
        gb = CASE.scaling * (x @ lora.lora_a.t()).t() @ setup.gy
    assert rel_err(grads[2], gb) < RTOL
