"""The C++ CPU kernels (csrc/cpu/moram_cpu.cpp) against moram_kernels.reference at the
backend contract: forward and backward, every dtype, odd shapes, both segments, both
ways of computing the dense normalisation term, determinism, NaN isolation, and the
boundary checks. Skipped as a whole (with the reason) only when the extension is not built.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, make_inputs, oracle

import moram_kernels as mk
from moram_kernels.backends import compiled as _C_loader
from moram_kernels.backends import reference as ref

_WHY = _C_loader.why_unavailable("cpu")
if _WHY is not None:
    pytest.skip(f"the cpu backend is not built here: {_WHY}", allow_module_level=True)

from moram_kernels import _C  # noqa: E402
from moram_kernels.backends import cpu as _cpu  # noqa: E402  (needs the extension)

TAU, EPS = 0.1, 1e-12
# error relative to max |reference|: both sides accumulate in fp32 from the same inputs,
# so only the summation order differs, plus the final rounding to the output dtype
REL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# name: (T, d_in, d_out, N0, N1, K)
CASES = {
    "T1-d8-N1-K1": (1, 8, 8, 1, 0, 1),
    "T7-d16-N2-K2": (7, 16, 12, 0, 2, 2),
    "T5-d24-N5-K5": (5, 24, 16, 3, 2, 5),              # N < k
    "T33-d97-N40-K8": (33, 97, 50, 24, 16, 8),         # odd d
    "T17-d32-N130-K64": (17, 32, 40, 100, 30, 64),     # K = 64
    "T1025-d97-N300-K16": (1025, 97, 40, 284, 16, 16),
    "T1-d16-N5000-K16": (1, 16, 24, 4984, 16, 16),     # decode: atoms split across threads
    "T64-d16-N5000-K16": (64, 16, 24, 5000, 0, 16),    # large N, small d
}


def _rel(out, want):
    want = want.double()
    return ((out.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _close(out, want, dtype, what):
    err = _rel(out, want)
    assert err <= REL[dtype], f"{what}: relative error {err:.2e} > {REL[dtype]:.1e} ({dtype})"


def _setup(name, dn, seed=0, scaled=True):
    t, d_in, d_out, n0, n1, k = CASES[name]
    dt = DTYPES[dn]
    # both sides score in fp32 from the same inputs, so a small gap keeps the selections equal
    gap = 0.02 if n0 + n1 < 1000 else 0.002
    x, keys, values = make_inputs(t, d_in, d_out, n0 + n1, k=k, dtype=dt, seed=seed, min_gap=gap)
    g = torch.Generator().manual_seed(seed + 1)
    scale = torch.rand(n0 + n1, generator=g) + 0.5 if scaled else None
    segs = (keys[:n0], values[:n0], None if scale is None else scale[:n0].contiguous(),
            keys[n0:], values[n0:], None if scale is None else scale[n0:].contiguous())
    return x, segs, k


def _same_sets(a, b):
    return torch.equal(a.sort(1).values, b.sort(1).values)


@pytest.mark.parametrize("dn", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name, dn):
    x, segs, k = _setup(name, dn, scaled=name.endswith("K8") or name.startswith("T1025"))
    for delta in (0.0, 0.1):
        y, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, delta, EPS)
        yr, idxr, p_selr, normr = ref.moram_fwd(x, *segs, k, TAU, delta, EPS)
        assert y.dtype == x.dtype and idx.dtype == torch.int64
        assert p_sel.dtype == norm.dtype == torch.float32
        assert _same_sets(idx, idxr), "selected atoms differ from the reference"
        _close(y, yr, x.dtype, f"y delta={delta}")
        _close(norm, normr, torch.float32, "norm")
        _close(p_sel.sort(1).values, p_selr.sort(1).values, torch.float32, "p_sel")
        # and p_sel holds the raw scores of the atoms in idx, in idx's order
        full = x.float() @ torch.cat([segs[0], segs[3]]).float().T
        _close(p_sel, full.gather(1, idx), torch.float32, "p_sel matches idx")


@pytest.mark.parametrize("dn", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name, dn):
    x, segs, k = _setup(name, dn, scaled=not name.startswith("T7"))
    t, d_out = x.shape[0], segs[1].shape[1]
    delta = 0.1 if name.startswith("T33") else 0.0
    _, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, delta, EPS)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    gram0 = ref.gram(segs[0]) if name.startswith("T1025") else None
    got = _cpu.moram_bwd(gy, x, *segs, gram0, idx, p_sel, norm, TAU, delta, EPS, True, True, True)
    want = ref.moram_bwd(gy, x, *segs, gram0, idx, p_sel, norm, TAU, delta, EPS, True, True, True)
    for nm, g, w, like in zip(("gx", "gk0", "gv0", "gk1", "gv1"), got, want,
                              (x, segs[0], segs[1], segs[3], segs[4])):
        assert g.shape == like.shape and g.dtype == like.dtype, nm
        if like.numel():
            _close(g, w, like.dtype, nm)


@pytest.mark.parametrize("with_gram", [False, True], ids=["no-gram0", "gram0"])
@pytest.mark.parametrize("shape", [(200, 8, 500), (40, 128, 20)], ids=["gram-cheaper", "recompute-cheaper"])
def test_dense_term_both_strategies(shape, with_gram):
    """Both ways of computing -alpha·Σ_j p_j a_j (Gram matrix or recomputed scores)."""
    t, d, n = shape
    x, keys, values = make_inputs(t, d, 16, n, k=4, seed=5, min_gap=0.02)
    segs = (keys[: n - 3], values[: n - 3], None, keys[n - 3:], values[n - 3:], None)
    gram0 = ref.gram(segs[0]) if with_gram else None
    _, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, 4, TAU, 0.0, EPS)
    gy = torch.randn(t, 16)
    got = _cpu.moram_bwd(gy, x, *segs, gram0, idx, p_sel, norm, TAU, 0.0, EPS, True, False, True)
    want = ref.moram_bwd(gy, x, *segs, gram0, idx, p_sel, norm, TAU, 0.0, EPS, True, False, True)
    assert got[1] is None and got[2] is None
    for nm, i in (("gx", 0), ("gk1", 3), ("gv1", 4)):
        _close(got[i], want[i], torch.float32, nm)


def test_grads_only_for_the_needed_segment():
    x, segs, k = _setup("T1025-d97-N300-K16", "fp32")
    _, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    gy = torch.randn(x.shape[0], segs[1].shape[1])
    for need in ((False, False, True), (False, True, False), (True, False, False)):
        got = _cpu.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, *need)
        want = ref.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, *need)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                _close(g, w, torch.float32, f"need={need}")


def test_dense_term_reaches_unselected_keys():
    """Keys of atoms no token selected get a gradient only through -alpha·p_j: it must be
    nonzero and equal to the reference's."""
    x, keys, values = make_inputs(64, 32, 16, 400, k=2, seed=7, min_gap=0.02)
    segs = (keys[:300], values[:300], None, keys[300:], values[300:], None)
    _, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, 2, TAU, 0.0, EPS)
    gy = torch.randn(64, 16)
    got = _cpu.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    want = ref.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    unselected = torch.ones(400, dtype=torch.bool)
    unselected[idx.flatten()] = False
    assert unselected.sum() > 100
    gk = torch.cat([got[1], got[3]])[unselected]
    gk_ref = torch.cat([want[1], want[3]])[unselected]
    assert gk.abs().amin(1).max() > 0 and (gk.norm(dim=1) > 1e-6 * gk_ref.norm()).all()
    _close(gk, gk_ref, torch.float32, "gk of unselected atoms")
    assert torch.count_nonzero(torch.cat([got[2], got[4]])[unselected]) == 0, "dB must be sparse"


