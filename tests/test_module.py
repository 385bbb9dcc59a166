"""MoRAMLinear: the lifecycle, scaling, dropout, threshold, state_dict, gradients."""

import math

import pytest
import torch
from helpers import assert_close, make_inputs, oracle
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import moram_kernels as mk

BACKENDS = mk.available_backends()


def _layer(d_in=16, d_out=12, tasks=2, r=4, k=3, alpha=8.0, **kw):
    torch.manual_seed(0)
    layer = mk.MoRAMLinear(nn.Linear(d_in, d_out), r=r, k=k, tau=0.1, alpha=alpha, **kw)
    for _ in range(tasks):
        layer.add_task()
        with torch.no_grad():
            layer.values.normal_()
    return layer


def _as_oracle(layer, x, delta):
    """The layer's delta as the authors compute it: concatenate, dense."""
    keys = torch.cat([layer.frozen_keys, layer.keys]).double()
    values = torch.cat([layer.frozen_values, layer.values]).double()
    vs = torch.cat([torch.ones(layer.frozen_keys.shape[0]),
                    torch.full((layer.keys.shape[0],), layer.scaling)]).double()
    return oracle(x, keys, values, k=layer.k, tau=layer.tau, delta=delta, value_scale=vs)


def test_new_layer_is_exactly_the_base():
    base = nn.Linear(16, 12)
    layer = mk.MoRAMLinear(base)
    x = torch.randn(3, 5, 16)
    assert layer.num_atoms == 0 and layer.num_trainable_atoms == 0
    assert torch.equal(layer(x), base(x))
    assert layer.base_layer is base and not any(p.requires_grad for p in base.parameters())


