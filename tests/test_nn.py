"""MoRAMLinear: the lifecycle, scaling, dropout, threshold, state_dict, gradients."""

import math
import warnings

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


def test_add_task_warns_when_the_task_was_never_trained():
    """A second add_task before any optimiser step freezes atoms whose values are still zero:
    they take top-K places and softmax weight and add nothing, so it warns (and still does
    what was asked). The first task, and a task whose values moved, do not warn."""
    layer = mk.MoRAMLinear(nn.Linear(16, 12), r=4, k=3, tau=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.add_task()                       # from an empty bank: nothing to freeze
    with pytest.warns(UserWarning, match="4 trainable atoms were never trained"):
        layer.add_task()
    assert layer.num_atoms == 8 and layer.num_tasks == 2     # frozen as asked
    opt = torch.optim.SGD([layer.keys, layer.values], lr=0.1)
    layer.train()
    layer(torch.randn(5, 16)).square().sum().backward()
    opt.step()
    assert layer.values.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.add_task()
    assert layer.num_atoms == 12


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


def _grads(layer, x, gram: bool):
    """(x.grad, keys.grad) of one backward, with the layer's cached Gram or without it."""
    x = x.detach().clone().requires_grad_()
    layer.keys.grad = None
    real = layer._frozen_gram
    if not gram:
        layer._frozen_gram = lambda *a: None       # force the no-Gram path
    try:
        layer(x).square().sum().backward()
    finally:
        layer._frozen_gram = real
    return x.grad, layer.keys.grad


def test_cached_gram_gives_the_same_gradients():
    """Frozen bank at least d_in atoms: the layer passes its cached Gram to the backward,
    and the cache follows every change of the bank: in-place edits, .to(dtype) and back,
    load_state_dict."""
    layer = _layer(d_in=8, tasks=4, r=4)           # 12 frozen >= d_in = 8
    assert layer._frozen_gram() is not None
    x = torch.randn(10, 8)

    def check(what):
        xs = x.to(layer.frozen_keys.dtype)
        for a, b in zip(_grads(layer, xs, True), _grads(layer, xs, False)):
            torch.testing.assert_close(a, b, msg=lambda m: f"after {what}: {m}")

    check("the first call")
    with torch.no_grad():
        layer.frozen_keys.mul_(-2.0)                # same tensor, same address, new version
    check("an in-place edit of frozen_keys")
    with torch.no_grad():
        layer.frozen_keys[3].copy_(torch.randn(8))
    check("an in-place edit of one frozen atom")
    layer.double()
    check(".double()")
    layer.float()                                  # may reuse the first bank's memory
    with torch.no_grad():
        layer.frozen_keys.add_(0.5)
    check(".double().float()")
    other = _layer(d_in=8, tasks=4, r=4)
    with torch.no_grad():
        other.frozen_keys.normal_()
    layer.load_state_dict(other.state_dict())
    check("load_state_dict")


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
                                      (dict(alpha=-1.0), "alpha"), (dict(delta=1.5), "delta must be <= 1")])
def test_constructor_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mk.MoRAMLinear(nn.Linear(4, 4), **kw)
    with pytest.raises(TypeError, match="nn.Linear"):
        mk.MoRAMLinear(nn.Conv1d(4, 4, 1))


def test_wrong_d_in_is_a_clear_error():
    """The layer's own message, before the base layer's shape error; with or without atoms."""
    for layer in (_layer(), mk.MoRAMLinear(nn.Linear(16, 12))):
        with pytest.raises(ValueError, match="x has d_in = 15, this layer takes 16"):
            layer(torch.randn(3, 15))


@pytest.mark.parametrize("tensor", ["keys", "values"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_add_task_refuses_a_non_finite_atom(tensor, bad):
    layer = _layer(tasks=2, r=4)
    with torch.no_grad():
        getattr(layer, tensor)[2, 5] = bad
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    params = (layer.keys, layer.values)
    with pytest.raises(ValueError, match=rf"atom\(s\) \[2\] have non-finite {tensor}"):
        layer.add_task()
    assert layer.keys is params[0] and layer.values is params[1]
    after = layer.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v) or (k == tensor and torch.equal(after[k].isnan(), v.isnan())), k


@pytest.mark.parametrize("case", ["nan-frozen-key", "inf-trainable-value", "overflows-fp16"])
def test_load_state_dict_refuses_non_finite_atoms(case):
    """A state dict with an inf/NaN atom (or an fp32 value beyond the fp16 layer's range)
    made every output non-finite after loading; now it is refused, the layer unchanged."""
    src = _layer(tasks=2, r=4)
    dst = _layer(tasks=2, r=4)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    name, row = {"nan-frozen-key": ("frozen_keys", 3), "inf-trainable-value": ("values", 1),
                 "overflows-fp16": ("frozen_values", 2)}[case]
    if case == "overflows-fp16":
        dst.half()
        sd[name][row, 0] = 1e6            # finite in fp32, inf in fp16
    else:
        sd[name][row, 0] = math.nan if case.startswith("nan") else math.inf
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"{name} has non-finite atom\(s\) \[{row}\]"):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_add_task_refuses_a_value_that_overflows_once_scaled():
    layer = _layer(tasks=1, r=4, alpha=64.0)       # scale alpha / r = 16
    layer.half()
    with torch.no_grad():
        layer.values[1, 0] = 60000.0                  # finite in fp16, inf once scaled
    n = layer.num_atoms
    with pytest.raises(ValueError, match=r"atom\(s\) \[1\] have non-finite values"):
        layer.add_task()
    assert layer.num_atoms == n and layer.frozen_keys.shape[0] == 0


