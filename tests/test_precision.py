"""The dtype policy (moram_kernels/_precision.py) on CPU: autocast, mixed dtypes, the cached
low-precision frozen bank, gradients in each input's dtype, TF32 rounding in the Triton
interpreter, the Triton kernels at the GPU's tile sizes, and the mm.dtype probe."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import REL_ATOL, make_inputs, max_rel_err, oracle
from torch import nn

import moram_kernels as mk
from moram_kernels import _precision
from moram_kernels.backends import reference as ref

BACKENDS = mk.available_backends()          # includes "triton" under TRITON_INTERPRET=1
BF16 = torch.bfloat16


def _layer(d_in=24, d_out=12, tasks=3, r=8, k=4, backend=None):
    torch.manual_seed(0)
    layer = mk.MoRAMLinear(nn.Linear(d_in, d_out), r=r, k=k, tau=0.1, alpha=16.0, backend=backend)
    for _ in range(tasks):
        layer.add_task()
        with torch.no_grad():
            layer.values.normal_()
            layer.keys.mul_(3.0)
    return layer


def _layer_oracle(layer, x, dtype):
    """The layer's delta with x and every atom rounded to ``dtype`` first, then fp64 math."""
    r = lambda t: t.detach().to(dtype).double()  # noqa: E731
    keys = torch.cat([r(layer.frozen_keys), r(layer.keys)])
    values = torch.cat([r(layer.frozen_values), r(layer.values)])
    vs = torch.cat([torch.ones(layer.frozen_keys.shape[0]),
                    torch.full((layer.keys.shape[0],), layer.scaling)]).double()
    return oracle(r(x), keys, values, k=layer.k, tau=layer.tau, delta=0.0, value_scale=vs)


def test_policy_table():
    """(compute dtype, output dtype) of a call, from the one function that decides them."""
    f32, f16, f64 = torch.float32, torch.float16, torch.float64

    def cd(x_dtype, atoms, device):
        return _precision.call_dtypes(torch.empty(0, dtype=x_dtype, device=device), atoms)
    assert cd(f32, (f32, f32), "cpu") == (f32, f32)
    assert cd(f32, (BF16, f32), "cpu") == (BF16, f32)
    assert cd(BF16, (f32,), "cpu") == (BF16, BF16)
    assert cd(f16, (BF16,), "cpu") == (f16, f16)                       # tie: x's dtype
    assert cd(f64, (f32,), "cpu") == (f32, f64)
    with torch.autocast("cpu", dtype=BF16):
        assert cd(f32, (f32,), "cpu") == (BF16, BF16)
        assert cd(f64, (f64,), "cpu") == (f64, f64)                    # autocast leaves fp64 alone
        assert cd(f64, (f32,), "cpu") == (f32, f64)
        assert cd(f32, (f32,), "meta") == (f32, f32)                   # autocast of another device


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_autocast(backend):
    """Like nn.Linear: bf16 output, the adapter computed from bf16-rounded x and atoms with
    fp32 accumulation, fp32 gradients for the fp32 parameters and input."""
    layer = _layer(backend=backend)
    layer.train()
    x = torch.randn(7, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
        base = layer.base_layer(x)
    assert y.dtype == BF16
    want = _layer_oracle(layer, x, BF16)
    err = max_rel_err((y.double() - base.double()), want)
    assert err <= REL_ATOL[BF16], f"{backend}: relative error {err:.2e} under autocast"
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer.keys.grad.dtype == torch.float32 and layer.values.grad.dtype == torch.float32
    assert torch.isfinite(layer.keys.grad).all() and layer.keys.grad.abs().sum() > 0


def test_autocast_gradients_match_the_bf16_computation():
    """The gradients under autocast equal those of the same layer fed bf16 copies of x and
    its atoms (the policy's computation), cast back to fp32."""
    layer = _layer(backend="reference")
    x = torch.randn(9, 24, requires_grad=True)
    gy = torch.randn(9, 12).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x) - layer.base_layer(x)
    gx, gk, gv = torch.autograd.grad(y, (x, layer.keys, layer.values), gy)
    xb = x.detach().to(BF16).requires_grad_()
    kb = layer.keys.detach().to(BF16).requires_grad_()
    vb = layer.values.detach().to(BF16).requires_grad_()
    from moram_kernels.functional import moram_segments
    sc = torch.full((kb.shape[0],), layer.scaling)
    yb, _ = moram_segments(xb, layer.frozen_keys.to(BF16), layer.frozen_values.to(BF16), None, kb, vb,
                           sc, k=layer.k, tau=layer.tau, delta=0.0, eps=layer.eps, backend="reference")
    wx, wk, wv = torch.autograd.grad(yb, (xb, kb, vb), gy)
    for got, want in ((gx, wx), (gk, wk), (gv, wv)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


def test_frozen_bank_cast_is_cached_and_invalidated():
    layer = _layer(backend="reference")
    layer.eval()
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=BF16):
        y1 = layer(x)
        fk1 = layer._caches.bank.value[0]
        layer(x)
        assert layer._caches.bank.value[0] is fk1, "the bf16 bank was cast again on the second call"
        with torch.no_grad():
            layer.frozen_values.mul_(2.0)          # in place: the cached copy is stale
        y2 = layer(x)
    assert layer._caches.bank.value[0] is not fk1
    assert layer._caches.bank.value[1].dtype == BF16
    with torch.autocast("cpu", dtype=BF16):
        base = layer.base_layer(x)
    want = _layer_oracle(layer, x, BF16)
    assert max_rel_err(y2.double() - base.double(), want) <= REL_ATOL[BF16]
    assert not torch.equal(y1, y2)
    layer.add_task()
    assert layer._caches.bank.value is None