def test_backward_is_deterministic():
    x, segs, k = _setup("T1025-d97-N300-K16", "fp32")
    _, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    gy = torch.randn(x.shape[0], segs[1].shape[1])
    a = _cpu.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    b = _cpu.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    for g, h in zip(a, b):
        assert torch.equal(g, h)


def test_forward_is_deterministic_and_thread_count_independent():
    x, segs, k = _setup("T64-d16-N5000-K16", "fp32")
    n = torch.get_num_threads()
    y1, i1, _, _ = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    y2, i2, _, _ = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    assert torch.equal(y1, y2) and torch.equal(i1, i2)
    try:
        torch.set_num_threads(1)
        y3, i3, _, _ = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    finally:
        torch.set_num_threads(n)
    assert _same_sets(i1, i3)
    _close(y3, y1, torch.float32, "1 thread vs many")


@pytest.mark.parametrize("threads,grain", [(1, None), (2, 1), (3, 1)],
                         ids=["1-thread", "2-threads-split", "3-threads-split"])
def test_forward_across_threads_matches_the_oracle(monkeypatch, threads, grain):
    """Few tokens and several atom tiles: with more than one thread worth waking (torch's
    thread count, and MORAM_CPU_GRAIN = 1 multiply-add per thread to force it: without it
    this small call stays on one thread, which the thread plan is asked to confirm) the
    atoms are split across threads, each split keeps a partial top-K and sum of squares,
    and the splits are merged; on one thread none of that runs. Every count against the
    float64 oracle, with the thread count restored after."""
    monkeypatch.setenv("MORAM_CPU_BN", "16")             # 7 tiles over the two segments
    if grain is not None:
        monkeypatch.setenv("MORAM_CPU_GRAIN", str(grain))
    t, d_in, d_out, n0, n1, k = 5, 16, 12, 60, 40, 6
    x, keys, values = make_inputs(t, d_in, d_out, n0 + n1, k=k, seed=4)
    segs = (keys[:n0], values[:n0], None, keys[n0:], values[n0:], None)
    before = torch.get_num_threads()
    madds = float(t * (n0 + n1) * d_in)
    try:
        torch.set_num_threads(threads)
        assert _C.cpu_thread_plan(madds, 4.0 * madds) == threads, "the plan must wake `threads` here"
        y, idx, _, norm = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    p = x.double() @ keys.double().T
    assert _same_sets(idx, p.topk(k, dim=-1).indices)
    _close(norm, p.norm(dim=-1), torch.float32, "norm")
    _close(y, oracle(x, keys, values, k=k, tau=TAU), torch.float32, "y")


