"""pytest-benchmark tests: one per competitor of ``benchmarks/competitors.py`` and mode,
each timing what the main job times and checking it computes what it should. CI runs them
once with ``--benchmark-disable``.

    pytest tests/bench/test_benchmarks.py                      # timed, for tracking over time
    pytest tests/bench/test_benchmarks.py --benchmark-disable  # run once, correctness only
"""

from __future__ import annotations

import pytest
import torch

import moram_kernels as mk
from benchmarks.baselines import AuthorsMoRAMLinear
from benchmarks.competitors import Setup, entries, rel_err
from benchmarks.grid import Case
from moram_kernels.backends.reference import moram_dense

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The Triton interpreter (TRITON_INTERPRET=1 on CPU) is a test tool: the parity suite
# covers it, timing it would mean nothing.
BACKENDS = [b for b in mk.available_backends() if not (b == "triton" and DEVICE.type == "cpu")]
# odd widths, N not a power of two, 2 tasks' worth of frozen atoms plus r trainable ones
CASE = Case("test", 97, 83, 300, 16, 65, r=16, tau=0.05, delta=0.2, alpha=32.0)
RTOL = 2e-5 if DEVICE.type == "cpu" else 2e-3     # relative to the largest |entry|
EVAL = entries(BACKENDS, compile=True, mode="eval")
# a cold torch.compile of a train step takes tens of seconds on 2 cores: not in the tests
TRAIN = [c for c in entries(BACKENDS, compile=True, mode="train") if not c.compiled]


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(CASE, DEVICE, torch.float32, seed=1)


def _eval_ref(s: Setup, kind: str, rank: int) -> torch.Tensor:
    """What an eval competitor of ``kind`` computes, in fp64 from the setup's tensors."""
    x, keys, values = s.xs[0].double(), s.keys.double(), s.values.double()
    if kind == "floor":
        return x @ keys.t()
    if kind == "lora":
        return (x @ keys[:rank].t()) @ values[:rank]
    c = s.case
    return moram_dense(x, keys, values, k=c.k, tau=c.tau, delta=c.delta, eps=c.eps)


@pytest.mark.parametrize("comp", EVAL, ids=lambda c: c.name)
def test_bench_eval(benchmark, setup, comp):
    impl = comp.build("eval", setup)
    if comp.compiled:
        impl.run()                                  # compile outside the timing
    y = benchmark(impl.run)
    assert y.shape == impl.output().shape
    assert rel_err(impl.output(), _eval_ref(setup, comp.kind, comp.lora_rank(CASE))) < RTOL


def test_the_authors_dense_layer_is_the_sparse_op():
    """The reference every eval row is checked against agrees with the sparse algorithm."""
    s = Setup(CASE, DEVICE, torch.float64, seed=1)
    c = s.case
    sparse = mk.moram(s.xs[0], s.keys, s.values, k=c.k, tau=c.tau, delta=c.delta, eps=c.eps,
                      backend="reference")
    assert rel_err(sparse, _eval_ref(s, "moram", 0)) < 1e-12


def _train_step(module, x, gy):
    """One train step; returns the output and every gradient it produced."""
    xg = x.detach().clone().requires_grad_(True)
    y = module(xg)
    y.backward(gy)
    grads = [xg.grad] + [p.grad for p in module.parameters() if p.requires_grad]
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


def _authors_train_ref(setup: Setup):
    """The authors' layer in fp64 on the same atoms: output and gradients."""
    layer = setup.moram_layer()
    ref = mk.MoRAMLinear(torch.nn.Linear(CASE.d_in, CASE.d_out).double(), r=CASE.r, k=CASE.k,
                         tau=CASE.tau, delta=CASE.delta, alpha=CASE.alpha, eps=CASE.eps)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref.train()
    return _train_step(AuthorsMoRAMLinear(ref).train(), setup.xs[0].double(), setup.gy.double())


@pytest.mark.parametrize("comp", TRAIN, ids=lambda c: c.name)
def test_bench_train(benchmark, setup, comp):
    impl = comp.build("train", setup)
    benchmark(impl.run)
    x, gy = setup.xs[0], setup.gy
    if comp.kind == "floor":                        # the bare GEMM: a forward only
        assert impl.module is None
        assert rel_err(impl.output(), _eval_ref(setup, "floor", 0)) < RTOL
        return
    impl.prepare()
    y, grads = _train_step(impl.module, x, gy)
    assert rel_err(impl.output(), y) < RTOL
    if comp.kind == "moram":
        y_ref, grads_ref = _authors_train_ref(setup)
        assert len(grads) == len(grads_ref) == 3          # x, trainable keys, trainable values
    elif comp.kind == "lora":
        a, b = impl.module.lora_a.detach(), impl.module.lora_b.detach()
        assert a.shape[0] == comp.lora_rank(CASE)
        with torch.no_grad():
            h = x @ a.t()
            y_ref = setup.base(x) + h @ b * CASE.scaling
            # dL/dx = gy W + scaling gy B^T A; dL/dA = scaling (gy B^T)^T x; dL/dB = scaling h^T gy
            grads_ref = [gy @ setup.base.weight + CASE.scaling * (gy @ b.t()) @ a,
                         CASE.scaling * (gy @ b.t()).t() @ x, CASE.scaling * h.t() @ gy]
    else:                                           # the frozen base layer: forward and gx
        assert comp.kind == "base"
        with torch.no_grad():
            y_ref, grads_ref = setup.base(x), [gy @ setup.base.weight]
    assert rel_err(y, y_ref) < RTOL
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < RTOL
