"""The frozen base layer's fp32 road (moram_kernels/_base_road.py): on CPUs without a native
bf16/fp16 matrix unit, a frozen bf16/fp16 ``nn.Linear`` is multiplied in fp32 and rounded
once. It must give torch's own result within one rounding (forward and input gradient,
against float64), be taken by MoRAMLinear and ShardedMoRAMLinear's base call, and step
aside whenever it could change what the layer means (hooks, a trainable weight, autocast,
tensor subclasses, another module type)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_ATOL, max_rel_err
from torch import nn

import moram_kernels as mk
from moram_kernels import _base_road as base_road

LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def fp32_road(monkeypatch):
    monkeypatch.setenv("MORAM_CPU_LOWP", "fp32")


def _frozen(d_in, d_out, dt, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(dt).requires_grad_(False)


def _on_road(y: torch.Tensor) -> bool:
    fn = y.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":    # the reshape back to x's rows
        fn = fn.next_functions[0][0]
    return fn is not None and "_Fp32Linear" in type(fn).__name__


# (leading shape, d_in, d_out, slice elements): 3 rows stay on torch's forward (below
# MIN_FORWARD_ROWS) but take the road backward; the small slice sizes cut the weight into
# several slices, one of them ragged
SHAPES = [((3,), 40, 24, None), ((2, 17), 33, 50, None), ((70,), 48, 100, 48 * 7), ((5, 9), 20, 31, 20 * 4)]


@pytest.mark.parametrize("dt", LOWP)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"x{'x'.join(map(str, s[0]))}-{s[1]}to{s[2]}-slice{s[3]}")
def test_matches_float64_and_torch(fp32_road, monkeypatch, dt, bias, shape):
    lead, d_in, d_out, slice_elems = shape
    if slice_elems is not None:
        monkeypatch.setattr(base_road, "SLICE_ELEMENTS", slice_elems)
    dtype = LOWP[dt]
    lin = _frozen(d_in, d_out, dtype, bias)
    x = torch.randn(*lead, d_in).to(dtype).requires_grad_(True)
    y = base_road.base_forward(lin, x)
    assert _on_road(y) and y.dtype == dtype and y.shape == (*lead, d_out)
    gy = torch.randn_like(y)
    y.backward(gy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = F.linear(x64, lin.weight.double(), None if lin.bias is None else lin.bias.double())
    y64.backward(gy.double())
    xs = x.detach().clone().requires_grad_(True)
    ys = lin(xs)
    ys.backward(gy)
    bound = REL_ATOL[dtype]
    assert max_rel_err(y, y64) <= bound and max_rel_err(x.grad, x64.grad) <= bound
    # no worse than torch's own product, beyond a rounding
    assert max_rel_err(y, y64) <= max_rel_err(ys, y64) + bound / 4
    assert max_rel_err(x.grad, x64.grad) <= max_rel_err(xs.grad, x64.grad) + bound / 4


@pytest.mark.parametrize("dt", LOWP)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["T0", "B2xT0"])
def test_no_tokens(fp32_road, dt, lead):
    lin = _frozen(8, 5, LOWP[dt])
    x = torch.randn(*lead, 8).to(LOWP[dt]).requires_grad_(True)
    y = base_road.base_forward(lin, x)
    assert _on_road(y) and y.shape == (*lead, 5) and y.dtype == LOWP[dt]
    y.float().sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype


def test_the_switch(monkeypatch):
    lin = _frozen(24, 16, torch.bfloat16)
    x = torch.randn(32, 24).bfloat16().requires_grad_(True)
    monkeypatch.setenv("MORAM_CPU_LOWP", "fp32")
    assert _on_road(base_road.base_forward(lin, x))
    monkeypatch.setenv("MORAM_CPU_LOWP", "native")
    assert not _on_road(base_road.base_forward(lin, x))
    monkeypatch.setenv("MORAM_CPU_LOWP", "auto")
    caps = torch._C._cpu._get_cpu_capability()
    native = caps.get("avx512_bf16", False) or caps.get("amx_bf16", False)
    if caps.get("architecture", "x86_64") in ("x86_64", "AMD64"):
        assert _on_road(base_road.base_forward(lin, x)) == (not native)
    monkeypatch.setenv("MORAM_CPU_LOWP", "fast")
    with pytest.raises(ValueError, match="MORAM_CPU_LOWP"):
        base_road.base_forward(lin, x)


def _hooked_module(lin):
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(1) or o * 2)
    return seen


def test_steps_aside_where_it_would_change_the_layer(fp32_road):
    x = torch.randn(32, 24).bfloat16()
    # fp32 inputs: torch's own
    assert not _on_road(base_road.base_forward(_frozen(24, 16, torch.float32), x.float().requires_grad_()))
    # a forward hook runs, and its output counts
    lin = _frozen(24, 16, torch.bfloat16)
    seen = _hooked_module(lin)
    y = base_road.base_forward(lin, x)
    assert seen == [1] and torch.equal(y, F.linear(x, lin.weight, lin.bias) * 2)
    # a global module hook too
    lin = _frozen(24, 16, torch.bfloat16)
    calls = []
    h = nn.modules.module.register_module_forward_pre_hook(lambda m, i: calls.append(m) and None)
    try:
        base_road.base_forward(lin, x)
    finally:
        h.remove()
    assert calls == [lin]
    # a trainable weight gets its gradient from torch
    lin = _frozen(24, 16, torch.bfloat16)
    lin.weight.requires_grad_(True)
    y = base_road.base_forward(lin, x)
    assert not _on_road(y)
    y.float().sum().backward()
    assert lin.weight.grad is not None
    # a trainable bias alone as well
    lin = _frozen(24, 16, torch.bfloat16)
    lin.bias.requires_grad_(True)
    assert not _on_road(base_road.base_forward(lin, x.requires_grad_(True)))
    # autocast: nn.Linear's own casting rules
    lin = _frozen(24, 16, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _on_road(base_road.base_forward(lin, x.detach().requires_grad_(True)))
    # a weight of another dtype than x: torch's own (error or promotion)
    lin = _frozen(24, 16, torch.float16)
    with pytest.raises(RuntimeError):
        base_road.base_forward(lin, x)

    # a tensor subclass keeps its own dispatch
    class Tagged(torch.Tensor):
        pass

    lin = _frozen(24, 16, torch.bfloat16)
    y = base_road.base_forward(lin, x.detach().as_subclass(Tagged).requires_grad_(True))
    assert type(y) is Tagged and not _on_road(y)

    # a subclass of nn.Linear may compute something else
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    lin = Scaled(24, 16).bfloat16().requires_grad_(False)
    assert torch.equal(base_road.base_forward(lin, x), F.linear(x, lin.weight, lin.bias) * 3)


def test_moram_linear_takes_it_and_keeps_its_numbers(monkeypatch):
    """A bf16 MoRAMLinear train step on the road equals the same step with torch's base
    product (MORAM_CPU_LOWP=native) within bf16 rounding: output, gx, trainable grads."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40).bfloat16()
    layer = mk.MoRAMLinear(base, r=8, k=4, tau=0.1, backend="reference")
    layer.add_task()
    layer.add_task()
    with torch.no_grad():
        for p in (layer.keys, layer.values):
            p.normal_()
    x = torch.randn(3, 21, 48).bfloat16()
    out = {}
    for mode in ("fp32", "native"):
        monkeypatch.setenv("MORAM_CPU_LOWP", mode)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        calls = []
        real = base_road._Fp32Linear.apply
        monkeypatch.setattr(base_road._Fp32Linear, "apply", lambda *a: calls.append(1) or real(*a))
        y = layer(xi)
        y.float().square().sum().backward()
        assert calls == ([1] if mode == "fp32" else [])
        out[mode] = (y.detach(), xi.grad, layer.keys.grad, layer.values.grad)
    bound = REL_ATOL[torch.bfloat16]
    for a, b, what in zip(out["fp32"], out["native"], ("y", "gx", "keys.grad", "values.grad")):
        assert max_rel_err(a, b) <= bound, what