@pytest.mark.parametrize("bt,bn", [(1, 1), (3, 7), (5, 64)])
def test_tiny_tiles(monkeypatch, bt, bn):
    """Tile tails, tiles smaller than K, and many tiles per item (sizes are read per call)."""
    monkeypatch.setenv("MORAM_CPU_BT", str(bt))
    monkeypatch.setenv("MORAM_CPU_BN", str(bn))
    x, segs, k = _setup("T33-d97-N40-K8", "fp32")
    y, idx, _, _ = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    yr, idxr, _, _ = ref.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    assert _same_sets(idx, idxr)
    _close(y, yr, torch.float32, "y")


@pytest.mark.parametrize("dn", list(DTYPES))
def test_nan_token_stays_in_its_row(dn):
    x, segs, k = _setup("T1025-d97-N300-K16", dn)
    x = x.clone()
    x[5, 3] = float("nan")
    x[9, 0] = float("inf")
    y, idx, _, norm = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    n = segs[0].shape[0] + segs[3].shape[0]
    assert idx.min() >= 0 and idx.max() < n
    assert y[5].isnan().all() and norm[5].isnan()
    assert not y[9].isfinite().all()
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    ok[[5, 9]] = False
    assert y[ok].isfinite().all()
    yr, _, _, _ = ref.moram_fwd(x[ok], *segs, k, TAU, 0.0, EPS)
    _close(y[ok], yr, x.dtype, "other rows")
    # the backward stays in bounds too
    gy = torch.randn(y.shape).to(x.dtype)
    _, idx2, p_sel, norm2 = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    gx = _cpu.moram_bwd(gy, x, *segs, None, idx2, p_sel, norm2, TAU, 0.0, EPS, True, False, False)[0]
    assert gx[ok].isfinite().all()


def test_zero_token_adds_exactly_zero():
    x, segs, k = _setup("T33-d97-N40-K8", "fp32")
    x = x.clone()
    x[4] = 0
    y, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    assert torch.equal(y[4], torch.zeros_like(y[4]))
    assert norm[4] == torch.tensor(EPS, dtype=torch.float32) and len(set(idx[4].tolist())) == k
    gy = torch.randn(y.shape)
    got = _cpu.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    want = ref.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    for g, w in zip(got, want):
        _close(g, w, torch.float32, "grads with a zero token")


@pytest.mark.parametrize("layout", ["strided-rows", "transposed", "strided-cols"])
@pytest.mark.parametrize("dn", ["fp32", "bf16"])
def test_non_contiguous_x(layout, dn):
    x, segs, k = _setup("T33-d97-N40-K8", dn)
    if layout == "strided-rows":
        xs = torch.cat([x, x], 1)[:, :97]
    elif layout == "transposed":
        xs = x.t().contiguous().t()
    else:
        xs = torch.stack([x, x], 2)[:, :, 0]
    assert not xs.is_contiguous() and torch.equal(xs, x)
    y, idx, _, _ = _cpu.moram_fwd(xs, *segs, k, TAU, 0.0, EPS)
    y0, idx0, p0, n0 = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    assert torch.equal(idx, idx0)
    _close(y, y0, x.dtype, "y")
    gy = torch.randn(y.shape).to(x.dtype)
    g = _cpu.moram_bwd(gy, xs, *segs, None, idx0, p0, n0, TAU, 0.0, EPS, True, True, True)
    g0 = _cpu.moram_bwd(gy, x, *segs, None, idx0, p0, n0, TAU, 0.0, EPS, True, True, True)
    for a, b in zip(g, g0):
        _close(a, b, a.dtype, "grads")


