"""The Triton forward roads chosen by ``MORAM_TRITON_FWD``: ``split`` (decode: per-block
scores, then the packed-key select kernel), ``gemm`` (torch GEMM scores, then the same
select streaming them) and ``gemm2`` (torch GEMM scores, the groups kernel, then the
select in group mode), against the float64 reference, forward and backward through the public op;
the switch itself; the split plan; the wave-aware scan plan; and a launcher that never
synchronises with the host. Runs in the interpreter (tests/conftest.py); shapes are tiny."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import REL_ATOL, make_inputs, max_rel_err

import moram_kernels as mk
from moram_kernels.backends import reference as ref

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif("triton" not in mk.available_backends(),
                                reason="triton backend unavailable here (no GPU and no TRITON_INTERPRET=1)")
tk = pytest.importorskip("moram_kernels.backends.triton")
from moram_kernels.backends.triton import _common, split  # noqa: E402
from moram_kernels.backends.triton import forward as tf  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cpu" if INTERP else "cuda")
TAU, EPS = 0.1, 1e-12
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROUTES = ("split", "gemm", "gemm2")


@pytest.fixture
def road(monkeypatch):
    def set_road(name):
        monkeypatch.setenv("MORAM_TRITON_FWD", name)
    return set_road


def _segments(t, d_in, d_out, n0, n1, k, dt, seed):
    """x, (keys0, values0, scale0, keys1, values1, scale1) in ``dt`` (scales fp32), on DEV."""
    x, keys, values = make_inputs(t, d_in, d_out, n0 + n1, k=k, dtype=dt, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    sc = torch.rand(n0 + n1, generator=g) + 0.5
    segs = (keys[:n0], values[:n0], sc[:n0].clone(), keys[n0:], values[n0:], sc[n0:].clone())
    return x.to(DEV), tuple(s.to(DEV) for s in segs)


def _d(v):
    return None if v is None else v.detach().double().cpu()


def _public(x, segs, k, delta, backend, grads=True):
    """y and the gradients of x, keys1, values1 (the trainable segment) through
    ``moram_segments``: segment 0 frozen, segment 1 trainable, both with value scales."""
    x = x.detach().requires_grad_(grads)
    k1 = segs[3].detach().requires_grad_(grads)
    v1 = segs[4].detach().requires_grad_(grads)
    y, idx = mk.functional.moram_segments(x, segs[0], segs[1], segs[2], k1, v1, segs[5],
                                          k=k, tau=TAU, delta=delta, eps=EPS, backend=backend)
    if not grads:
        return y, idx, ()
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    return y, idx, torch.autograd.grad(y, (x, k1, v1), gy)


# name: (T, d_in, d_out, N0, N1, k, dtype)
CASES = {
    # split: 14 blocks of 16 atoms fill the pretend GPU (4 SMs): one d_in slice, group
    # maxima; gemm: 200 scores per token, 4 chunks of 64 merged by threshold
    "T3-d37-groups-bf16": (3, 37, 24, 150, 50, 8, "bf16"),
    # split: 2 blocks, so d_in = 70 is cut into 3 slices summed by the select (stream mode)
    "T1-d70-slices-fp16": (1, 70, 16, 12, 8, 16, "fp16"),
    # N < k: K = N = 5 in the 8 bucket, one segment
    "T2-N5-k16-fp32": (2, 16, 8, 5, 0, 16, "fp32"),
    # K = 33 in the 64 bucket, frozen segment empty
    "T2-K33-fp32": (2, 24, 16, 0, 70, 33, "fp32"),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
def test_route_forward_backward_public_op(case, route, road):
    t, d_in, d_out, n0, n1, k, dn = CASES[case]
    x, segs = _segments(t, d_in, d_out, n0, n1, k, DT[dn], seed=len(case))
    road(route)
    y, idx, grads = _public(x, segs, k, 0.0, "triton")
    y64, idx64, want = _public(_d(x), tuple(map(_d, segs)), k, 0.0, "reference")
    assert torch.equal(idx.sort(1).values.cpu(), idx64.sort(1).values), "top-K sets differ"
    assert y.dtype == x.dtype
    assert max_rel_err(y.cpu(), y64) <= REL_ATOL[x.dtype], "y"
    for name, g, w in zip(("gx", "gkeys1", "gvalues1"), grads, want):
        assert g.shape == w.shape, name
        if w.numel():
            assert max_rel_err(g.cpu(), w) <= REL_ATOL[x.dtype], name


@pytest.mark.parametrize("route", ROUTES)
def test_route_threshold_at_eval(route, road):
    """delta > 0 (eval): the saved p_sel/norm and the threshold agree with the reference
    in the forward and the backward (backend contract)."""
    x, segs = _segments(4, 32, 12, 30, 10, 6, torch.float32, seed=5)
    road(route)
    kk = ref.effective_k(6, 40)
    _, _, p_sel, norm = tk.moram_fwd(x, *segs, kk, TAU, 0.0, EPS)
    s = (p_sel / norm[:, None]).flatten().sort().values
    i = int(torch.diff(s[len(s) // 4: 3 * len(s) // 4]).argmax()) + len(s) // 4
    delta = float(s[i] + s[i + 1]) / 2        # in the widest gap: no s sits on the threshold
    y, idx, p_sel, norm = tk.moram_fwd(x, *segs, kk, TAU, delta, EPS)
    y64, idx64, p64, n64 = ref.moram_fwd(_d(x), *map(_d, segs), kk, TAU, delta, EPS)
    assert torch.equal(idx.sort(1).values, idx64.sort(1).values)
    assert max_rel_err(y, y64) <= REL_ATOL[torch.float32]
    assert max_rel_err(norm, n64) <= REL_ATOL[torch.float32]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    got = tk.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, delta, EPS, True, True, True)
    want = ref.moram_bwd(gy.double(), _d(x), *map(_d, segs), None, idx64, p64, n64, TAU, delta, EPS,
                         True, True, True)
    for g, w in zip(got, want):
        assert max_rel_err(g, w) <= REL_ATOL[torch.float32]


@pytest.mark.parametrize("route", ROUTES)
def test_route_ties_go_to_the_lower_id(route, road):
    """Exact ties at the K-th place go to the lower ids: atoms 1, 3 and 9 share one key,
    the largest score of token 0, and K = 2 keeps 1 and 3."""
    x, segs = _segments(2, 16, 8, 12, 0, 2, torch.float32, seed=6)
    keys = segs[0].clone()
    keys[[1, 3, 9]] = 3 * keys.norm(dim=1).max() * x[0] / x[0].norm()
    road(route)
    _, idx, _, _ = tk.moram_fwd(x, keys, segs[1], None, keys[:0], segs[1][:0], None, 2, TAU, 0.0, EPS)
    assert sorted(idx[0].tolist()) == [1, 3]


@pytest.mark.parametrize("route", ROUTES)
def test_route_zero_and_one_token(route, road):
    x, segs = _segments(1, 24, 8, 20, 4, 4, torch.float32, seed=7)
    road(route)
    y, idx, p_sel, norm = tk.moram_fwd(x[:0], *segs, 4, TAU, 0.0, EPS)
    assert y.shape == (0, 8) and idx.shape == (0, 4) and p_sel.shape == (0, 4) and norm.shape == (0,)
    y, idx, _, _ = tk.moram_fwd(x, *segs, 4, TAU, 0.0, EPS)
    y64, idx64, _, _ = ref.moram_fwd(_d(x), *map(_d, segs), 4, TAU, 0.0, EPS)
    assert torch.equal(idx.sort(1).values, idx64.sort(1).values)
    assert max_rel_err(y, y64) <= REL_ATOL[torch.float32]


@pytest.mark.parametrize("route", ROUTES)
def test_route_nan_token_stays_in_its_row(route, road):
    """A NaN in one token's x: that token's output is NaN and its ids are still atoms of
    the bank; the other tokens match the reference (the groups kernel's tiles hold
    several tokens, and a NaN group maximum must not leak into a neighbour's row)."""
    x, segs = _segments(5, 24, 8, 70, 30, 6, torch.float32, seed=11)
    x[2, 5] = float("nan")
    road(route)
    y, idx, _, _ = tk.moram_fwd(x, *segs, 6, TAU, 0.0, EPS)
    assert torch.isnan(y[2]).all() and ((idx[2] >= 0) & (idx[2] < 100)).all()
    ok = [0, 1, 3, 4]
    y64, idx64, _, _ = ref.moram_fwd(_d(x[ok]), *map(_d, segs), 6, TAU, 0.0, EPS)
    assert torch.equal(idx[ok].sort(1).values, idx64.sort(1).values)
    assert max_rel_err(y[ok], y64) <= REL_ATOL[torch.float32]


def test_split_groups_and_chunks_cross_their_blocks(road):
    """Group maxima past one chunk of the select (more than 64 groups of 8 atoms: the split
    road's and the gemm2 road's), and the gemm road's threshold merges over 11 chunks, on
    one token."""
    x, segs = _segments(1, 16, 8, 600, 90, 16, torch.float32, seed=9)
    n0, n1 = 600, 90
    bn, nb, parts, _ = split.split_plan(1, n0, n1, 16, 32, _common.sm_count(DEV))
    assert parts == 1 and nb * (bn // split.GROUP_ATOMS) > split.pick_config(16)[0]
    gbn = split.groups_config()[1]
    assert (-(-n0 // gbn) + -(-n1 // gbn)) * (gbn // split.GROUP_ATOMS) > split.pick_config(16)[0]
    y64, idx64, _, n64 = ref.moram_fwd(_d(x), *map(_d, segs), 16, TAU, 0.0, EPS)
    for route in ROUTES:
        road(route)
        y, idx, _, norm = tk.moram_fwd(x, *segs, 16, TAU, 0.0, EPS)
        assert torch.equal(idx.sort(1).values, idx64.sort(1).values), route
        assert max_rel_err(y, y64) <= REL_ATOL[torch.float32], route
        assert max_rel_err(norm, n64) <= REL_ATOL[torch.float32], route


# ---- the switch ---------------------------------------------------------------------------------

def test_fwd_route_reads_the_variable_on_every_call(road, monkeypatch):
    assert tf.FWD_ROUTES == ("auto", "fused", "split", "gemm", "scan2", "gemm2")
    for name in tf.FWD_ROUTES[1:]:
        road(name)
        assert tf.fwd_route(4096, 16384, 4096) == name
    road("auto")
    assert tf.fwd_route(1, 16384, 4096) == "split" and tf.fwd_route(16, 65536, 4096) == "split"
    assert tf.fwd_route(64, 1024, 4096) == "split" and tf.fwd_route(64, 16384, 4096) == "gemm2"   # the model's
    from moram_kernels.backends.triton import model as tm
    for t in (17, 65, 4096):    # above decode: the runtime model's cheapest route, for t's bucket
        b = tf.route_bucket(t)
        assert tf.fwd_route(t, 16384, 4096) == tm.prefill_route(b, 4096, 16384, 16, "bf16", "tf32", 132)
    assert tf.fwd_route(65, 16384, 4096, sms=108) == "split"     # an A100: split past decode too
    monkeypatch.delenv("MORAM_TRITON_FWD")
    assert tf.fwd_route(1, 64, 64) == "split"
    road("scan9")
    with pytest.raises(ValueError, match="MORAM_TRITON_FWD"):
        tf.fwd_route(1, 64, 64)


def test_prefill_lengths_share_the_models_answers(road):
    """``auto`` asks the runtime model once per bucket of prompt lengths: ``route_bucket``
    rounds up to two significant bits, under 1.5x, so 2,000 lengths make 11 calls."""
    from moram_kernels.backends.triton import model as tm
    got = [tf.route_bucket(t) for t in range(1, 10001)]
    assert all(t <= b < 1.5 * t or b == t for t, b in enumerate(got, 1))
    assert all(tf.route_bucket(1 << j) == 1 << j for j in range(20))     # powers of two: their own
    assert len(set(got[64:2064])) == 11
    road("auto")
    tm.prefill_route.cache_clear()
    for t in range(65, 2065):
        tf.fwd_route(t, 4096, 1024, sms=132)
    assert tm.prefill_route.cache_info().currsize == len({tf.route_bucket(t) for t in range(65, 2065)})


def test_auto_route_follows_the_cost_model(road):
    """``auto`` picks the route the model (``benchmarks/cost_model.py``: ``route_ms``, over
    the package's ``model``) predicts fastest among all four, on an H200 and an A100, for
    decode up to 16 tokens (``split`` without asking the model) and above, up to a 2 %
    dead heat where T is its own bucket (powers of two) and within 1.4x where ``auto``
    prices T's bucket instead of T (65 -> 96)."""
    from benchmarks import cost_model as cm
    road("auto")
    for hw in cm.HARDWARE.values():
        for t in (1, 16, 64, 65, 128, 256, 1024, 4096):
            for n in (64, 1024, 16384, 65536):
                times = {r: cm.route_ms(r, t, 4096, 4096, n, 16, hw) for r in tf.FWD_ROUTES[1:]}
                got = tf.fwd_route(t, n, 4096, sms=hw["sms"])
                slack = 1.02 if tf.route_bucket(t) == t else 1.4     # 2 %: the model's dead heats
                assert times[got] <= slack * min(times.values()), (hw, t, n, got, times)


def test_benchmark_hardware_is_the_runtime_models():
    """``benchmarks/cost_model.py``'s HARDWARE (importable without Triton) and the
    package's ``model.GPUS`` carry one set of numbers."""
    from benchmarks import cost_model as cm
    from moram_kernels.backends.triton import model as tm
    assert set(cm.HARDWARE) == set(tm.GPUS)
    for name, hw in cm.HARDWARE.items():
        assert cm._gpu(hw) == tm.GPUS[name], name


# ---- plans --------------------------------------------------------------------------------------

def test_split_plan_fills_twice_the_sms():
    for t, n0, n1, d in ((1, 1024, 0, 4096), (64, 1024, 0, 4096), (1, 65536, 0, 4096), (16, 16000, 384, 4096),
                         (1, 200, 0, 4096), (40, 64, 0, 64)):
        bn, nb, parts, per = split.split_plan(t, n0, n1, d, 128, 132, split.SPLIT_BN)
        assert bn >= min(t, 64), "x re-read from L2 by every block: at most the keys' bytes"
        assert nb == triton.cdiv(n0, bn) + triton.cdiv(n1, bn)
        assert per % 128 == 0 or parts == 1, "a d_in slice is whole BD chunks"
        assert parts == triton.cdiv(d, per) and per * parts >= d
        assert nb * parts >= 2 * 132 or parts == triton.cdiv(d, 128), (n0, n1, d, nb, parts)
    assert split.split_plan(1, 65536, 0, 4096, 128, 132, split.SPLIT_BN)[:3] == (64, 1024, 1)
    assert split.split_plan(1, 1024, 0, 4096, 128, 132, split.SPLIT_BN)[:3] == (16, 64, 6)
    assert split.split_plan(64, 1024, 0, 4096, 128, 132, split.SPLIT_BN)[:3] == (64, 16, 32)


@pytest.mark.parametrize("t,sms", [(17000, 132), (4096, 108)], ids=["T17000-H200", "T4096-A100"])
def test_plan_splits_is_wave_aware(t, sms):
    """The scan's split plan keeps the busy waves full: 133 token blocks on 132 SMs ran
    two waves of whole-bank programs (the second one program long), and 32 blocks x 3
    splits left 11 % of an A100 idle. N = 16,384 in 128 x 64 tiles, one program per SM."""
    s, per = tf.plan_splits(t, 16384, 0, 128, 64, None, 1, sms=sms)
    tiles, blocks = 16384 // 64, triton.cdiv(t, 128)
    assert per * s >= tiles and per * (s - 1) < tiles
    progs = blocks * s
    waves = triton.cdiv(progs, sms)
    assert progs / (waves * sms) >= 0.9, f"{s} splits: the waves are {progs / (waves * sms):.0%} full"
    ideal = blocks * tiles / sms
    assert waves * per <= 1.15 * ideal, f"{waves} waves x {per} tiles against {ideal:.0f}"


# ---- no host synchronisation --------------------------------------------------------------------

class _Launch:
    """Stands in for a jit kernel: records the launches, runs nothing."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            assert all(isinstance(g, int) for g in grid), f"{self.name}: grid {grid} is not host ints"
            self.log.append(self.name)
        return run


@pytest.mark.parametrize("route", ROUTES)
def test_launcher_never_synchronises(route, road, monkeypatch):
    """The split and gemm launchers read nothing back from the device (no ``.item()``,
    ``.tolist()``, ``nonzero``, tensor truth values or conversions to Python numbers), so
    a call can be captured in a CUDA graph: every such tensor method raises here while
    the launcher runs with its kernels stubbed out."""
    log = []
    for mod, names in ((split, ("_moram_split_scores_kernel", "_moram_groups_kernel", "_moram_pick_kernel")),
                       (_common, ("_moram_gather_kernel",))):
        for name in names:
            monkeypatch.setattr(mod, name, _Launch(log, name))

    def sync(name):
        def boom(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")
        return boom
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "cpu",
                 "numpy", "any", "all"):
        monkeypatch.setattr(torch.Tensor, name, sync(name))
    monkeypatch.setattr(torch, "nonzero", sync("torch.nonzero"))
    road(route)
    for t, n0, n1, d in ((1, 200, 40, 64), (3, 20, 9, 70), (0, 20, 9, 70)):
        x = torch.zeros(t, d)
        k0, k1 = torch.zeros(n0, d), torch.zeros(n1, d)
        v0, v1 = torch.zeros(n0, 8), torch.zeros(n1, 8)
        y, idx, p_sel, norm = tk.moram_fwd(x, k0, v0, None, k1, v1, torch.ones(n1), 8, TAU, 0.2, EPS)
        assert y.shape == (t, 8) and idx.shape == (t, 8)
    assert "_moram_pick_kernel" in log and "_moram_gather_kernel" in log
    assert ("_moram_split_scores_kernel" in log) == (route == "split")
    assert ("_moram_groups_kernel" in log) == (route == "gemm2")