def test_the_adapter_adds_in_place_only_into_what_the_layer_owns():
    """MoRAMLinear adds the adapter's output into the base layer's result in place only
    when that result is new and held by nothing else: a base module that returns a tensor
    it keeps (a cache) must find it unchanged, and a plain nn.Linear's result gives the
    same output and gradients as the out-of-place sum."""
    torch.manual_seed(0)

    class Cached(nn.Linear):
        cache = None

        def forward(self, x):
            if self.cache is None:
                self.cache = super().forward(x)
            return self.cache

    lin = nn.Linear(12, 10)
    cached = Cached(12, 10)
    cached.load_state_dict(lin.state_dict())
    layer = mk.MoRAMLinear(cached, r=4, k=2, tau=0.3)
    layer.add_task()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = layer(x)
        kept = layer.base_layer.cache.clone()
        y2 = layer(x)
    assert torch.equal(layer.base_layer.cache, kept) and torch.equal(y, y2)
    assert not torch.equal(y, kept)          # the adapter did add something

    plain = mk.MoRAMLinear(lin, r=4, k=2, tau=0.3)
    plain.add_task()
    with torch.no_grad():
        plain.keys.copy_(layer.keys)
        plain.values.copy_(layer.values)
    xa = x.clone().requires_grad_(True)
    ya = plain(xa)
    ya.square().sum().backward()
    xb = x.clone().requires_grad_(True)
    d = mk.moram(xb, plain.keys, plain.values, k=2, tau=0.3, delta=0.0, eps=plain.eps,
                 value_scale=plain.scaling)
    yb = lin(xb) + d
    torch.testing.assert_close(ya, yb)
    gk = plain.keys.grad.clone()
    plain.zero_grad()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(gk, plain.keys.grad)
