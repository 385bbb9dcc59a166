"""Every backend usable here against the float64 reference: forward and backward, every
dtype, odd shapes, both atom segments. Interpreted backends (Triton on CPU) get the small
cases only, since the interpreter runs each program in Python."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRETED
from helpers import DTYPES, assert_close, effective_k, make_inputs, oracle

import moram_kernels as mk
from moram_kernels import backends as _dispatch
from moram_kernels.backends import reference as ref
from moram_kernels.functional import moram_segments

# name: (T, d_in, d_out, N, k, small)   small = cheap enough for an interpreter (True), in
# fp32 only ("fp32": the largest K bucket costs the interpreter ~25 s a call, and its dtype
# handling is the same code as the other buckets', which run every dtype), or not (False)
CASES = {
    "T1-N1-k16": (1, 8, 8, 1, 16, True),
    "T7-N2-k2": (7, 16, 12, 2, 2, True),
    "T5-N5-k16": (5, 24, 16, 5, 16, True),           # N < k
    "T33-d97-N40-k8": (33, 97, 50, 40, 8, True),     # odd sizes
    "T17-N130-k64": (17, 32, 40, 130, 64, "fp32"),   # largest K bucket
    "T1025-d48-N300-k16": (1025, 48, 40, 300, 16, False),
    "T64-d64-N5000-k16": (64, 64, 64, 5000, 16, False),
}


def _params():
    out = []
    for b in mk.available_backends():
        for name, (*_, small) in CASES.items():
            if b in INTERPRETED and not small:
                continue
            for dn in DTYPES:
                if b in INTERPRETED and small == "fp32" and dn != "fp32":
                    continue
                out.append(pytest.param(b, name, dn, id=f"{b}-{name}-{dn}"))
    return out


def _split(n, case_idx):
    """Rotate segment layouts across cases: all frozen, all trainable, or split."""
    return [n, 0, n // 2][case_idx % 3]


def _setup(name, dn, seed=0):
    t, d_in, d_out, n, k, _ = CASES[name]
    dt = DTYPES[dn]
    x, keys, values = make_inputs(t, d_in, d_out, n, k=k, dtype=dt, seed=seed, min_gap=0.0)
    i = list(CASES).index(name)
    n0 = _split(n, i)
    scale = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5 if i % 2 else None
    delta = 0.15 if i % 4 == 1 else 0.0
    return x, keys, values, n0, scale, delta, effective_k(k, n)


def _segments(keys, values, scale, n0):
    s0 = scale[:n0].contiguous() if scale is not None else None
    s1 = scale[n0:].contiguous() if scale is not None else None
    return keys[:n0], values[:n0], s0, keys[n0:], values[n0:], s1


def _given_idx64(x, keys, values, scale, idx, tau, delta, eps):
    """Forward and the saved tensors in float64, for the selection a backend made."""
    p = x.double() @ keys.double().T
    norm = p.norm(dim=-1).clamp_min(eps)
    p_sel = p.gather(1, idx)
    sc = scale.double()[idx] if scale is not None else torch.ones_like(p_sel)
    s = p_sel / norm[:, None]
    w = torch.softmax(s / tau, -1) * ((s >= delta).double() if delta > 0 else 1.0)
    y = torch.einsum("tk,tkd->td", w * p_sel * sc, values.double()[idx])
    return y, p_sel, norm


TAU, EPS = 0.1, 1e-12


@pytest.mark.parametrize("backend,case,dn", _params())
def test_forward_op(backend, case, dn):
    x, keys, values, n0, scale, delta, kk = _setup(case, dn)
    impl = _dispatch._BY_NAME[backend].impl()
    y, idx, p_sel, norm = impl.moram_fwd(x, *_segments(keys, values, scale, n0), kk, TAU, delta, EPS)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], values.shape[1])
    assert idx.shape == (x.shape[0], kk) and idx.dtype == torch.int64
    assert p_sel.dtype == torch.float32 and norm.dtype == torch.float32
    # the selection is a top-K of the scores (ties allowed), with distinct atoms
    p64 = x.double() @ keys.double().T
    kth = p64.topk(kk, -1).values[:, -1:]
    spread = p64.abs().amax(-1, keepdim=True)
    assert ((idx >= 0) & (idx < keys.shape[0])).all()
    assert all(len(set(r)) == kk for r in idx.tolist()), "an atom was selected twice"
    assert (p64.gather(1, idx) >= kth - 1e-5 * spread).all(), "selection is not a top-K"
    y64, p_sel64, norm64 = _given_idx64(x, keys, values, scale, idx, TAU, delta, EPS)
    assert_close(p_sel, p_sel64, dtype=torch.float32, what="p_sel")
    assert_close(norm, norm64, dtype=torch.float32, what="norm")
    assert_close(y, y64, dtype=x.dtype, what="y")


@pytest.mark.parametrize("backend,case,dn", _params())
def test_backward_op(backend, case, dn):
    """Each backend's backward against float64 autograd of the forward, for the selection
    the backend made (no hand-written backward on the reference side)."""
    x, keys, values, n0, scale, delta, kk = _setup(case, dn, seed=1)
    impl = _dispatch._BY_NAME[backend].impl()
    segs = _segments(keys, values, scale, n0)
    _, idx, p_sel, norm = impl.moram_fwd(x, *segs, kk, TAU, delta, EPS)
    gy = torch.randn(x.shape[0], values.shape[1]).to(x.dtype)
    gram0 = ref.gram(segs[0]) if n0 and case.startswith("T64") else None
    got = impl.moram_bwd(gy, x, *segs[:3], *segs[3:], gram0, idx, p_sel, norm, TAU, delta, EPS,
                         True, True, True)
    leaves = [t.detach().double().requires_grad_() for t in (x, segs[0], segs[1], segs[3], segs[4])]
    x64, k0, v0, k1, v1 = leaves
    y64, _, _ = _given_idx64(x64, torch.cat([k0, k1]), torch.cat([v0, v1]), scale, idx,
                             TAU, delta, EPS)
    want = torch.autograd.grad(y64, leaves, gy.double(), allow_unused=True)
    names = ("gx", "gkeys0", "gvalues0", "gkeys1", "gvalues1")
    for nm, g, w, like in zip(names, got, want, (x, *segs[0:2], *segs[3:5])):
        if like.shape[0] == 0 and nm != "gx":
            assert g is None or g.numel() == 0
            continue
        assert g is not None and g.shape == like.shape and g.dtype == like.dtype, nm
        assert_close(g, w, dtype=x.dtype, what=f"{nm} ({backend})")


@pytest.mark.parametrize("backend", mk.available_backends())
def test_backward_op_only_needed_segments(backend):
    x, keys, values = make_inputs(9, 16, 8, 20, k=4, min_gap=0.0)
    impl = _dispatch._BY_NAME[backend].impl()
    segs = _segments(keys, values, None, 12)
    _, idx, p_sel, norm = impl.moram_fwd(x, *segs, 4, TAU, 0.0, EPS)
    gy = torch.randn(9, 8)
    gx, gk0, gv0, gk1, gv1 = impl.moram_bwd(gy, x, *segs[:3], *segs[3:], None, idx, p_sel, norm,
                                             TAU, 0.0, EPS, False, False, True)
    assert gx is None and gk0 is None and gv0 is None
    assert gk1.shape == (8, 16) and gv1.shape == (8, 8)


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("dn", list(DTYPES))
def test_public_forward_matches_authors_layer(backend, dn):
    """mk.moram against the float64 oracle of the authors' layer; the bound is 2x what the
    authors' layer itself achieves when run in that dtype."""
    dt = DTYPES[dn]
    x, keys, values = make_inputs(40, 32, 24, 48, k=8, dtype=dt, lead=(5, 8))
    vs = torch.rand(48) + 0.5
    y = mk.moram(x, keys, values, k=8, tau=0.1, delta=0.1, value_scale=vs, backend=backend)
    want = oracle(x, keys, values, k=8, tau=0.1, delta=0.1, value_scale=vs)
    lowp = oracle(x, keys, values, k=8, tau=0.1, delta=0.1, value_scale=vs, dtype=dt).to(dt)
    assert y.shape == (5, 8, 24) and y.dtype == dt
    assert_close(y, want, dtype=dt, pytorch_lowp=lowp if dt != torch.float32 else None)


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("dn", list(DTYPES))
def test_public_gradients_match_authors_layer(backend, dn):
    """Gradients of x, keys and values against autograd through the float64 oracle."""
    dt = DTYPES[dn]
    x, keys, values = make_inputs(24, 20, 12, 30, k=4, dtype=dt)
    leaves = [t.clone().requires_grad_() for t in (x, keys, values)]
    y = mk.moram(*leaves, k=4, tau=0.2, backend=backend)
    gy = torch.randn(y.shape).to(dt)
    got = torch.autograd.grad(y, leaves, gy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(oracle(*leaves64, k=4, tau=0.2), leaves64, gy.double())
    lowp = None
    if dt != torch.float32:
        leaves_lp = [t.detach().clone().requires_grad_() for t in leaves]
        lowp = torch.autograd.grad(oracle(*leaves_lp, k=4, tau=0.2, dtype=dt), leaves_lp, gy)
    for i, nm in enumerate(("x", "keys", "values")):
        assert got[i].dtype == dt
        assert_close(got[i], want[i], dtype=dt, pytorch_lowp=None if lowp is None else lowp[i],
                     what=f"grad {nm}")


@pytest.mark.parametrize("backend", mk.available_backends())
def test_dense_normalisation_term_reaches_unselected_atoms(backend):
    """Atoms outside every token's top-K get a key gradient only through the norm term
    -alpha * p_j; a backward that drops it gives zero there and fails this test."""
    x, keys, values = make_inputs(3, 16, 8, 40, k=2)
    keys = keys.clone().requires_grad_()
    y = mk.moram(x, keys, values, k=2, tau=0.1, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), keys)
    k64 = keys.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(oracle(x, k64, values, k=2, tau=0.1).sum(), k64)
    p = x.double() @ keys.detach().double().T
    chosen = torch.zeros(40, dtype=torch.bool)
    chosen[p.topk(2, -1).indices.flatten()] = True
    assert (~chosen).sum() >= 30
    assert want[~chosen].abs().max() > 1e-3, "the oracle's dense term should be visible"
    assert_close(g[~chosen], want[~chosen], dtype=torch.float32, what="unselected key grads")