def test_add_task_freezes_and_appends_fresh_atoms():
    layer = _layer(tasks=1, r=4)
    old_keys, old_values = layer.keys.detach().clone(), layer.values.detach().clone()
    x = torch.randn(7, 16)
    before = layer(x)
    layer.add_task()
    assert layer.num_atoms == 8 and layer.num_trainable_atoms == 4 and layer.num_tasks == 2
    assert torch.equal(layer.frozen_keys, old_keys)
    assert torch.allclose(layer.frozen_values, old_values * layer.scaling)   # scale baked in
    assert (layer.values == 0).all()
    bound = 1 / math.sqrt(16)        # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert layer.keys.abs().max() <= bound and layer.keys.std() > 0.3 * bound
    # Fresh values are zero, but the new keys join the norm and the top-K, so the output
    # moves; only the first task (from an empty bank) leaves it exactly as it was.
    assert not torch.allclose(layer(x), before)
    first = mk.MoRAMLinear(nn.Linear(16, 12))
    y0 = first(x)
    first.add_task()
    assert torch.equal(first(x), y0)
    assert not layer.frozen_keys.requires_grad and layer.keys.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_authors_layer(backend, mode):
    layer = _layer(tasks=3, backend=backend)
    layer.train(mode == "train")
    x, _, _ = make_inputs(20, 16, 12, 4, k=3)
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
    want = _as_oracle(layer, x, delta=0.0 if mode == "train" else layer.delta)
    assert_close(got, want, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_reach_trainable_atoms(backend):
    layer = _layer(tasks=3, backend=backend)
    x = torch.randn(25, 16, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert not layer.frozen_keys.requires_grad and layer.frozen_keys.grad is None
    # against autograd through the authors' layer in float64
    keys = torch.cat([layer.frozen_keys, layer.keys.detach()]).double().requires_grad_()
    values = torch.cat([layer.frozen_values, layer.values.detach()]).double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    vs = torch.cat([torch.ones(8), torch.full((4,), layer.scaling)]).double()
    want = oracle(x64, keys, values, k=3, tau=0.1, value_scale=vs) + layer.base_layer(x64.float()).double()
    gx, gk, gv = torch.autograd.grad(want, (x64, keys, values), gy.double())
    assert_close(layer.keys.grad, gk[8:], dtype=torch.float32, what="trainable keys")
    assert_close(layer.values.grad, gv[8:], dtype=torch.float32, what="trainable values")
    assert_close(x.grad, gx, dtype=torch.float32, what="x")


def test_cached_gram_gives_the_same_gradients():
    """Frozen bank at least d_in atoms: the layer passes its cached Gram to the backward."""
    layer = _layer(d_in=8, tasks=4, r=4)           # 12 frozen >= d_in = 8
    assert layer._frozen_gram() is not None
    x = torch.randn(10, 8, requires_grad=True)
    layer(x).square().sum().backward()
    g_cached = (x.grad.clone(), layer.keys.grad.clone())
    x.grad = None
    layer.keys.grad = None
    layer._frozen_gram = lambda *a: None           # force the no-Gram path
    layer(x).square().sum().backward()
    torch.testing.assert_close(x.grad, g_cached[0])
    torch.testing.assert_close(layer.keys.grad, g_cached[1])


def test_dropout_is_on_the_adapter_path_only():
    layer = _layer(tasks=2, dropout=0.5)
    x = torch.randn(50, 16)
    layer.train()
    torch.manual_seed(1)
    y_train = layer(x)
    torch.manual_seed(1)
    mask_x = nn.functional.dropout(x, 0.5, True)
    want = layer.base_layer(x).double() + _as_oracle(layer, mask_x, delta=0.0)
    assert_close(y_train, want, dtype=torch.float32)


def test_threshold_only_in_eval():
    layer = _layer(tasks=2, delta=0.3)
    x = torch.randn(40, 16)
    layer.train()
    train = layer(x).detach()
    layer.eval()
    evald = layer(x).detach()
    assert not torch.allclose(train, evald)
    assert_close(evald - layer.base_layer(x), _as_oracle(layer, x, delta=0.3), dtype=torch.float32)


def test_forward_never_copies_the_bank():
    """At module level, no op produces a tensor as large as the bank (no per-call concat)."""
    layer = _layer(d_in=64, d_out=64, tasks=8, r=16)          # N = 128, N*d = 8192
    x = torch.randn(4, 64)
    sizes = []

    class Record(TorchDispatchMode):
        depth = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "moram_kernels" not in str(func):       # the op's inside is the backend's business
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        sizes.append((str(func), t.numel()))
            return out

    with Record():
        layer(x)
    assert sizes, "the recorder saw nothing"
    big = [s for s in sizes if s[1] >= layer.num_atoms * 64]
    assert not big, f"per-call copies of the bank: {big}"


def test_state_dict_round_trip_and_repr():
    layer = _layer(tasks=3)
    fresh = mk.MoRAMLinear(nn.Linear(16, 12), r=4, k=3, tau=0.1, alpha=8.0)
    fresh.base_layer.load_state_dict(layer.base_layer.state_dict())
    fresh.load_state_dict(layer.state_dict())
    assert fresh.num_atoms == 12 and fresh.num_tasks == 3
    x = torch.randn(6, 16)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) >= {"base_layer.weight", "base_layer.bias", "frozen_keys", "keys"}
    r = repr(layer)
    assert "N=12" in r and "r=4" in r and "k=3" in r and "tau=0.1" in r
    with pytest.raises(RuntimeError):
        mk.MoRAMLinear(nn.Linear(15, 12)).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("kw,match", [(dict(r=0), "r must"), (dict(k=0), "k must"),
                                      (dict(tau=0), "tau"), (dict(dropout=1.0), "dropout"),
                                      (dict(alpha=-1.0), "alpha")])
def test_constructor_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mk.MoRAMLinear(nn.Linear(4, 4), **kw)
    with pytest.raises(TypeError, match="nn.Linear"):
        mk.MoRAMLinear(nn.Conv1d(4, 4, 1))


def test_wrong_d_in_is_a_clear_error():
    layer = _layer()
    with pytest.raises((ValueError, RuntimeError)):
        layer(torch.randn(3, 15))
