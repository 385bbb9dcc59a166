"""bf16 and fp16 inputs on the C++ CPU kernels (csrc/cpu/moram_cpu.cpp, "low-precision
GEMMs"): both roads, forced through MORAM_CPU_LOWP, so that a CPU without AMX or AVX512-BF16
(where MKL emulates the bf16 products) also runs the code of the native road. Forward and
backward against the float64 reference on the same (rounded) inputs, within the bf16/fp16
bounds of docs/testing.md "Tolerances"; the selections must be the exact top-K, as every
token's K-th gap is clear."""

from __future__ import annotations

import pytest
import torch
from helpers import REL_ATOL, make_inputs, max_rel_err

from moram_kernels.backends import compiled as _C_loader
from moram_kernels.backends import reference as ref

_WHY = _C_loader.why_unavailable("cpu")
if _WHY is not None:
    pytest.skip(f"the cpu backend is not built here: {_WHY}", allow_module_level=True)

from moram_kernels import _C  # noqa: E402  (built, per the check above)
from moram_kernels.backends import cpu as _cpu  # noqa: E402

TAU, EPS = 0.1, 1e-12
LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}

# name: (T, d_in, d_out, N0, N1, K); N0 is the frozen segment, N1 the trainable one
CASES = {
    "T2-d5-N3-K2": (2, 5, 3, 0, 3, 2),                 # tiny: K-th gap of 3 atoms, d below a vector
    "T33-d97-N40-K8": (33, 97, 50, 24, 16, 8),         # odd d (no aligned rows), both segments
    "T70-d48-N700-K16": (70, 48, 20, 684, 16, 16),     # N > d: the Gram road of the dense term; 3 tiles
}


@pytest.fixture(params=["native", "fp32"])
def road(request, monkeypatch):
    monkeypatch.setenv("MORAM_CPU_LOWP", request.param)
    monkeypatch.setenv("MORAM_CPU_BN", "256")   # several score tiles per token block
    if _C.cpu_lowp_road("bfloat16") != request.param:
        pytest.skip("this torch has no MKL mixed-precision GEMM (the native road falls back to fp32)")
    return request.param


def _case(name, dt, seed=0):
    t, d_in, d_out, n0, n1, k = CASES[name] if isinstance(name, str) else name
    x, keys, values = make_inputs(t, d_in, d_out, n0 + n1, k=k, seed=seed, min_gap=0.03)
    scale = torch.rand(n0 + n1, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    segs = (keys[:n0], values[:n0], scale[:n0].contiguous(), keys[n0:], values[n0:], scale[n0:].contiguous())
    low = tuple(s if s is None or i % 3 == 2 else s.to(dt) for i, s in enumerate(segs))
    wide = tuple(s if s is None or i % 3 == 2 else s.double() for i, s in enumerate(low))
    return x.to(dt), low, x.to(dt).double(), wide, k


def _close(got, want, dtype, what):
    err, bound = max_rel_err(got, want), REL_ATOL[dtype]
    assert err <= bound, f"{what}: relative error {err:.2e} > {bound:.1e} ({dtype})"


def test_the_override_picks_the_road(monkeypatch):
    caps = {"bfloat16": torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
            "float16": torch.cpu._is_amx_fp16_supported()}
    for dn in ("bfloat16", "float16"):
        monkeypatch.setenv("MORAM_CPU_LOWP", "fp32")
        assert _C.cpu_lowp_road(dn) == "fp32"
        monkeypatch.setenv("MORAM_CPU_LOWP", "native")
        native = _C.cpu_lowp_road(dn)
        for auto in ("auto", ""):
            monkeypatch.setenv("MORAM_CPU_LOWP", auto)
            # auto: native where the CPU multiplies the dtype itself (AMX-FP16 machines also
            # have AVX512-FP16; avx512_fp16 alone has no torch probe, so only a "native" is checked)
            got = _C.cpu_lowp_road(dn)
            assert got in (native, "fp32")
            if caps[dn]:
                assert got == native, dn
            elif dn == "bfloat16":
                assert got == "fp32", "no AMX/AVX512-BF16 here: the fp32 road"
    monkeypatch.setenv("MORAM_CPU_LOWP", "amx")
    with pytest.raises(RuntimeError, match="MORAM_CPU_LOWP must be auto, native or fp32"):
        _C.cpu_lowp_road("bfloat16")
    x, segs, *_ = _case("T2-d5-N3-K2", torch.bfloat16)
    with pytest.raises(RuntimeError, match="MORAM_CPU_LOWP"):
        _cpu.moram_fwd(x, *segs, 2, TAU, 0.0, EPS)


@pytest.mark.parametrize("dn", list(LOWP))
@pytest.mark.parametrize("name", list(CASES))
def test_forward_against_fp64(road, name, dn):
    dt = LOWP[dn]
    x, segs, x64, segs64, k = _case(name, dt)
    for delta in (0.0, 0.1):
        y, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, delta, EPS)
        y64, idx64, p64, n64 = ref.moram_fwd(x64, *segs64, k, TAU, delta, EPS)
        assert y.dtype == dt and p_sel.dtype == norm.dtype == torch.float32
        assert torch.equal(idx.sort(1).values, idx64.sort(1).values), "not the exact top-K"
        # the products of two bf16/fp16 numbers are exact in fp32: only the fp32 sums differ
        _close(p_sel, (x64 @ torch.cat([segs64[0], segs64[3]]).T).gather(1, idx), torch.float32, "p_sel")
        _close(norm, n64, torch.float32, "norm")
        _close(y, y64, dt, f"y (delta {delta})")