def test_gram_is_cached_in_the_compute_dtype():
    layer = _layer(d_in=8, tasks=4, r=4, backend="reference")     # 12 frozen >= d_in: gram used
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        layer(x).float().sum().backward()
    g = layer._caches.gram.value
    assert g.dtype == BF16
    a = layer.frozen_keys.double()
    torch.testing.assert_close(g.double(), a.t() @ a, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_mixed_dtypes_compute_in_the_lower(backend):
    """fp32 x with bf16 atoms: computed in bf16, returned in fp32; each gradient in its
    input's dtype."""
    x, keys, values = make_inputs(8, 32, 16, 24, k=4, keys_dtype=BF16, seed=3)
    x.requires_grad_()
    keys.requires_grad_()
    values.requires_grad_()
    y = mk.moram(x, keys, values, k=4, tau=0.1, backend=backend)
    assert y.dtype == torch.float32
    want = oracle(x.detach().to(BF16), keys.detach(), values.detach(), k=4, tau=0.1)
    assert max_rel_err(y, want) <= REL_ATOL[BF16]
    gx, gk, gv = torch.autograd.grad(y.sum(), (x, keys, values))
    assert (gx.dtype, gk.dtype, gv.dtype) == (torch.float32, BF16, BF16)
    with torch.autocast("cpu", dtype=BF16):
        ya = mk.moram(x.detach(), keys.detach(), values.detach(), k=4, tau=0.1, backend=backend)
    assert ya.dtype == BF16


# ---- Triton interpreter: GPU rounding and GPU tile sizes ---------------------------------------

needs_interp = pytest.mark.skipif("triton" not in BACKENDS or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="runs the Triton kernels in the interpreter")


def _round_tf32(t):
    """fp32 -> TF32 (10 mantissa bits, ties away from zero), as the GPU's cvt.rna.tf32."""
    b = t.view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


@needs_interp
def test_interpreter_rounds_fp32_dots_to_tf32_when_allowed():
    from moram_kernels.backends import triton as tk
    x, keys, values = make_inputs(5, 64, 8, 40, k=4, seed=11)
    e = keys.new_empty(0, 64), values.new_empty(0, 8)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        _, idx, p_sel, _ = tk.moram_fwd(x, keys, values, None, e[0], e[1], None, 4, 0.1, 0.0, 1e-12)
        torch.set_float32_matmul_precision("highest")
        _, _, p_ieee, _ = tk.moram_fwd(x, keys, values, None, e[0], e[1], None, 4, 0.1, 0.0, 1e-12)
    finally:
        torch.set_float32_matmul_precision(prev)
    p_tf32 = (_round_tf32(x).double() @ _round_tf32(keys).double().t()).gather(1, idx)
    p_exact = (x.double() @ keys.double().t()).gather(1, idx)
    gap = max_rel_err(p_tf32, p_exact)
    assert gap > 1e-5, "TF32 rounding too small to tell apart on this case"
    assert max_rel_err(p_sel, p_tf32) < gap / 20, "the TF32 dot was not rounded like a GPU's"
    assert max_rel_err(p_ieee, p_exact) < gap / 20, "'highest' must keep fp32 products"


@needs_interp
@pytest.mark.parametrize("t", [20, 130], ids=["decode64-tiles", "prefill-tiles"])
def test_gpu_tile_sizes_in_the_interpreter(t, monkeypatch):
    """The GPU block shapes (64/128-wide tiles, BD = 64) of the fused road's scan on shapes
    that cross them: T past 128 tokens, N past two 128-atom tiles with a segment boundary
    inside a tile, d_in past two 64-wide chunks with a ragged end."""
    from moram_kernels.backends import triton as tk
    monkeypatch.setenv("MORAM_TRITON_FWD", "fused")
    from moram_kernels.backends.triton import _common
    cfg = _common.scan_config(t, 16, "bf16", gpu_tiles=True)
    assert cfg.BN >= 64 and cfg.BD >= 64 and cfg.name != "interp"
    x, keys, values = make_inputs(t, 136, 24, 300, k=16, dtype=BF16, seed=t)
    n0 = 257
    segs = (keys[:n0], values[:n0], None, keys[n0:], values[n0:], torch.full((300 - n0,), 2.0))
    y, idx, p_sel, norm = tk.moram_fwd(x, *segs, 16, 0.1, 0.0, 1e-12, gpu_tiles=True)
    y64, idx64, p64, n64 = ref.moram_fwd(x.double(), *(s.double() if s is not None else None for s in segs),
                                         16, 0.1, 0.0, 1e-12)
    assert torch.equal(idx.sort(1).values, idx64.sort(1).values)
    assert max_rel_err(y, y64) <= REL_ATOL[BF16]
    assert max_rel_err(norm, n64) <= REL_ATOL[torch.float32]


# ---- no silent fallback in the triton backward's GEMMs ---------------------------------------

@needs_interp
def test_mm_dtype_probe_warns_once_and_errors_propagate(monkeypatch):
    from moram_kernels import _warnings
    from moram_kernels.backends.triton import backward as tb
    dev = torch.device("cpu")                      # CPU torch has no aten::mm.dtype kernel
    tb._MM_FP32_OUT.pop((dev, BF16), None)
    _warnings._warned.discard(f"mm-out-dtype-{dev}-{BF16}")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert tb._mm_fp32_out_supported(dev, BF16) is False
        assert tb._mm_fp32_out_supported(dev, BF16) is False
    hits = [m for m in w if "out_dtype" in str(m.message)]
    assert len(hits) == 1, "the missing kernel is said once, not never and not per call"
    a = torch.randn(4, 5).to(BF16)
    assert tb._mm_fp32_out_road(a) is False        # so _mm takes the fp32 product here
    torch.testing.assert_close(tb._mm(a, a.t()), a.float() @ a.float().t())

    # the aten::mm.dtype road (a GPU's), driven on CPU with a stand-in for torch.mm: its
    # result is returned as is, and an error of the product itself is not swallowed into
    # the fp32 fallback
    real_mm = torch.mm
    state = {"fail": False}

    def fake_mm(x, y, out_dtype=None):
        if out_dtype is None:
            return real_mm(x, y)
        if state["fail"]:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return torch.full((x.shape[0], y.shape[1]), 7.0, dtype=out_dtype)
    monkeypatch.setattr(tb, "_mm_fp32_out_road", lambda t: True)
    monkeypatch.setattr(torch, "mm", fake_mm)
    assert torch.equal(tb._mm(a, a.t()), torch.full((4, 4), 7.0))
    state["fail"] = True
    with pytest.raises(RuntimeError, match="out of memory"):
        tb._mm(a, a.t())
