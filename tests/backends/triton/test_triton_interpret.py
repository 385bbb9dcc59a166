"""Triton backend against the reference, on paths the shared parity suite does not pin
down: N split across programs, tiles that straddle the segment boundary, K that is not
a bucket size, mixed dtypes, strided inputs, both dense-term plans, both dB reductions,
torch.compile. Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it), or on a
CUDA GPU when the interpreter is off; shapes are tiny because the interpreter is slow."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (conftest does too)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import REL_ATOL, make_inputs, max_rel_err  # noqa: E402

import moram_kernels as mk  # noqa: E402
from moram_kernels.backends import reference as ref  # noqa: E402

if "triton" not in mk.available_backends():
    pytest.skip(f"triton backend unavailable here: {mk.backends.why_unavailable('triton')}",
                allow_module_level=True)

from moram_kernels.backends import triton as tk  # noqa: E402
from moram_kernels.backends.triton import backward as tb  # noqa: E402
from moram_kernels.backends.triton import forward as tf  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cpu" if INTERP else "cuda")
TAU, EPS = 0.1, 1e-12
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _fused_road(monkeypatch):
    """These tests pin the fused road (scan, select, gather); ``auto`` would send their
    shapes to the split and gemm roads, which test_triton_routes.py covers."""
    monkeypatch.setenv("MORAM_TRITON_FWD", "fused")


def _case(t, d_in, d_out, n0, n1, k, dt, *, keys_dt=None, seed=0, scale=True):
    n = n0 + n1
    x, keys, values = make_inputs(t, d_in, d_out, n, k=k, dtype=dt, keys_dtype=keys_dt, seed=seed)
    kk = ref.effective_k(k, n)
    g = torch.Generator().manual_seed(seed + 1)
    sc = (torch.rand(n, generator=g) + 0.5) if scale else None
    segs = (keys[:n0], values[:n0], sc[:n0].contiguous() if scale else None,
            keys[n0:], values[n0:], sc[n0:].contiguous() if scale else None)
    to = lambda v: v.to(DEV) if v is not None else None  # noqa: E731
    return to(x), tuple(to(s) for s in segs), kk


def _d(v):
    return v.double().cpu() if v is not None else None


def _ref64(x, segs, kk, delta):
    return ref.moram_fwd(_d(x), *map(_d, segs), kk, TAU, delta, EPS)


def _close(got, want, dt, what):
    err = max_rel_err(got.cpu(), want)
    assert err <= REL_ATOL[dt], f"{what}: relative error {err:.3e} > {REL_ATOL[dt]:.1e}"


def _policy(x, segs):
    """x and the atoms as the dtype policy computes them: all in the lowest of their
    dtypes (the scale vectors stay fp32)."""
    low = min((v.dtype for v in (x, *segs[0:2], *segs[3:5])), key=lambda d: torch.finfo(d).bits)
    cast = tuple(v if v is None or i in (2, 5) else v.to(low) for i, v in enumerate(segs))
    return x.to(low), cast


def _check_fwd(x, segs, kk, delta=0.0):
    y, idx, p_sel, norm = tk.moram_fwd(x, *segs, kk, TAU, delta, EPS)
    assert y.dtype == x.dtype
    y64, idx64, p64, n64 = _ref64(*_policy(x, segs), kk, delta)
    assert idx.dtype == torch.int64 and idx.shape == idx64.shape
    # make_inputs keeps the K-th and (K+1)-th scores apart: the selected sets must agree
    assert torch.equal(idx.sort(1).values.cpu(), idx64.sort(1).values), "top-K sets differ"
    _close(y, y64, x.dtype, "y")
    _close(p_sel.sort(1).values, p64.sort(1).values, torch.float32, "p_sel")
    _close(norm, n64, torch.float32, "norm")
    return y, idx, p_sel, norm


def _check_bwd(x, segs, kk, delta=0.0, gram=False, need=(True, True, True)):
    _, idx, p_sel, norm = tk.moram_fwd(x, *segs, kk, TAU, delta, EPS)
    gy = torch.randn(x.shape[0], segs[1].shape[1], generator=torch.Generator().manual_seed(7))
    gy = gy.to(x.dtype).to(DEV)
    g0 = ref.gram(segs[0]) if gram and segs[0].shape[0] else None
    need = (need[0], need[1] and segs[0].shape[0] > 0, need[2] and segs[3].shape[0] > 0)
    got = tk.moram_bwd(gy, x, *segs, g0, idx, p_sel, norm, TAU, delta, EPS, *need)
    xl, sl = _policy(x, segs)
    _, idx64, p64, n64 = _ref64(xl, sl, kk, delta)
    want = ref.moram_bwd(_d(gy), _d(xl), *map(_d, sl), None, idx64, p64, n64, TAU, delta, EPS,
                         *need)
    likes = (x, segs[0], segs[1], segs[3], segs[4])
    for nm, g, w, like in zip(("gx", "gk0", "gv0", "gk1", "gv1"), got, want, likes):
        if w is None:
            assert g is None, f"{nm} was not asked for"
            continue
        assert g.shape == like.shape and g.dtype == like.dtype, nm
        _close(g, w, x.dtype, nm)
    return got


# name: (T, d_in, d_out, N0, N1, k)
SHAPES = {
    "decode-T3-split": (3, 40, 24, 150, 50, 8),        # 7 atom tiles, one token block: N split
    "T40-boundary-in-tile": (40, 97, 33, 45, 19, 5),   # d = 97, K = 5 in the 8 bucket
    "K33-bucket64": (6, 24, 16, 70, 0, 33),
    "N1": (4, 16, 8, 0, 1, 16),
}


@pytest.mark.parametrize("dn", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_backward(shape, dn):
    t, d_in, d_out, n0, n1, k = SHAPES[shape]
    x, segs, kk = _case(t, d_in, d_out, n0, n1, k, DT[dn], seed=len(shape))
    _check_fwd(x, segs, kk)
    if dn != "fp16" or shape.startswith("decode"):   # keeps the interpreter run short
        _check_bwd(x, segs, kk, gram=shape.startswith("T40"))


def test_plan_splits_covers_every_tile_once():
    for t, n0, n1, bt, bn in ((1, 16384, 0, 16, 64), (4096, 16000, 384, 128, 128),
                              (3, 150, 50, 16, 32), (5, 1, 0, 16, 32), (70, 0, 65536, 64, 64)):
        s, per = tf.plan_splits(t, n0, n1, bt, bn, torch.device("cpu"))
        tiles = -(-n0 // bn) + -(-n1 // bn)
        assert 1 <= s <= tiles and per * s >= tiles and per * (s - 1) < tiles


def test_split_path_is_taken():
    """The decode case above must really merge several partial lists (else the merge
    kernel's multi-split path would go untested here)."""
    t, _, _, n0, n1, _ = SHAPES["decode-T3-split"]
    cfg = tf.scan_config(t, 8, "fp32")
    assert tf.plan_splits(t, n0, n1, cfg.BT, cfg.BN, DEV)[0] > 1


def _gap_delta(x, segs, kk):
    """A threshold in the widest gap of the selected normalised scores: no s sits on it."""
    _, _, p_sel, norm = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    s = (p_sel / norm[:, None]).flatten().sort().values
    i = int(torch.diff(s[len(s) // 4: 3 * len(s) // 4]).argmax()) + len(s) // 4
    return float(s[i] + s[i + 1]) / 2


def test_delta_threshold_forward_backward():
    x, segs, kk = _case(9, 32, 20, 30, 10, 6, torch.float32, seed=3)
    delta = _gap_delta(x, segs, kk)
    _check_fwd(x, segs, kk, delta)
    _check_bwd(x, segs, kk, delta)


def test_mixed_dtypes_and_strided_inputs():
    """bf16 x with fp32 atoms computes in bf16 (the policy), and every gradient comes back
    in its own input's dtype (_check_bwd checks the dtypes)."""
    x, segs, kk = _case(10, 24, 12, 20, 12, 4, torch.bfloat16, keys_dt=torch.float32, seed=4)
    x_t = x.t().contiguous().t()              # column-major x: strides (1, T)
    assert not x_t.is_contiguous()
    k0 = segs[0].t().contiguous().t()
    segs = (k0, *segs[1:])
    _check_fwd(x_t, segs, kk)
    _check_bwd(x_t, segs, kk)


@pytest.mark.parametrize("d_in,n", [(16, 64), (97, 20)])
def test_dense_term_both_plans(d_in, n):
    """(16, 64): x G is cheaper; (97, 20): recomputing P A is. Both must give the right gx."""
    t = 40
    plan = tb._dense_plan(t, d_in, n, have_gram=False, have_p=False)
    assert plan == ("gram" if t * d_in * d_in + n * d_in * d_in < 2 * t * n * d_in else "recompute")
    assert plan == ("gram" if d_in < n else "recompute")
    x, segs, kk = _case(t, d_in, 8, n, 0, 4, torch.float32, seed=5, scale=False)
    _check_bwd(x, segs, kk, need=(True, False, False))
    _check_bwd(x, segs, kk, gram=True, need=(True, False, False))


def test_db_deterministic_matches_atomic_and_repeats():
    x, segs, kk = _case(33, 16, 40, 10, 6, 8, torch.float32, seed=6)   # hot atoms: many hits each
    got_atomic = _check_bwd(x, segs, kk, need=(False, True, True))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = _check_bwd(x, segs, kk, need=(False, True, True))
        b = _check_bwd(x, segs, kk, need=(False, True, True))
    finally:
        torch.use_deterministic_algorithms(prev)
    for i in (2, 4):
        assert torch.equal(a[i], b[i]), "deterministic dB changed between runs"
        torch.testing.assert_close(a[i], got_atomic[i], rtol=1e-5, atol=1e-5)


def test_public_api_autograd_and_compile():
    """mk.moram(backend="triton") end to end, eager and under torch.compile(fullgraph=True)."""
    x, keys, values = make_inputs(6, 16, 8, 24, k=4, seed=8)
    leaves = [v.to(DEV).requires_grad_() for v in (x, keys, values)]

    def f(a, b, c):
        return mk.moram(a, b, c, k=4, tau=0.2, backend="triton")

    y = f(*leaves)
    g = torch.autograd.grad(y.square().sum(), leaves)
    want_y = mk.moram(*leaves, k=4, tau=0.2, backend="reference")
    want_g = torch.autograd.grad(want_y.square().sum(), leaves)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    gc = torch.autograd.grad(yc.square().sum(), leaves)
    torch.testing.assert_close(yc, y, rtol=0, atol=0)
    for a, b in zip(gc, g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_zero_token_adds_nothing():
    x, segs, kk = _case(4, 16, 8, 12, 0, 4, torch.float32, seed=9)
    x[1] = 0
    y, _, _, norm = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    assert (y[1] == 0).all() and norm[1].item() == pytest.approx(EPS)
    gx = tk.moram_bwd(torch.ones_like(y), x, *segs, None, *tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)[1:],
                      TAU, 0.0, EPS, True, False, False)[0]
    assert torch.isfinite(gx).all()


def test_no_launch_without_gpu_or_interpreter():
    """With TRITON_INTERPRET unset and no GPU, the package must not offer (or launch) Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import torch, moram_kernels as mk\n"
            "assert 'triton' not in mk.available_backends(), mk.available_backends()\n"
            "x = torch.randn(3, 8)\n"
            "try:\n"
            "    mk.moram(x, torch.randn(5, 8), torch.randn(5, 4), k=2, tau=0.1, backend='triton')\n"
            "except RuntimeError as e:\n"
            "    assert 'TRITON_INTERPRET' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('forcing triton without a GPU did not raise')\n"
            "y = mk.moram(x, torch.randn(5, 8), torch.randn(5, 4), k=2, tau=0.1)\n"
            "assert y.shape == (3, 4)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_gpu_check_script_plan_and_smoke():
    """benchmarks/gpu_check.py cannot run here; its plan and its inline parity check can."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    script = os.path.join(root, "benchmarks", "gpu_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, script, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prefill fwd+bwd" in r.stdout and "decode T=1 N=1024" in r.stdout
    r = subprocess.run([sys.executable, script, "--smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count(": ok") >= 4 and "FAIL" not in r.stdout


def test_gpu_check_table_ratios(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "benchmarks"))
    import gpu_check
    rows = [dict(case="c", impl=name, ms=ms, tflops=400.0, gbs=1000.0)
            for name, ms in (("cuBLAS x@keys.T", 1.0), ("authors", 3.0), ("triton", 1.5),
                             ("authors (graph)", 2.0), ("triton (graph)", 0.5))]
    gpu_check.print_table(rows, 800.0, 4000.0)
    out = {line.split()[1] + (" g" if "(graph)" in line else ""): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "2.00x" in out["triton"] and "1.50x" in out["triton"] and "50%" in out["triton"]
    assert "4.00x" in out["triton g"]          # graph rows compare with the authors' graph row


def _gpu_check_module():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "benchmarks"))
    import gpu_check
    return gpu_check


def test_gpu_check_survives_a_pytest_timeout(monkeypatch, capsys):
    """A slow first compile must not kill the check: a pytest that times out is reported
    as a failure and run_pytest returns, instead of raising TimeoutExpired."""
    gc = _gpu_check_module()

    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    monkeypatch.setattr(gc.subprocess, "run", slow)
    assert gc.run_pytest(30) is False
    assert "TIMED OUT" in capsys.readouterr().out
    assert gc.run_pytest(5) is False               # too little budget left: skipped, said so
    assert "skipped" in capsys.readouterr().out


def test_gpu_check_model_never_beats_the_floor():
    """The cost model's prediction of every row is at least the row's FLOP/byte floor
    (a prediction under the floor would make the first GPU run unreadable)."""
    gc = _gpu_check_module()
    hw = gc.H200
    for name, t, fl, by in gc.plan():
        floor_ms = 1e3 * max(fl / hw["tc_blas"], by / hw["hbm"])
        for impl in ("authors", "triton", "cuda"):
            ms = gc.predict_ms(name, impl, t)
            assert ms >= floor_ms * 0.999, (name, impl, ms, floor_ms)
