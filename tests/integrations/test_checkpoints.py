"""Importing the MoRAM authors' checkpoint layouts (``moram_kernels/integrations/checkpoints.py``)."""

from __future__ import annotations

import copy
import warnings
import math

import pytest
import torch
from torch import nn

import moram_kernels as mk
from moram_kernels import integrations as mki
from moram_kernels.backends.reference import moram_dense

from tiny_models import all_tensors, assert_same, ids, out, tiny_clip, tiny_llama


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
    # without lora_alpha the scale cannot be checked: the import warns, naming the one it takes
    unchecked = copy.deepcopy(ours)
    with pytest.warns(UserWarning, match=r"lora_alpha not given.* alpha / r = 2;"):
        mki.import_trace_state_dict(unchecked, sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
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
    # a second adapter with other tensors: the ambiguity is refused, and naming it imports
    # its tensors, not the default adapter's
    two = {**{k: v for k, v in sd.items()},
           **{k.replace(".default.", ".other."): 2 * v for k, v in sd.items() if "lora" in k}}
    with pytest.raises(ValueError, match="several adapters"):
        mki.import_trace_state_dict(fresh(), two)
    m = fresh()
    mki.import_trace_state_dict(m, two, adapter_name="other")
    want, default = fresh(), fresh()
    mki.import_trace_state_dict(want, {k: (2 * v if "lora" in k else v) for k, v in sd.items()})
    mki.import_trace_state_dict(default, sd)
    assert_same(all_tensors(m), all_tensors(want))
    with pytest.raises(AssertionError):
        assert_same(all_tensors(m), all_tensors(default))
