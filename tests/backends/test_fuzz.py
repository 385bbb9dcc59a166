"""Property-based fuzzing: random shapes, dtypes, k, tau, delta and special values for every
backend; the output matches the reference, or a clear error is raised."""

import math

import pytest
import torch
from conftest import INTERPRETED
from helpers import DTYPES, assert_close, make_inputs, oracle
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import moram_kernels as mk
from moram_kernels.backends import reference as ref
from moram_kernels.functional import moram_segments

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# An interpreted backend (Triton on CPU) runs each call in Python, ~2 s a case: it gets
# half the examples (the same strategies; its kernels' shapes are also covered case by
# case in tests/backends/triton/).
INTERPRETED_EXAMPLES = {"forward": 12, "gradients": 10}
COMPILED = [b for b in mk.available_backends() if b not in INTERPRETED]
INTERPRETED_HERE = [b for b in mk.available_backends() if b in INTERPRETED]

FWD_STRATEGIES = dict(
    t=st.integers(0, 40), d_in=st.integers(1, 40), d_out=st.integers(1, 24),
    n=st.integers(0, 90), k=st.integers(1, 70), tau=st.floats(0.01, 2.0),
    delta=st.sampled_from([0.0, 0.05, 0.3]), dn=st.sampled_from(list(DTYPES)),
    special=st.sampled_from(["none", "nan", "inf", "zero"]), seed=st.integers(0, 2**16))


@pytest.mark.parametrize("backend", COMPILED)
@SETTINGS
@given(**FWD_STRATEGIES)
def test_matches_reference_or_raises(backend, t, d_in, d_out, n, k, tau, delta, dn, special, seed):
    _forward_case(backend, t, d_in, d_out, n, k, tau, delta, dn, special, seed)


@pytest.mark.parametrize("backend", INTERPRETED_HERE)
@settings(SETTINGS, max_examples=INTERPRETED_EXAMPLES["forward"])
@given(**FWD_STRATEGIES)
def test_matches_reference_or_raises_interpreted(backend, t, d_in, d_out, n, k, tau, delta, dn, special, seed):
    _forward_case(backend, t, d_in, d_out, n, k, tau, delta, dn, special, seed)


def _forward_case(backend, t, d_in, d_out, n, k, tau, delta, dn, special, seed):
    if backend in INTERPRETED and t * max(n, 1) > 600:
        t = min(t, 3)
    dt = DTYPES[dn]
    kk = 1 if n == 1 else min(max(k, 2), n)
    try:
        x, keys, values = make_inputs(t, d_in, d_out, n, k=k, dtype=dt, seed=seed,
                                      min_gap=0.05 if dn == "fp32" else 0.1, max_tries=50)
    except AssertionError:
        # no well-separated draw for this shape (e.g. d_in=1): not an example (Hypothesis
        # draws another instead; a plain return counted it as a pass)
        assume(False)
    bad_row = None
    if t and special != "none":
        bad_row = seed % t
        x[bad_row] = {"nan": math.nan, "inf": math.inf, "zero": 0.0}[special]
    try:
        y = mk.moram(x, keys, values, k=k, tau=tau, delta=delta, backend=backend)
    except RuntimeError as e:       # a backend that refuses these inputs must say why
        assert backend != "reference" and "cannot run these inputs" in str(e) and kk > 64, e
        return
    assert y.shape == (t, d_out) and y.dtype == dt
    want = oracle(x, keys, values, k=k, tau=tau, delta=delta)
    ok = torch.ones(t, dtype=torch.bool)
    if bad_row is not None and special != "zero":
        ok[bad_row] = False
        assert not torch.isfinite(y[bad_row]).all() or n == 0
    if special == "zero" and bad_row is not None:
        assert (y[bad_row] == 0).all()
    if ok.any():
        assert_close(y[ok], want[ok], dtype=dt)


GRAD_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


GRAD_STRATEGIES = dict(
    t=st.integers(1, 24), d_in=st.integers(2, 24), d_out=st.integers(1, 16),
    n=st.integers(1, 48), split=st.sampled_from([0.0, 0.5, 1.0]), k=st.integers(1, 20),
    tau=st.floats(0.05, 1.0), delta=st.sampled_from([0.0, 0.1]),
    dn=st.sampled_from(list(DTYPES)), scaled=st.booleans(), seed=st.integers(0, 2**16))


