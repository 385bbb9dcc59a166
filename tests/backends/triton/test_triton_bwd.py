"""The Triton backward's two variants (``MORAM_TRITON_BWD``: v1 = the original kernels,
v2 = the folded dense term, the Gram in the compute dtype, dB that reads gy only for hit
tokens) against the float64 oracle of tests/helpers.py, differentiated by autograd.
Runs under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes, or on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_inputs, oracle, triton_test_device

from moram_kernels.backends import reference as ref

DEV = triton_test_device()       # skips this module where the triton backend is unavailable

from moram_kernels.backends import triton as tk  # noqa: E402
from moram_kernels.backends.triton import backward as tb  # noqa: E402

TAU, EPS = 0.1, 1e-12
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(t, d_in, d_out, n0, n1, k, dt, *, seed, cold1=False):
    """Both segments with value scales; ``cold1``: segment 1's keys shrunk so that no token
    selects them (a segment with no hits: its values get no gradient, its keys still get the
    dense normalisation term)."""
    x, keys, values = make_inputs(t, d_in, d_out, n0 + n1, k=k, seed=seed)
    if cold1:
        keys[n0:] *= 1e-3
    g = torch.Generator().manual_seed(seed + 1)
    sc = torch.rand(n0 + n1, generator=g) + 0.5
    gy = torch.randn(t, d_out, generator=g)
    return x.to(dt), keys.to(dt), values.to(dt), sc, gy.to(dt)


def _oracle_grads(x, keys, values, sc, gy, kk):
    """Gradients of the float64 oracle at the (already rounded) inputs."""
    leaves = [v.double().cpu().requires_grad_() for v in (x, keys, values)]
    y = oracle(*leaves, k=kk, tau=TAU, eps=EPS, value_scale=sc.double())
    return torch.autograd.grad(y, leaves, gy.double().cpu())


def _run(x, keys, values, sc, gy, n0, kk, *, gram, need0=True):
    segs = (keys[:n0], values[:n0], sc[:n0].contiguous(), keys[n0:], values[n0:], sc[n0:].contiguous())
    segs = tuple(v.to(DEV) for v in segs)
    xd, gyd = x.to(DEV), gy.to(DEV)
    _, idx, p_sel, norm = tk.moram_fwd(xd, *segs, kk, TAU, 0.0, EPS)
    g0 = ref.gram(segs[0]) if gram else None
    got = tk.moram_bwd(gyd, xd, *segs, g0, idx, p_sel, norm, TAU, 0.0, EPS, True, need0, True)
    return got, idx


# name: (T, d_in, d_out, N0, N1, k, gram0 given, segment 1 cold, segment 0 needs grads,
#        segment 0's dense-term plan)
CASES = {
    # both segments small: both P A terms folded into the dx kernel, d not a multiple of 16
    "fold-both-odd": (11, 37, 19, 23, 7, 5, False, False, True, "fold"),
    # gram0 given for segment 0 (materialised x G), segment 1 folded
    "gram0-fold1": (9, 24, 21, 40, 5, 4, True, False, True, "gram"),
    # frozen segment 0 whose Gram is cheaper than P A and not given: built in the compute dtype
    "gram-built": (20, 16, 12, 40, 4, 4, False, False, False, "gram"),
    # segment 0 too large to fold (P A materialised), segment 1 folded and never selected
    "big0-cold1": (5, 16, 12, 150, 6, 3, False, True, True, "recompute"),
}
RUNS = [(c, dn) for c in CASES for dn in DT if dn == "fp32" or c in ("fold-both-odd", "gram-built")]


@pytest.mark.parametrize("case,dn", RUNS)
def test_v2_matches_the_fp64_oracle(case, dn, monkeypatch):
    t, d_in, d_out, n0, n1, k, gram, cold1, need0, plan0 = CASES[case]
    monkeypatch.setenv("MORAM_TRITON_BWD", "v2")
    x, keys, values, sc, gy = _inputs(t, d_in, d_out, n0, n1, k, DT[dn], seed=len(case), cold1=cold1)
    kk = ref.effective_k(k, n0 + n1)
    # the plans this case is meant to exercise
    assert tb._fold_plan(t, d_in, n0, gram, need0) == plan0
    assert tb._fold_plan(t, d_in, n1, False, True) == "fold"
    got, idx = _run(x, keys, values, sc, gy, n0, kk, gram=gram, need0=need0)
    gx_w, gk_w, gv_w = _oracle_grads(x, keys, values, sc, gy, kk)
    if not need0:
        assert got[1] is None and got[2] is None, "segment 0's gradients were not asked for"
    if cold1:
        assert not (idx >= n0).any(), "segment 1 was meant to have no hits"
        assert (got[4] == 0).all(), "values of a segment with no hits got a gradient"
        assert got[3].abs().max() > 0, "keys of a segment with no hits lost the dense term"
    for name, g, w in (("gx", got[0], gx_w), ("gk0", got[1], gk_w[:n0]), ("gv0", got[2], gv_w[:n0]),
                       ("gk1", got[3], gk_w[n0:]), ("gv1", got[4], gv_w[n0:])):
        if g is None and not need0:
            continue
        assert g.dtype == DT[dn], name
        if w.abs().max() > 0:
            assert_close(g.cpu(), w, dtype=DT[dn], what=f"{case} {dn} {name}")
        else:
            assert (g == 0).all(), name


def test_v1_and_v2_agree_and_the_dense_term_matters(monkeypatch):
    """Same gradients from both variants (atomics and the sorted deterministic dB); and the
    dense normalisation term is really in them: dropping it (alpha = 0) moves gx away."""
    t, d_in, d_out, n0, n1, k = 10, 20, 16, 30, 6, 4
    x, keys, values, sc, gy = _inputs(t, d_in, d_out, n0, n1, k, torch.float32, seed=3)
    kk = ref.effective_k(k, n0 + n1)
    out = {}
    for v in ("v1", "v2"):
        monkeypatch.setenv("MORAM_TRITON_BWD", v)
        out[v] = _run(x, keys, values, sc, gy, n0, kk, gram=False)[0]
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            out[v + "-det"] = _run(x, keys, values, sc, gy, n0, kk, gram=False)[0]
        finally:
            torch.use_deterministic_algorithms(prev)
    for v in ("v1-det", "v2", "v2-det"):
        for a, b in zip(out["v1"], out[v]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gx_w = _oracle_grads(x, keys, values, sc, gy, kk)[0]
    # the oracle's gx without the norm's gradient: the norm held constant
    xl = x.double().requires_grad_()
    p = xl @ keys.double().T
    nrm = p.detach().norm(dim=-1, keepdim=True)
    top = p.topk(kk, dim=-1).indices
    w = torch.softmax(torch.full_like(p, -torch.inf).scatter(1, top, (p / nrm).gather(1, top) / TAU), -1)
    y = (w * p) @ (values.double() * sc.double()[:, None])
    gx_no_norm = torch.autograd.grad(y, xl, gy.double())[0]
    gap = (gx_no_norm - gx_w).abs().max() / gx_w.abs().max()
    assert gap > 1e-3, "this case does not exercise the dense term"
    assert_close(out["v2"][0].cpu(), gx_w, dtype=torch.float32, what="gx")


def test_bwd_variant_is_read_per_call(monkeypatch):
    monkeypatch.delenv("MORAM_TRITON_BWD", raising=False)
    assert tb.bwd_variant() == "v2"
    for v, want in (("auto", "v2"), ("V1", "v1"), ("v2", "v2"), ("", "v2")):
        monkeypatch.setenv("MORAM_TRITON_BWD", v)
        assert tb.bwd_variant() == want
    monkeypatch.setenv("MORAM_TRITON_BWD", "v3")
    with pytest.raises(ValueError, match="MORAM_TRITON_BWD"):
        tb.bwd_variant()


def test_v2_db_reads_gy_only_for_hit_tokens():
    """The v2 atomic dB kernel counts the gy rows it loads (STATS): exactly the tokens
    that selected an atom of the segment, once per column chunk; none for a segment no
    token selected. And its sums equal a plain scatter-add."""
    g = torch.Generator().manual_seed(5)
    t, kk, n0, n1, d_out = 21, 3, 40, 8, 70
    idx = torch.stack([torch.randperm(n0, generator=g)[:kk] for _ in range(t)])
    hit_rows = torch.tensor([2, 3, 11, 17, 20])
    idx[hit_rows, 1] = n0 + torch.tensor([0, 3, 3, 7, 1])        # five tokens pick a segment-1 atom
    idx = idx.to(DEV)
    cb = torch.randn(t, kk, generator=g).to(DEV)
    gy = torch.randn(t, d_out, generator=g).to(DEV)
    bt, bo, _ = tb.small_block(tb.k_bucket(kk))
    chunks = -(-d_out // bo)
    for lo, hi, rows in ((n0, n0 + n1, len(hit_rows)), (0, n0, t), (n0 + n1, n0 + n1 + 5, 0)):
        stats = torch.zeros(1, dtype=torch.int32, device=DEV)
        gv = tb._scatter_db(idx, cb, gy, lo, hi, torch.zeros(hi - lo, d_out, device=DEV), bt, bo, "v2", stats)
        assert int(stats) == rows * chunks, (lo, hi, int(stats), rows * chunks)
        want = torch.zeros(hi - lo, d_out, dtype=torch.float64)
        inside = (idx >= lo) & (idx < hi)
        for r, c in inside.nonzero().tolist():
            want[idx[r, c] - lo] += cb[r, c].double() * gy[r].double().cpu()
        torch.testing.assert_close(gv.double().cpu(), want, rtol=1e-5, atol=1e-5)
