"""The reference path: dense (authors') and sparse forms agree with each other and with an
independent float64 oracle; the hand-written backward passes gradcheck."""

import pytest
import torch
from helpers import DTYPES, assert_close, make_inputs, oracle

import moram_kernels as mk
from moram_kernels.backends import reference as ref


@pytest.mark.parametrize("dn", list(DTYPES))
@pytest.mark.parametrize("delta", [0.0, 0.2], ids=["nodelta", "delta0.2"])
@pytest.mark.parametrize("shape", [(1, 8, 4, 1, 16), (9, 97, 13, 5, 16), (65, 64, 32, 200, 16),
                                   (31, 16, 8, 70, 64)],
                         ids=["T1-N1", "T9-d97-N5-k16", "T65-N200", "T31-N70-k64"])
def test_dense_sparse_oracle_agree(dn, delta, shape):
    t, d_in, d_out, n, k = shape
    dt = DTYPES[dn]
    x, keys, values = make_inputs(t, d_in, d_out, n, k=k, dtype=dt)
    vs = torch.rand(n) + 0.5
    kw = dict(k=k, tau=0.05, delta=delta, value_scale=vs)
    want = oracle(x, keys, values, **kw)
    dense = ref.moram_dense(x, keys, values, **kw)
    sparse = mk.moram(x, keys, values, backend="reference", **kw)
    for got, what in ((dense, "dense"), (sparse, "sparse")):
        assert got.dtype == dt
        assert_close(got, want, dtype=dt, what=what)
    assert_close(sparse, dense.double(), dtype=dt, what="sparse vs dense")


def test_dense_and_sparse_gradients_agree():
    x, keys, values = make_inputs(40, 24, 16, 60, k=8)
    a = [t.clone().requires_grad_() for t in (x, keys, values)]
    b = [t.clone().requires_grad_() for t in (x, keys, values)]
    gy = torch.randn(40, 16)
    ga = torch.autograd.grad(ref.moram_dense(*a, k=8, tau=0.1, delta=0.1), a, gy)
    gb = torch.autograd.grad(mk.moram(*b, k=8, tau=0.1, delta=0.1, backend="reference"), b, gy)
    for u, v in zip(ga, gb):
        assert_close(v, u.double(), dtype=torch.float32)


@pytest.mark.parametrize("delta", [0.0, 0.1])
@pytest.mark.parametrize("scale", [None, 0.7, "tensor"])
def test_gradcheck_float64(delta, scale):
    x, keys, values = make_inputs(6, 5, 4, 9, k=3, dtype=torch.float64)
    vs = torch.rand(9, dtype=torch.float64) + 0.5 if scale == "tensor" else scale
    inputs = tuple(t.clone().requires_grad_() for t in (x, keys, values))
    assert torch.autograd.gradcheck(
        lambda a, b, c: mk.moram(a, b, c, k=3, tau=0.3, delta=delta, value_scale=vs,
                                 backend="reference"), inputs)


def test_gradcheck_two_segments_and_gram():
    """The op with a frozen segment (with its cached Gram) and a trainable one."""
    from moram_kernels.functional import moram_segments
    x, keys, values = make_inputs(5, 6, 3, 10, k=4, dtype=torch.float64)
    k0, v0 = keys[:7], values[:7]
    g0 = ref.gram(k0, torch.float64)
    s1 = torch.full((3,), 2.0, dtype=torch.float64)
    inputs = (x.clone().requires_grad_(), keys[7:].clone().requires_grad_(),
              values[7:].clone().requires_grad_())
    fn = lambda a, b, c: moram_segments(a, k0, v0, None, b, c, s1, k=4, tau=0.3, delta=0.0,  # noqa: E731
                                        eps=1e-12, gram0=g0, backend="reference")[0]
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradient_contains_the_dense_normalisation_term():
    """gx = sparse part - alpha * G x: the second part is large, and gradcheck (above) sees
    the full gradient. A backward with only the K selected atoms differs by that term."""
    x, keys, values = make_inputs(8, 6, 4, 12, k=3, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y = mk.moram(xr, keys, values, k=3, tau=0.3, backend="reference")
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, xr, gy)
    # rebuild the gradient by hand without the dense term
    _, idx, p_sel, norm = ref.moram_fwd(x, keys, values, None, keys[:0], values[:0], None, 3, 0.3, 0.0, 1e-12)
    w = torch.softmax(p_sel / norm[:, None] / 0.3, -1)
    gc = torch.einsum("tkd,td->tk", values[idx], gy)
    gw = p_sel * gc
    gs = w / 0.3 * (gw - (w * gw).sum(-1, keepdim=True))
    sparse_only = torch.einsum("tk,tkd->td", w * gc + gs / norm[:, None], keys[idx])
    alpha = (gs * p_sel).sum(-1) / norm**3
    dense_term = -alpha[:, None] * (x @ keys.T @ keys)
    assert dense_term.abs().max() > 1e-2 * gx.abs().max()
    torch.testing.assert_close(gx, sparse_only + dense_term)
    assert (gx - sparse_only).abs().max() > 1e-3


def test_effective_k():
    assert [ref.effective_k(k, n) for k, n in [(1, 1), (1, 5), (16, 5), (16, 100), (3, 2)]] == [1, 2, 5, 16, 2]


def test_all_zero_scores_add_zero():
    keys, values = torch.randn(6, 4), torch.randn(6, 3)
    y = ref.moram_dense(torch.zeros(2, 4), keys, values, k=2, tau=0.1)
    assert (y == 0).all()
