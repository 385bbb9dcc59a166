"""``scan2`` (the pipelined prefill scan, ``MORAM_TRITON_FWD=scan2``) against the
reference, in the interpreter: odd shapes, two segments with scales, exact ties, N < K,
T = 0 / 1, three dtypes, the threshold at eval, a NaN token, and the public op's backward.
Also the variant switch, the merge simulation and time model (:mod:`...triton.model`) and
the TTGIR reader of ``.ci/ttgir_facts.py``."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (conftest does too)

import math  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_inputs, max_rel_err  # noqa: E402

import moram_kernels as mk  # noqa: E402

if "triton" not in mk.available_backends():
    pytest.skip(f"triton backend unavailable here: {mk.backends.why_unavailable('triton')}",
                allow_module_level=True)

from test_triton_interpret import DEV, DT, EPS, TAU, _case, _check_bwd, _check_fwd, _gap_delta  # noqa: E402

from moram_kernels.backends import reference as ref  # noqa: E402
from moram_kernels.backends import triton as tk  # noqa: E402
from moram_kernels.backends.triton import forward as tf  # noqa: E402
from moram_kernels.backends.triton import model as tm  # noqa: E402
from moram_kernels.backends.triton import scan2 as s2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def scan2(monkeypatch):
    """Force scan2 and count its launches (the real kernel runs; the wrapper only counts),
    so a test fails if the launcher quietly took the old scan."""
    monkeypatch.setenv("MORAM_TRITON_FWD", "scan2")
    calls = []
    real = s2.launch_scan2

    def counted(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)
    monkeypatch.setattr(s2, "launch_scan2", counted)
    return calls


# name: (T, d_in, d_out, N0, N1, k)
SHAPES = {
    "split-T3": (3, 40, 24, 150, 50, 8),          # several splits, segment boundary inside a tile
    "T40-d97": (40, 97, 33, 45, 19, 5),           # odd d_in (masked chunk), K = 5 in the 8 bucket
    "N-below-K": (5, 24, 16, 3, 2, 16),           # K = N = 5, most of the first tile masked
    "T1-seg1-only": (1, 32, 8, 0, 37, 16),
}


# (shape, dtype, backward too): every shape in bf16, two in fp16 (the interpreter is slow)
CASES = [(s, "bf16", s in ("split-T3", "T40-d97")) for s in SHAPES] + \
        [("T40-d97", "fp16", True), ("N-below-K", "fp16", False)]


@pytest.mark.parametrize("shape,dn,bwd", CASES)
def test_scan2_forward_backward(shape, dn, bwd, scan2):
    t, d_in, d_out, n0, n1, k = SHAPES[shape]
    x, segs, kk = _case(t, d_in, d_out, n0, n1, k, DT[dn], seed=len(shape) + 1)
    _check_fwd(x, segs, kk)
    assert scan2, "scan2 was not launched"
    if bwd:
        _check_bwd(x, segs, kk, gram=shape == "T40-d97")


@pytest.mark.parametrize("shape", ["split-T3", "N-below-K"])
def test_scan2_fp32_as_tf32(shape, scan2, tf32_on, monkeypatch):
    """fp32 runs as TF32: the same top-K and outputs as the old scan under the same
    rounding, and within TF32's error of the fp64 reference."""
    t, d_in, d_out, n0, n1, k = SHAPES[shape]
    x, segs, kk = _case(t, d_in, d_out, n0, n1, k, torch.float32, seed=len(shape) + 1)
    got = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    assert scan2, "scan2 was not launched"
    monkeypatch.setenv("MORAM_TRITON_FWD", "fused")
    want = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    assert torch.equal(got[1].sort(1).values, want[1].sort(1).values)
    for a, b in zip((got[0], got[2].sort(1).values, got[3]), (want[0], want[2].sort(1).values, want[3])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    y64, idx64, _, _ = ref.moram_fwd(x.double(), *(v.double() if v is not None else None for v in segs),
                                     kk, TAU, 0.0, EPS)
    assert torch.equal(got[1].sort(1).values, idx64.sort(1).values)
    assert max_rel_err(got[0], y64) < 4e-3


def test_scan2_matches_the_old_scan(scan2, monkeypatch):
    """Same tiles in the interpreter, same dot: the partial lists merge to the same
    outputs (the select kernel reads both the same way)."""
    x, segs, kk = _case(21, 48, 16, 70, 30, 6, torch.bfloat16, seed=11)
    got = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    monkeypatch.setenv("MORAM_TRITON_FWD", "fused")
    want = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    assert len(scan2) == 1
    order = lambda i: i.sort(1)  # noqa: E731
    assert torch.equal(order(got[1]).values, order(want[1]).values)
    for a, b in zip((got[0], got[3]), (want[0], want[3])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_scan2_exact_ties_go_to_the_lower_id(scan2, tf32_on):
    """Integer keys and x give exactly tied scores across tiles and both segments. One
    split's list is the best 16 by (score, then lower id), in that order; through the
    select kernel (which keeps any of the tied atoms, docs/op.md) the chosen scores are
    the top K."""
    g = torch.Generator().manual_seed(5)
    t, d, n0, n1, kk = 7, 16, 90, 60, 6
    keys = torch.randint(-1, 2, (n0 + n1, d), generator=g).float()
    keys[40] = keys[3]
    keys[120] = keys[3]                          # segment 1: same scores as atom 3
    x = torch.randint(-1, 2, (t, d), generator=g).float()
    p = x.double() @ keys.double().T
    order = [sorted(range(n0 + n1), key=lambda i: (-p[r, i].item(), i)) for r in range(t)]
    cfg = s2.scan2_config(16, "fp32")
    tiles = -(-n0 // cfg.BN) + -(-n1 // cfg.BN)
    f32 = dict(dtype=torch.float32)
    pv, pi = torch.empty(t, 16, **f32), torch.empty(t, 16, dtype=torch.int32)
    pss, pk = torch.empty(t, 1, **f32), torch.empty(t, 1, **f32)
    s2.launch_scan2(x, keys[:n0], keys[n0:], n0, n1, pv, pi, pss, pk, kk, 16, cfg, 1, tiles, "tf32")
    for r in range(t):
        assert pi[r, :kk].tolist() == order[r][:kk], f"row {r}"
        assert pv[r, :kk].tolist() == [p[r, i].item() for i in order[r][:kk]]
    values = torch.randn(n0 + n1, 8, generator=g)
    _, idx, p_sel, _ = tk.moram_fwd(x, keys[:n0], values[:n0], None, keys[n0:], values[n0:], None,
                                    kk, TAU, 0.0, EPS)
    for r in range(t):
        want = [p[r, i].item() for i in order[r][:kk]]
        assert p_sel[r].sort(descending=True).values.tolist() == want
        assert [p[r, i].item() for i in idx[r].tolist()] == p_sel[r].tolist()
    assert len(scan2) == 2


def test_scan2_t0_t1_and_nan_token(scan2):
    x, segs, kk = _case(1, 24, 8, 40, 9, 4, torch.bfloat16, seed=12)
    _check_fwd(x, segs, kk)
    # T = 0 through the public op (the backend entry is never called with no tokens)
    x0 = x[:0].float().requires_grad_()
    y0 = mk.moram(x0, segs[0].float(), segs[1].float(), k=4, tau=TAU, backend="triton")
    y0.sum().backward()
    assert y0.shape == (0, 8) and x0.grad.shape == (0, 24)
    x, segs, kk = _case(6, 24, 8, 40, 9, 4, torch.bfloat16, seed=13)
    want = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)[0]
    x[2, 5] = float("nan")
    y, idx, _, _ = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    assert torch.isnan(y[2]).all() and ((idx >= 0) & (idx < 49)).all()
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(y[keep], want[keep], rtol=0, atol=0)


def test_scan2_delta_at_eval(scan2):
    x, segs, kk = _case(9, 32, 20, 30, 10, 6, torch.bfloat16, seed=3)
    delta = _gap_delta(x, segs, kk)
    _check_fwd(x, segs, kk, delta)
    _check_bwd(x, segs, kk, delta)


def test_scan2_through_the_public_op(scan2, tf32_on, monkeypatch):
    """mk.moram(backend="triton") with scan2 forced: the output and the gradients of x,
    keys and values through autograd equal the old scan's, and the reference's within
    TF32 rounding."""
    x, keys, values = make_inputs(10, 24, 12, 70, k=5, seed=8)
    leaves = [v.to(DEV).requires_grad_() for v in (x, keys, values)]

    def run(backend):
        y = mk.moram(*leaves, k=5, tau=0.2, backend=backend)
        return (y, *torch.autograd.grad(y.square().sum(), leaves))
    got = run("triton")
    assert scan2, "scan2 was not launched"
    monkeypatch.setenv("MORAM_TRITON_FWD", "fused")
    same = run("triton")
    want = run("reference")
    assert len(scan2) == 1
    for a, b, c in zip(got, same, want):
        # the same selection; scan2's 16-slot lists change the backward's summation order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert max_rel_err(a, c) < 4e-3


def test_route_switch(monkeypatch):
    for v in tf.FWD_ROUTES:
        monkeypatch.setenv("MORAM_TRITON_FWD", v.upper())
        assert tf.fwd_route(4096, 16384, 4096) == (v if v != "auto" else tm.prefill_route(
            4096, 4096, 16384, 16, "bf16", "tf32", 132))
    monkeypatch.setenv("MORAM_TRITON_FWD", "")
    assert tf.fwd_route(1, 16384, 4096) == "split"
    monkeypatch.setenv("MORAM_TRITON_FWD", "scan3")
    with pytest.raises(ValueError, match="MORAM_TRITON_FWD"):
        tf.fwd_route(4096, 16384, 4096)
    # K > 16 and IEEE fp32 dots are not scan2's: the old scan serves them
    assert s2.serves(16, "tf32") and not s2.serves(32, "tf32") and not s2.serves(8, "ieee")


# ---- the model -----------------------------------------------------------------------------------

def test_simulation_counts_merges():
    """On Gaussian scores the top-K changes about K ln(N / K) times per row; the old gate
    never skips a 128-row tile after the first ones, but does skip for one row."""
    sim = tm.simulate_scan(128, 128, 64, 64, 16, 16, programs=1)
    assert 0.6 < sim["inserts"] / (16 * math.log(64 * 64 / 16)) < 1.6
    assert sim["gated"] == 0 and sim["rounds"] > 3 * 64
    one = tm.simulate_scan(1, 16, 64, 64, 16, 16, programs=1)
    assert one["gated"] > 16 and one["rounds"] < 0.5 * sim["rounds"]


def test_select_survivors_grow_with_the_splits():
    """Pruning at the largest split K-th leaves far more than 2K survivors at 256 splits
    (the old docstring's "about K to 2K" was wrong)."""
    few = tm.simulate_select(1, 4, 4096, 16, 16)
    many = tm.simulate_select(1, 256, 256, 16, 16)
    assert 16 <= few["survivors"] < 60 and 1000 < many["survivors"] < 2500
    assert many["rounds"] >= 16


def test_model_route_is_the_cheapest_and_above_the_floor():
    t, d, n, k = 4096, 4096, 16384, 16
    floor = 2 * t * n * d / tm.H200.tc_blas
    costs = {v: tm.forward_s(v, t, d, n, k, d) for v in tm.ROUTES}
    assert all(c >= floor for c in costs.values()), costs
    winners = set()
    for t2, n2 in ((4096, 16384), (4096, 1024), (1024, 1024)):   # each route wins one (H200)
        prefill = {v: tm.forward_s(v, t2, d, n2, k, d) for v in tm.ROUTES}
        got = tm.prefill_route(t2, d, n2, 16, "bf16", "tf32", 132)
        assert got == min(prefill, key=prefill.get), (t2, n2, prefill)
        winners.add(got)
    assert winners == {"gemm2", "scan2", "gemm"}
    # scan2 serves K <= 16 on tensor cores: K = 32 or IEEE fp32 dots choose among the others
    big = {v: tm.forward_s(v, t, d, n, 32, d) for v in ("fused", "gemm", "gemm2", "split")}
    assert tm.prefill_route(t, d, n, 32, "bf16", "tf32", 132) == min(big, key=big.get)
    assert tm.prefill_route(t, d, n, 16, "fp32", "ieee", 132) != "scan2"
    assert tm.prefill_route(0, d, n, 16, "bf16", "tf32", 132) == "fused"   # nothing to route


# ---- the TTGIR reader -------------------------------------------------------------------------------

_IR = """\
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16>
    %c = ttg.async_commit_group tokens %x
    %r:2 = scf.for %i = %lo to %hi step %c1 iter_args(%acc = %z) -> (tensor<128x128xf32, #mma>) : i32 {{
{body}
      scf.yield %acc2 : tensor<128x128xf32, #mma>
    }} loc(#loc9)
    %w = ttg.async_wait {{num = 0 : i32}} loc(#loc7)
"""
_PIPELINED = """\
      %w = ttg.async_wait %t {num = 2 : i32} loc(#loc3)
      %d = ttng.warp_group_dot %p, %q, %acc {isAsync = true} : !a * !b -> tensor<128x128xf32, #mma> loc(#loc4)
      %e = scf.if %last -> (tensor<128x16xi64>) {
        %s = "tt.reduce"(%d) <{axis = 1 : i32}> ({
          tt.reduce.return %v : f32
        }) : (tensor<128x128xf32, #mma>) -> tensor<128xf32>
        scf.yield %s : tensor<128x16xi64>
      } else {
        scf.yield %o : tensor<128x16xi64>
      }
      %c2 = ttg.async_commit_group tokens %y"""
_NESTED = """\
      %c3 = ttg.async_commit_group tokens %y
      %in:1 = scf.for %j = %c0 to %D step %c64 iter_args(%a2 = %acc) -> (tensor<128x128xf32, #mma>) : i32 {
        %w = ttg.async_wait %t {num = 2 : i32} loc(#loc3)
        %d = ttng.warp_group_dot %p, %q, %a2 {isAsync = true} : !a * !b -> tensor<128x128xf32, #mma>
        scf.yield %d : tensor<128x128xf32, #mma>
      } loc(#loc5)
      %w0 = ttg.async_wait {num = 0 : i32} loc(#loc6)"""


def _facts_module():
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    import ttgir_facts
    return ttgir_facts


def test_ttgir_reader_tells_a_pipelined_loop_from_a_draining_one():
    tf_ = _facts_module()
    good = tf_.facts(_IR.format(body=_PIPELINED))
    assert good["found"] and not good["nested"] and good["waits"] == [2] and good["groups"] == 1
    assert good["mma"] == "wgmma" and tf_.problems(good, 90) == []
    bad = tf_.facts(_IR.format(body=_NESTED))
    assert bad["nested"] and bad["drains_in"] == 1 and bad["prologue_in"] == 1
    assert len(tf_.problems(bad, 90)) == 3
    alloc = tf_.facts(_IR.format(body=_PIPELINED + "\n      %s = ttg.local_alloc : () -> !m"))
    assert alloc["allocs_in"] == 1 and tf_.problems(alloc, 80)[0].startswith("1 shared")


@pytest.mark.slow
def test_compiled_scan2_pipelines_across_tiles():
    """scan2-bf16-K16 for sm_90, compiled here: one flattened tile loop, no shared memory
    allocated or drained in it, wgmma (``.ci/ttgir_facts.py --check`` does every variant)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "ttgir_facts.py"), "--arch", "90",
                        "--filter", "scan2-bf16-K16-prefill", "--check"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mma=wgmma" in r.stdout and "drains_in=0" in r.stdout and "nested=False" in r.stdout