def test_mixed_dtypes():
    """bf16 activations with fp32 atoms, and fp32 activations with bf16 values."""
    x, keys, values = make_inputs(50, 40, 24, 60, k=8, seed=2, min_gap=0.02)
    for xd, kd, vd in ((torch.bfloat16, torch.float32, torch.float32),
                       (torch.float32, torch.float32, torch.bfloat16),
                       (torch.float16, torch.bfloat16, torch.float16)):
        segs = (keys[:50].to(kd), values[:50].to(vd), None, keys[50:].to(kd), values[50:].to(vd), None)
        xx = x.to(xd)
        y, idx, p, n = _cpu.moram_fwd(xx, *segs, 8, TAU, 0.0, EPS)
        yr, idxr, _, _ = ref.moram_fwd(xx, *segs, 8, TAU, 0.0, EPS)
        assert y.dtype == xd and _same_sets(idx, idxr)
        _close(y, yr, xd, f"y {xd}/{kd}/{vd}")
        gy = torch.randn(y.shape).to(xd)
        got = _cpu.moram_bwd(gy, xx, *segs, None, idx, p, n, TAU, 0.0, EPS, True, True, True)
        want = ref.moram_bwd(gy, xx, *segs, None, idx, p, n, TAU, 0.0, EPS, True, True, True)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            _close(g, w, g.dtype, f"grad {xd}/{kd}/{vd}")


def test_moram_linear_train_step_matches_reference_backend():
    """The layer's two-segment call, with its cached Gram matrix, end to end."""
    base = torch.nn.Linear(64, 48)
    layer = mk.MoRAMLinear(base, r=16, k=8, tau=0.05, alpha=32.0)
    for _ in range(5):
        layer.add_task()
        with torch.no_grad():
            layer.values.normal_()
    x = torch.randn(300, 64)
    assert layer._frozen_gram() is not None  # 64 frozen atoms >= d_in: the cache is used
    grads = {}
    for b in ("cpu", "reference"):
        layer.backend = b
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        layer(xx).square().sum().backward()
        grads[b] = (xx.grad, layer.keys.grad, layer.values.grad)
    for nm, g, w in zip(("x", "keys", "values"), grads["cpu"], grads["reference"]):
        _close(g, w, torch.float32, nm)


def test_picked_automatically_for_cpu_tensors():
    assert "cpu" in mk.available_backends()
    from moram_kernels import backends as _dispatch
    inp = _dispatch.Inputs(torch.device("cpu"), torch.float32, torch.float32, torch.float32, 8, 8, 4, 2)
    assert _dispatch.select(None, inp).name == "cpu"


def test_boundary_checks_name_the_argument():
    x, segs, k = _setup("T33-d97-N40-K8", "fp32")
    k0, v0, s0, k1, v1, s1 = segs
    ops = torch.ops.moram_kernels_C
    # each pattern starts the message ("moram cpu: <argument> must ..."), so a message that
    # names another argument (or only contains the name, as "idx" contains "x") fails it
    bad = [
        (dict(keys0=k0[:, :5]), r"moram cpu: keys0 must be \[N, d_in\]"),
        (dict(values1=v1[:, :3]), r"moram cpu: values0 and values1 must have the same d_out, got \d+ and 3"),
        (dict(values0=v0[:3]), r"moram cpu: values0 must be \[N, d_out\]"),
        (dict(scale1=s1.double()), r"moram cpu: scale1 must be float32"),
        (dict(scale0=s0[:2]), r"moram cpu: scale0 must be \[N\]"),
        (dict(x=x.long()), r"moram cpu: x must be float32"),
        (dict(k=100), r"moram cpu: k must be in \[1, N\]"),
        (dict(tau=0.0), r"moram cpu: tau must be finite"),
    ]
    args = dict(x=x, keys0=k0, values0=v0, scale0=s0, keys1=k1, values1=v1, scale1=s1, k=k, tau=TAU,
                delta=0.0, eps=EPS)
    for change, name in bad:
        a = {**args, **change}
        with pytest.raises(RuntimeError, match=name):
            ops.moram_fwd(*a.values())
    _, idx, p, n = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    gy = torch.randn(x.shape[0], v0.shape[1])
    for bad_idx in (idx.clone().fill_(40), idx.clone().fill_(-1)):
        with pytest.raises(RuntimeError, match="idx"):
            ops.moram_bwd(gy, x, *segs, None, bad_idx, p, n, TAU, 0.0, EPS, True, True, True)
    with pytest.raises(RuntimeError, match="gy"):
        ops.moram_bwd(gy[:, :4], x, *segs, None, idx, p, n, TAU, 0.0, EPS, True, True, True)
    with pytest.raises(RuntimeError, match="gram0"):
        ops.moram_bwd(gy, x, *segs, torch.zeros(3, 3), idx, p, n, TAU, 0.0, EPS, True, True, True)
    with pytest.raises(RuntimeError, match="p_sel"):
        ops.moram_bwd(gy, x, *segs, None, idx, p.double(), n, TAU, 0.0, EPS, True, True, True)