@pytest.mark.parametrize("backend", COMPILED)
@GRAD_SETTINGS
@given(**GRAD_STRATEGIES)
def test_gradients_match_dense_autograd(backend, t, d_in, d_out, n, split, k, tau, delta, dn, scaled, seed):
    _gradient_case(backend, t, d_in, d_out, n, split, k, tau, delta, dn, scaled, seed)


@pytest.mark.parametrize("backend", INTERPRETED_HERE)
@settings(GRAD_SETTINGS, max_examples=INTERPRETED_EXAMPLES["gradients"])
@given(**GRAD_STRATEGIES)
def test_gradients_match_dense_autograd_interpreted(backend, t, d_in, d_out, n, split, k, tau, delta, dn,
                                                    scaled, seed):
    _gradient_case(backend, t, d_in, d_out, n, split, k, tau, delta, dn, scaled, seed)


def _gradient_case(backend, t, d_in, d_out, n, split, k, tau, delta, dn, scaled, seed):
    """Every gradient (x, both segments' keys and values, and the per-atom scales when they
    require grad) against float64 autograd of the authors' dense layer, for tokens whose
    top-K is well separated and whose selected scores are away from the threshold."""
    if backend in INTERPRETED:
        t, n = min(t, 4), min(n, 16)
    dt = DTYPES[dn]
    try:
        x, keys, values = make_inputs(t, d_in, d_out, n, k=k, dtype=dt, seed=seed,
                                      min_gap=0.05 if dn == "fp32" else 0.1, max_tries=50)
    except AssertionError:
        assume(False)      # no well-separated draw for this shape
    kk = 1 if n == 1 else min(max(k, 2), n)
    if delta > 0:          # a low-precision score on the other side of delta is a different layer
        p = x.double() @ keys.double().T
        s = p.topk(kk, -1).values / p.norm(dim=-1, keepdim=True)
        assume(bool(((s - delta).abs() > 0.05).all()))
    n0 = int(n * split)
    scale = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5
    leaves = [z.clone().requires_grad_() for z in (x, keys[:n0], values[:n0], keys[n0:], values[n0:])]
    s0 = scale[:n0].clone().requires_grad_() if scaled else None
    s1 = scale[n0:].clone().requires_grad_() if scaled else None
    try:
        y, _ = moram_segments(leaves[0], leaves[1], leaves[2], s0, leaves[3], leaves[4], s1,
                              k=k, tau=tau, delta=delta, eps=1e-12, backend=backend)
    except RuntimeError as e:       # a backend that refuses these inputs must say why
        assert backend != "reference" and "cannot run these inputs" in str(e) and kk > 64, e
        return
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    inputs = leaves + ([s0, s1] if scaled else [])
    got = torch.autograd.grad(y, inputs, gy, allow_unused=True)

    def dense(xx, kk_, vv, ss, acc):
        return ref.moram_dense(xx.to(acc), kk_.to(acc), vv.to(acc), k=k, tau=tau, delta=delta,
                               value_scale=ss)
    x64, k64, v64 = (z.detach().double().requires_grad_() for z in (x, keys, values))
    sc64 = scale.double().requires_grad_() if scaled else None
    want = torch.autograd.grad(dense(x64, k64, v64, sc64, torch.float64), [x64, k64, v64] +
                               ([sc64] if scaled else []), gy.double())
    want_split = [want[0], want[1][:n0], want[2][:n0], want[1][n0:], want[2][n0:]]
    if scaled:
        want_split += [want[3][:n0], want[3][n0:]]
    lowp = [None] * len(want_split)
    if dt != torch.float32:        # PyTorch's own error in this dtype, for the 2x bound
        ll = [z.detach().clone().requires_grad_() for z in (x, keys, values)]
        sl = scale.to(dt).requires_grad_() if scaled else None
        yl = oracle(ll[0], ll[1], ll[2], k=k, tau=tau, delta=delta, value_scale=sl, dtype=dt)
        gl = torch.autograd.grad(yl, ll + ([sl] if scaled else []), gy)
        lowp = [gl[0], gl[1][:n0], gl[2][:n0], gl[1][n0:], gl[2][n0:]]
        if scaled:
            lowp += [gl[3][:n0], gl[3][n0:]]
    names = ["x", "keys0", "values0", "keys1", "values1", "scale0", "scale1"]
    for nm, g, w, lp, leaf in zip(names, got, want_split, lowp, inputs):
        if leaf.numel() == 0:
            assert g is None or g.numel() == 0
            continue
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, nm
        assert_close(g, w, dtype=dt, pytorch_lowp=lp, what=f"grad {nm} ({backend})")