@pytest.mark.parametrize("backend", mk.available_backends())
def test_nan_token_stays_in_its_row(backend):
    x, keys, values = make_inputs(6, 16, 8, 20, k=4)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    y = mk.moram(x, keys, values, k=4, tau=0.1, backend=backend)
    assert torch.isnan(y[2]).all()
    ok = torch.tensor([0, 1, 3, 5])
    assert torch.isfinite(y[ok]).all()
    assert_close(y[ok], oracle(x[ok], keys, values, k=4, tau=0.1), dtype=torch.float32)


@pytest.mark.parametrize("backend", mk.available_backends())
def test_zero_token_adds_exactly_zero(backend):
    """A token x = 0 adds exactly zero. Its gradient is the uniform softmax (n clamped to eps,
    so no norm term) over whichever K atoms the backend picked: (1/K) sum gc_i a_i."""
    x, keys, values = make_inputs(4, 16, 8, 20, k=4)
    x[1] = 0
    xr = x.clone().requires_grad_()
    y, idx = moram_segments(xr, keys, values, None, keys[:0], values[:0], None, k=4, tau=0.1,
                            delta=0.0, eps=EPS, backend=backend)
    assert (y[1] == 0).all()
    gy = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, xr, gy)
    sel = idx[1]
    gc = values.double()[sel] @ gy[1].double()                         # [K]
    want_zero_row = (gc[:, None] * keys.double()[sel]).sum(0) / sel.numel()
    assert want_zero_row.abs().max() > 1e-3, "the zero token's gradient should be visible"
    assert_close(gx[1], want_zero_row, dtype=torch.float32, what="gx of the zero token")
    ok = torch.tensor([0, 2, 3])
    x64 = x[ok].double().requires_grad_()
    (want,) = torch.autograd.grad(oracle(x64, keys, values, k=4, tau=0.1), x64, gy[ok].double())
    assert_close(gx[ok], want, dtype=torch.float32, what="gx of the other tokens")


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("kd", ["fp32", "bf16"])
def test_mixed_dtypes(backend, kd):
    """bf16 activations with fp32 or bf16 atoms: output in the dtype of x."""
    x, keys, values = make_inputs(12, 32, 16, 24, k=4, dtype=torch.bfloat16, keys_dtype=DTYPES[kd])
    y = mk.moram(x, keys, values, k=4, tau=0.1, backend=backend)
    assert y.dtype == torch.bfloat16
    assert_close(y, oracle(x, keys, values, k=4, tau=0.1), dtype=torch.bfloat16)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("shape,n", [((0, 8), 5), ((2, 0, 8), 5), ((4, 8), 0), ((0, 8), 0)],
                         ids=["T0", "T0-lead", "N0", "T0-N0"])