@pytest.mark.parametrize("dn", list(LOWP))
@pytest.mark.parametrize("with_gram", [False, True], ids=["no-gram0", "gram0"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_against_fp64(road, name, with_gram, dn):
    """gx (with the dense normalisation term, both of its strategies), both segments' key and
    value gradients, the frozen segment's Gram matrix given or not."""
    dt = LOWP[dn]
    x, segs, x64, segs64, k = _case(name, dt)
    delta = 0.1 if name.startswith("T33") else 0.0
    _, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, delta, EPS)
    gy = torch.randn(x.shape[0], segs[1].shape[1], generator=torch.Generator().manual_seed(3)).to(dt)
    gram = ref.gram(segs64[0]) if with_gram else None
    got = _cpu.moram_bwd(gy, x, *segs, None if gram is None else gram.float(), idx, p_sel, norm, TAU, delta, EPS,
                         True, True, True)
    want = ref.moram_bwd(gy.double(), x64, *segs64, gram, idx, p_sel.double(), norm.double(), TAU, delta, EPS,
                         True, True, True)
    for nm, g, w, like in zip(("gx", "gk0", "gv0", "gk1", "gv1"), got, want, (x, segs[0], segs[1], segs[3], segs[4])):
        assert g.shape == like.shape and g.dtype == dt, nm
        if like.numel():
            _close(g, w, dt, nm)


@pytest.mark.parametrize("dn", list(LOWP))
@pytest.mark.parametrize("t", [1, 9])
def test_small_bank_paths_on_either_road(road, t, dn):
    """The small-bank paths on each road: one decoded token (t = 1, fp32 key rows on both
    roads), a bank that fits in one tile (N = 200 <= MORAM_CPU_BN = 256: one score row per
    token, both segments' GEMMs side by side, then select_row) and the fused small-bank
    backward (N <= 4096, no Gram: gx and both key gradients from one [T, N] score gradient,
    every GEMM on the road). Against float64 on the same rounded inputs."""
    dt = LOWP[dn]
    x, segs, x64, segs64, k = _case((t, 48, 20, 150, 50, 8), dt, seed=5)
    y, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, k, TAU, 0.0, EPS)
    y64, idx64, _, n64 = ref.moram_fwd(x64, *segs64, k, TAU, 0.0, EPS)
    assert torch.equal(idx.sort(1).values, idx64.sort(1).values), "not the exact top-K"
    _close(norm, n64, torch.float32, "norm")
    _close(y, y64, dt, "y")
    gy = torch.randn(t, 20, generator=torch.Generator().manual_seed(4)).to(dt)
    got = _cpu.moram_bwd(gy, x, *segs, None, idx, p_sel, norm, TAU, 0.0, EPS, True, True, True)
    want = ref.moram_bwd(gy.double(), x64, *segs64, None, idx, p_sel.double(), norm.double(), TAU, 0.0, EPS,
                         True, True, True)
    for nm, g, w in zip(("gx", "gk0", "gv0", "gk1", "gv1"), got, want):
        assert g.dtype == dt, nm
        _close(g, w, dt, nm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_store_rounds_as_torch_does(dtype):
    """The kernels' fp32 -> low-precision row store (forward output rows, backward gradient
    rows): every finite value, infinity, overflow, subnormal and exact tie rounds to the bits
    torch's own conversion gives, and NaN stays NaN, at row lengths with and without a
    vector tail."""
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-2**31, 2**31, (40, 1003), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    ties = torch.tensor([0x3F808000, 0x3F818000, -0x40C08000, 0x00008000, 0x7F7FFFFF, 0x7F7F8000,
                         0x33000000, 0x387FE000], dtype=torch.int32).view(torch.float32)  # bf16 and fp16 ties
    x[0, :8] = ties
    x[1, :6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3.0e38, -6.0e-8])
    for n in (1003, 37, 8, 3):
        got, want = _C.cpu_store_rows(x[:, :n], str(dtype).split(".")[1]), x[:, :n].to(dtype)
        assert got.dtype == dtype
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        itype = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got[~nan].view(itype), want[~nan].view(itype)), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_value_rows_convert_every_bit_pattern_exactly(dtype):
    """The gather reads bf16/fp16 value rows as fp32 (fp16 by its own branch-free steps):
    all 65,536 bit patterns, subnormals included, come out as torch's conversion gives them,
    through one row (the single-row loop) and through the four-row loop."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    want = every.float()
    finite = torch.isfinite(want)
    zeros = torch.zeros_like(every)
    rows = torch.stack([zeros, every, zeros, zeros, zeros])
    ids = {1: [1], 4: [0, 1, 2, 3], 8: [0, 2, 3, 4, 0, 1, 2, 3]}   # the one-, four- and eight-row loops
    for k, picked in ids.items():
        got = _C.cpu_gather_rows(rows, torch.tensor(picked), torch.ones(k))
        assert torch.equal(got[finite], want[finite]), k       # -0 + 0 is +0: equal under ==
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                                 want[torch.isinf(want)])
        assert torch.equal(torch.isnan(got), torch.isnan(want)), k
    # and a weighted sum of rows with a tail row, against fp64
    g = torch.Generator().manual_seed(3)
    vals = torch.randn(9, 77, generator=g).to(dtype)
    idx, c = torch.tensor([4, 0, 8, 2, 7, 1]), torch.randn(6, generator=g)
    got = _C.cpu_gather_rows(vals, idx, c)
    ref64 = (c.double()[:, None] * vals[idx].double()).sum(0)
    torch.testing.assert_close(got.double(), ref64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_of_any_k_matches_fp64(dtype):
    """The gather sums K value rows eight at a time (the first eight written, not added, so no
    zeroing pass), then four, then one: every K from 2 to 19 (each mix of the three loops),
    repeated ids among them, against the same weighted sum in fp64. The binding starts its
    accumulator as NaN, so a loop that read it before the first write would show."""
    g = torch.Generator().manual_seed(11)
    vals = torch.randn(23, 83, generator=g).to(dtype)
    for k in range(2, 20):
        idx = torch.randint(0, 23, (k,), generator=g)
        c = torch.randn(k, generator=g)
        got = _C.cpu_gather_rows(vals, idx, c)
        ref64 = (c.double()[:, None] * vals[idx].double()).sum(0)
        torch.testing.assert_close(got.double(), ref64, rtol=1e-5, atol=1e-5, msg=lambda m: f"K={k}: {m}")