def test_model_add_task_checks_every_layer_first():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    mk.inject(model, mk.MoRAMConfig(target_modules=["0", "2"], r=2, k=2))
    mk.add_task(model)
    with torch.no_grad():
        model[2].keys[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"layer 2: .*atom\(s\) \[1\]"):
        mk.add_task(model)
    assert model[0].num_tasks == 1 and model[2].num_tasks == 1     # neither layer moved on


@pytest.mark.parametrize("change", [dict(k=4), dict(tau=0.2), dict(alpha=4.0), dict(r=2), dict(eps=1e-8)])
def test_state_dict_with_other_hyper_parameters_is_refused(change):
    layer = _layer(tasks=2, r=4)
    kw = dict(r=4, k=3, tau=0.1, alpha=8.0)
    kw.update(change)
    other = mk.MoRAMLinear(nn.Linear(16, 12), **kw)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    name = next(iter(change))
    with pytest.raises(RuntimeError, match=rf"hyper-parameters.*'{name}'"):
        other.load_state_dict(layer.state_dict())
    after = other.state_dict()
    for k in ("frozen_keys", "frozen_values", "keys", "values", "task_sizes"):
        assert torch.equal(after[k], before[k]), k
    same = mk.MoRAMLinear(nn.Linear(16, 12), r=4, k=3, tau=0.1, alpha=8.0, delta=0.5, dropout=0.1)
    same.load_state_dict(layer.state_dict())       # delta and dropout may differ on purpose
    assert same.num_atoms == layer.num_atoms