@pytest.mark.parametrize("xd", ["fp32", "bf16"])
def test_empty_inputs_take_part_in_autograd(backend, shape, n, xd):
    """No tokens or no atoms: zeros of the right shape, and a loss on them back-propagates
    zero gradients of each input's shape and dtype (also to a value_scale tensor)."""
    x = torch.randn(*shape).to(DTYPES[xd])
    x[..., 0] = float("nan")                         # nothing may leak from x into the zeros
    x, keys, values, vs = _leaves(x, torch.randn(n, 8), torch.randn(n, 3), torch.rand(n) + 0.5)
    y = mk.moram(x, keys, values, k=2, tau=0.1, value_scale=vs, backend=backend)
    assert y.shape == (*shape[:-1], 3) and y.dtype == x.dtype and (y == 0).all()
    assert y.grad_fn is not None
    (y.float() * 3).sum().backward()
    for t in (x, keys, values, vs):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
        assert (t.grad == 0).all()


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("delta", [0.0, 0.15])
def test_value_scale_gradient(backend, delta):
    """A [N] value_scale that requires grad gets dL/ds_i = sum_t w_ti m_ti p_ti <b_i, gy_t>,
    against float64 autograd of the authors' dense layer, with x, keys, values alongside."""
    x, keys, values = make_inputs(18, 16, 10, 24, k=4)
    vs = torch.rand(24) + 0.5
    leaves = _leaves(x, keys, values, vs)
    y = mk.moram(*leaves[:3], k=4, tau=0.2, delta=delta, value_scale=leaves[3], backend=backend)
    gy = torch.randn(y.shape)
    got = torch.autograd.grad(y, leaves, gy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(ref.moram_dense(*l64[:3], k=4, tau=0.2, delta=delta, value_scale=l64[3]),
                               l64, gy.double())
    assert want[3].abs().max() > 1e-3
    for nm, g, w, leaf in zip(("x", "keys", "values", "value_scale"), got, want, leaves):
        assert g.dtype == leaf.dtype
        assert_close(g, w, dtype=torch.float32, what=f"grad {nm}")


@pytest.mark.parametrize("backend", mk.available_backends())
def test_value_scale_gradient_both_segments(backend):
    """Per-segment scales (the module's frozen bank and trainable atoms), each requiring grad."""
    x, keys, values = make_inputs(15, 12, 6, 20, k=5)
    s0, s1 = torch.rand(13) + 0.5, torch.rand(7) + 0.5
    xl, k0, v0, k1, v1, sl0, sl1 = _leaves(x, keys[:13], values[:13], keys[13:], values[13:], s0, s1)
    y, _ = moram_segments(xl, k0, v0, sl0, k1, v1, sl1, k=5, tau=0.1, delta=0.0, eps=EPS,
                          backend=backend)
    gy = torch.randn(y.shape)
    got = torch.autograd.grad(y, (xl, k0, v0, k1, v1, sl0, sl1), gy)
    l64 = [t.detach().double().requires_grad_() for t in (x, keys, values, torch.cat([s0, s1]))]
    want = torch.autograd.grad(ref.moram_dense(*l64[:3], k=5, tau=0.1, value_scale=l64[3]), l64,
                               gy.double())
    pairs = [(got[0], want[0]), (got[1], want[1][:13]), (got[2], want[2][:13]),
             (got[3], want[1][13:]), (got[4], want[2][13:]), (got[5], want[3][:13]),
             (got[6], want[3][13:])]
    for i, (g, w) in enumerate(pairs):
        assert_close(g, w, dtype=torch.float32, what=f"gradient {i}")


def _spy(monkeypatch, backend):
    """Record the strides of the x that the backend's own moram_fwd/moram_bwd receive.

    The eager C++ entry point of the cpu/cuda kernels (moram_kernels/eager.py) never goes
    through the Python backend functions, so it is switched off here until the test ends;
    tests/test_eager.py checks that it gives the same values and gradients as this path on
    strided inputs."""
    from moram_kernels import eager
    monkeypatch.setattr(eager, "ENTRY", [None])
    impl = _dispatch._BY_NAME[backend].impl()
    seen = {}
    for fn in ("moram_fwd", "moram_bwd"):
        real = getattr(impl, fn)

        def spy(*args, _real=real, _fn=fn):
            x = args[0] if _fn == "moram_fwd" else args[1]
            seen[_fn] = (tuple(x.shape), x.stride(), x.data_ptr())
            return _real(*args)
        monkeypatch.setattr(impl, fn, spy)
    return seen


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("view", ["every-other-column", "transposed-2d", "transposed-3d"])
def test_strided_x_reaches_the_backend_and_is_right(backend, view, monkeypatch):
    """A strided 2-D x reaches the backend as it is (no copy); a 3-D view that cannot be
    flattened without one is copied by reshape. Forward and every gradient are right."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(20, 16, generator=g) / 4, torch.randn(20, 8, generator=g)
    base = {"every-other-column": torch.randn(12, 32, generator=g),
            "transposed-2d": torch.randn(16, 12, generator=g),
            "transposed-3d": torch.randn(3, 4, 16, generator=g)}[view]
    leaf, kl, vl = _leaves(base, keys, values)
    make = {"every-other-column": lambda t: t[:, ::2], "transposed-2d": lambda t: t.t(),
            "transposed-3d": lambda t: t.transpose(0, 1)}[view]
    xv = make(leaf)
    assert not xv.is_contiguous()
    seen = _spy(monkeypatch, backend)
    y = mk.moram(xv, kl, vl, k=4, tau=0.1, backend=backend)
    gy = torch.randn(y.shape)
    got = torch.autograd.grad(y, (leaf, kl, vl), gy)
    x2 = xv.reshape(-1, 16)
    want_layout = (tuple(x2.shape), x2.stride())
    if view == "transposed-3d":
        assert x2.is_contiguous() and seen["moram_fwd"][2] != leaf.data_ptr()
    else:
        assert seen["moram_fwd"][2] == xv.data_ptr(), "a strided 2-D x was copied before the backend"
    assert seen["moram_fwd"][:2] == want_layout and seen["moram_bwd"][:2] == want_layout
    l64 = [t.detach().double().requires_grad_() for t in (base, keys, values)]
    y64 = oracle(make(l64[0]), l64[1], l64[2], k=4, tau=0.1)
    want = torch.autograd.grad(y64, l64, gy.double())
    assert_close(y, y64, dtype=torch.float32)
    for nm, a, b in zip(("x", "keys", "values"), got, want):
        assert_close(a, b, dtype=torch.float32, what=f"grad {nm}")


def _mixed_case(xd, backend):
    x, keys, values = make_inputs(20, 24, 12, 30, k=4, dtype=xd, keys_dtype=torch.float32)
    leaves = _leaves(x, keys, values)
    y = mk.moram(*leaves, k=4, tau=0.2, backend=backend)
    gy = torch.randn(y.shape).to(xd)
    got = torch.autograd.grad(y, leaves, gy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = oracle(*l64, k=4, tau=0.2)
    want = torch.autograd.grad(y64, l64, gy.double())
    return leaves, y, y64, got, want, gy


@pytest.mark.parametrize("backend", mk.available_backends())
@pytest.mark.parametrize("xd", ["fp16", "bf16"])
def test_low_precision_x_with_fp32_atoms(backend, xd):
    """fp16/bf16 activations with fp32 atoms: output in x's dtype, each gradient in its own
    input's dtype, values within the bound of the lower dtype (whatever the backend's
    policy: fp32 throughout, or the lower dtype with fp32 accumulation)."""
    dt = DTYPES[xd]
    leaves, y, y64, got, want, gy = _mixed_case(dt, backend)
    assert y.dtype == dt
    lp = _leaves(leaves[0], leaves[1].to(dt), leaves[2].to(dt))       # PyTorch in the lower dtype
    y_lp = oracle(*lp, k=4, tau=0.2, dtype=dt)
    g_lp = torch.autograd.grad(y_lp, lp, gy)
    assert_close(y, y64, dtype=dt, pytorch_lowp=y_lp)
    for nm, g, w, glp, leaf in zip(("x", "keys", "values"), got, want, g_lp, leaves):
        assert g.dtype == leaf.dtype, f"grad {nm} is {g.dtype}, its input is {leaf.dtype}"
        assert_close(g, w, dtype=dt, pytorch_lowp=glp, what=f"grad {nm}")


@pytest.mark.parametrize("backend", mk.available_backends())
def test_fp64_x_with_fp32_atoms(backend):
    """fp64 activations with fp32 atoms: output in fp64, each gradient in its own input's
    dtype, values within the fp32 bound (the lower of the two dtypes)."""
    leaves, y, y64, got, want, _ = _mixed_case(torch.float64, backend)
    assert y.dtype == torch.float64
    assert_close(y, y64, dtype=torch.float32)
    for nm, g, w, leaf in zip(("x", "keys", "values"), got, want, leaves):
        assert g.dtype == leaf.dtype, f"grad {nm} is {g.dtype}, its input is {leaf.dtype}"
        assert_close(g, w, dtype=torch.float32, what=f"grad {nm}")