def test_state_dict_hyper_parameters_survive_torch_save(tmp_path):
    layer = _layer(tasks=1, r=4)
    torch.save(layer.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt")
    with pytest.raises(RuntimeError, match="'k'"):
        mk.MoRAMLinear(nn.Linear(16, 12), r=4, k=5, tau=0.1, alpha=8.0).load_state_dict(sd)


@pytest.mark.parametrize("move", ["half", "to-bf16", "to-fp64", "to-device"])
def test_layer_moves(move):
    """.half(), .to(dtype), .to(device): every atom tensor follows, the forward runs in the
    new dtype against the float64 oracle, and gradients come back in it."""
    layer = _layer(tasks=3)
    x = torch.randn(9, 16)
    if move == "half":
        layer.half()
        dt = torch.float16
    elif move == "to-device":
        layer.to(torch.device("cpu"))
        assert layer.frozen_keys.device.type == "cpu"
        dt = torch.float32
    else:
        dt = {"to-bf16": torch.bfloat16, "to-fp64": torch.float64}[move]
        layer.to(dt)
    for name in ("frozen_keys", "frozen_values", "keys", "values"):
        assert getattr(layer, name).dtype == dt, name
    assert layer.task_sizes.dtype == torch.long and isinstance(layer.keys, nn.Parameter)
    xd = x.to(dt).requires_grad_()
    layer.train()
    y = layer(xd)
    assert y.dtype == dt
    want = layer.base_layer(xd.detach()).double() + _as_oracle(layer, xd.detach(), delta=0.0)
    tol = dt if dt != torch.float64 else torch.float32      # the base layer runs in dt
    lowp = None
    if dt in (torch.float16, torch.bfloat16):
        keys = torch.cat([layer.frozen_keys, layer.keys])
        values = torch.cat([layer.frozen_values, layer.values])
        vs = torch.cat([torch.ones(8), torch.full((4,), layer.scaling)]).to(dt)
        lowp = layer.base_layer(xd.detach()) + oracle(xd.detach(), keys, values, k=3, tau=0.1,
                                                       value_scale=vs, dtype=dt)
    assert_close(y, want, dtype=tol, pytorch_lowp=lowp)
    y.float().sum().backward()
    assert xd.grad.dtype == dt and layer.keys.grad.dtype == dt and layer.values.grad.dtype == dt
    assert torch.isfinite(layer.keys.grad).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_deterministic_mode_gives_bit_identical_gradients(backend):
    """torch.use_deterministic_algorithms(True): two runs, bit-identical output and gradients."""
    layer = _layer(d_in=48, d_out=40, tasks=6, r=16, backend=backend)     # 80 frozen >= d_in
    x = torch.randn(300, 48)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            xr = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xr)
            y.square().sum().backward()
            runs.append((y.detach(), xr.grad, layer.keys.grad.clone(), layer.values.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the bank's one writer and the values derived from it ------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if "cpu" in BACKENDS else []))
def test_changing_alpha_changes_the_output(backend):
    """``alpha`` set on a live layer: the next call scales the trainable values by the new
    ``alpha / r``, exactly as a layer built with it. "reference" takes the custom op; "cpu"
    in plain fp32 takes the eager C++ entry. Both read the layer's cached ``[r]`` scale."""
    layer = _layer(tasks=2, alpha=8.0, backend=backend).eval()
    x = torch.randn(9, 16)
    with torch.no_grad():
        before = layer(x)                       # fills the scale cache with 8 / 4
        layer.alpha = 2.0
        got = layer(x)
    fresh = mk.MoRAMLinear(layer.base_layer, r=4, k=3, tau=0.1, alpha=2.0, backend=backend).eval()
    fresh._set_bank(**{f: getattr(layer, f).detach().clone() for f in mk.MoRAMLinear.BANK_FIELDS})
    with torch.no_grad():
        want = fresh(x)
    assert not torch.allclose(want, before), "the setup is hollow: alpha does not matter here"
    assert torch.equal(got, want)


def _bank(layer):
    return {f: getattr(layer, f) for f in mk.MoRAMLinear.BANK_FIELDS}


@pytest.mark.parametrize("change,match", [
    (lambda L: dict(task_sizes=torch.tensor([4, 3])), "do not add up to the 8 atoms"),
    (lambda L: dict(task_sizes=torch.tensor([6, 2])), "the last task has 2 atoms but 4 are trainable"),
    (lambda L: dict(task_sizes=torch.tensor([4.0, 4.0])), "task_sizes must be a 1-D tensor of positive ints"),
    (lambda L: dict(task_sizes=torch.tensor([9, -1])), "task_sizes must be a 1-D tensor of positive ints"),
    (lambda L: dict(frozen_keys=torch.zeros(4, 15)), "keys have d_in 15 / 16"),
    (lambda L: dict(values=torch.zeros(4, 11)), "values have d_out 12 / 11"),
    (lambda L: dict(frozen_values=torch.zeros(3, 12)), "different numbers of atoms"),
    (lambda L: dict(keys=torch.zeros(4, 16, dtype=torch.long)), "keys must be a 2-D float tensor"),
    (lambda L: dict(keys=L.keys[:3], values=L.values[:3]), "do not add up"),
], ids=["sum", "last task", "float sizes", "negative size", "d_in", "d_out", "frozen rows",
        "int keys", "trainable rows"])
def test_set_bank_refuses_a_broken_invariant(change, match):
    """Every bank change goes through ``_set_bank``, which refuses an inconsistent bank with
    a clear ``ValueError`` and leaves the layer as it was (objects, values, caches)."""
    layer = _layer(tasks=2, r=4)
    layer._frozen_bank(torch.bfloat16)
    objects = _bank(layer)
    values = {f: t.detach().clone() for f, t in objects.items()}
    cached = layer._caches.bank.value
    with pytest.raises(ValueError, match=match):
        layer._set_bank(**change(layer))
    for f, t in _bank(layer).items():
        assert t is objects[f] and torch.equal(t, values[f]), f
    assert layer._caches.bank.value is cached


def test_set_bank_keeps_parameters_and_requires_grad():
    layer = _layer(tasks=2, r=4)
    layer.values.requires_grad_(False)
    keys = layer.keys
    layer._set_bank(keys=keys, values=torch.ones(4, 12))     # the current object: kept
    assert layer.keys is keys
    assert isinstance(layer.values, nn.Parameter) and not layer.values.requires_grad
    assert torch.equal(layer.values, torch.ones(4, 12))
    layer._set_bank(frozen_keys=layer.frozen_keys[:2], frozen_values=layer.frozen_values[:2],
                    keys=torch.zeros(0, 16), values=torch.zeros(0, 12), task_sizes=torch.tensor([2]))
    assert layer.num_atoms == 2 and layer.num_trainable_atoms == 0 and layer.keys.requires_grad
    assert not layer.values.requires_grad


def _fill_caches(layer):
    """Fill the Gram, cast-bank and scale caches (needs N_f >= d_in and alpha set)."""
    layer._frozen_gram()
    layer._frozen_bank(torch.bfloat16)
    layer._trainable_scale(layer.num_trainable_atoms, torch.zeros(1))
    assert all(getattr(layer._caches, c).value is not None for c in ("gram", "bank", "scale"))


def _assert_caches_empty(layer, after):
    for c in ("gram", "bank", "scale"):
        assert getattr(layer._caches, c).value is None, f"the {c} cache survived {after}"


def test_every_bank_change_drops_the_derived_caches():
    """add_task, load_state_dict (same shapes, other shapes) and ``_set_bank`` replace the
    bank: the Gram matrix, the cast bank and the scale are rebuilt from the new one. Copies
    start with empty caches."""
    layer = _layer(d_in=8, tasks=4, r=4)                   # 12 frozen >= d_in = 8
    other = _layer(d_in=8, tasks=4, r=4)
    with torch.no_grad():
        other.frozen_keys.normal_()
    bigger = _layer(d_in=8, tasks=5, r=4)
    steps = {
        "add_task": lambda: layer.add_task(),
        "load_state_dict (other shapes)": lambda: layer.load_state_dict(other.state_dict()),
        "load_state_dict (same shapes)": lambda: layer.load_state_dict(other.state_dict()),
        "load_state_dict (a bigger bank)": lambda: layer.load_state_dict(bigger.state_dict()),
        "_set_bank": lambda: layer._set_bank(values=torch.ones(4, 12)),
    }
    for what, step in steps.items():
        _fill_caches(layer)
        step()
        _assert_caches_empty(layer, what)
    _fill_caches(layer)
    import copy
    import pickle
    _assert_caches_empty(copy.deepcopy(layer), "copy.deepcopy")
    _assert_caches_empty(pickle.loads(pickle.dumps(layer)), "pickling")
    assert layer._caches.gram.value is not None        # the original keeps its own


def test_load_state_dict_refuses_an_inconsistent_bank():
    """A state dict whose task sizes do not match its atoms: refused, the layer unchanged."""
    layer = _layer(tasks=2, r=4)
    sd = layer.state_dict()
    sd["task_sizes"] = torch.tensor([4, 4, 4])
    target = _layer(tasks=1, r=4)
    before = {k: v.clone() for k, v in target.state_dict().items() if "base" not in k}
    with pytest.raises(RuntimeError, match="do not add up.*left unchanged"):
        target.load_state_dict(sd)
    for k, v in before.items():
        assert torch.equal(target.state_dict()[k], v), k


def test_a_new_tensor_at_the_old_address_is_not_taken_for_the_old_one():
    """The caches key on a tensor's address, version and shape, and hold a weak reference
    to it: a buffer replaced behind ``_set_bank``'s back (as ``.to()`` replaces buffers) by
    a new tensor at the same address, version and shape is still seen as new."""
    import numpy as np
    layer = _layer(d_in=8, tasks=4, r=4)                # 12 frozen >= d_in: a Gram is kept
    buf = np.ascontiguousarray(layer.frozen_keys.numpy())
    layer._set_bank(frozen_keys=torch.from_numpy(buf))
    old = layer._frozen_gram().clone()
    before = (layer.frozen_keys.data_ptr(), layer.frozen_keys._version)
    buf *= -3.0                                          # behind torch's version counter
    layer._buffers["frozen_keys"] = new = torch.from_numpy(buf)
    assert (new.data_ptr(), new._version) == before, "the setup is hollow"
    a = new.double()
    torch.testing.assert_close(layer._frozen_gram().double(), a.t() @ a)
    assert not torch.allclose(old.double(), a.t() @ a)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_an_evaluation_under_inference_mode_does_not_break_the_next_training_step(autocast):
    """The layer's caches (the trainable values' scale vector, and under autocast the
    frozen bank cast to bf16) filled during a torch.inference_mode() evaluation must not be
    inference tensors: the next training step saves them for backward. Its gradients equal
    those of a layer that never saw inference mode."""
    import contextlib

    def make():
        torch.manual_seed(0)
        layer = mk.MoRAMLinear(nn.Linear(16, 12), r=8, k=3, tau=0.3, alpha=4.0, backend="reference")
        for _ in range(3):
            layer.add_task()
            with torch.no_grad():
                layer.values.normal_()
        return layer

    def ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    x = torch.randn(5, 16)
    seen, fresh = make(), make()
    with torch.inference_mode(), ctx():
        seen.eval()
        seen(x)
    grads = []
    for layer in (seen, fresh):
        layer.train()
        xi = x.clone().requires_grad_(True)
        with ctx():
            y = layer(xi)
        y.float().square().sum().backward()
        grads.append((xi.grad, layer.keys.grad, layer.values.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
