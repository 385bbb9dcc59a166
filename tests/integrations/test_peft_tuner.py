"""The stock-PEFT tuner as a LoRA user drives it, in one process on a tiny LLaMA: trainable
on creation, tasks, several adapters (set / disable / delete), mixed-adapter batches in
forward and generate, bank sizes per adapter on every save, round trips with the right
requires_grad, and a clear refusal for what MoRAM cannot do. (test_peft.py reloads in a
fresh process.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moram_kernels as mk

peft = pytest.importorskip("peft", reason="needs peft (pip install peft==0.21.2)")
tf = pytest.importorskip("transformers", reason="needs transformers")
ROOT = Path(__file__).resolve().parents[2]

from moram_kernels.integrations.peft import (  # noqa: E402
    BASE, MoRAMPeftConfig, MoRAMPeftLayer)

CFG = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, k=3, tau=0.3,
           alpha=8.0)
R = CFG["r"]
WRAPPED = 2                      # q_proj and v_proj of the one decoder layer


def _llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(cfg).eval()


def _ids(rows=5, length=6, seed=1):
    return torch.randint(3, 61, (rows, length), generator=torch.Generator().manual_seed(seed))


def _layers(pm):
    return [m for m in pm.modules() if isinstance(m, MoRAMPeftLayer)]


def _randomise(pm, seed=2):
    """Non-zero values in every adapter's atoms, as if trained, so adapters differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _layers(pm):
            for bank in m.moram_bank.values():
                bank.values.copy_(torch.randn(bank.values.shape, generator=g) * 3)
                bank.frozen_values.copy_(torch.randn(bank.frozen_values.shape, generator=g) * 3)


def _logits(pm, ids, **kw):
    with torch.no_grad():
        return pm(input_ids=ids, **kw).logits


def _three_adapters():
    """default (2 tasks), b (1 task), c (r=2): one config object shared by default and b."""
    shared = MoRAMPeftConfig(**CFG)
    pm = peft.get_peft_model(_llama(), shared)
    mk.add_task(pm)
    pm.add_adapter("b", shared)
    pm.add_adapter("c", MoRAMPeftConfig(**{**CFG, "r": 2}))
    _randomise(pm)
    return pm.eval(), shared


def _alone(pm, name, fn):
    """fn() with only adapter ``name`` on (``BASE``: adapters disabled)."""
    if name == BASE:
        with pm.disable_adapter():
            return fn()
    before = pm.active_adapter
    pm.set_adapter(name)
    try:
        return fn()
    finally:
        pm.set_adapter(before)


# ---- tasks ------------------------------------------------------------------------------------

def test_an_adapter_trains_as_soon_as_get_peft_model_returns():
    ids = _ids(2)
    base_logits = _logits(_llama(), ids)
    pm = peft.get_peft_model(_llama(), MoRAMPeftConfig(**CFG))
    layers = _layers(pm)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(layers) == WRAPPED and len(trainable) == 2 * len(layers)
    assert all(".moram_bank.default." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(
        R * (m.in_features + m.out_features) for m in layers)
    assert [m.moram_bank["default"].task_sizes.tolist() for m in layers] == [[R]] * WRAPPED
    torch.testing.assert_close(_logits(pm, ids), base_logits, rtol=0, atol=0)   # values start at 0

    opt = torch.optim.AdamW(trainable.values(), lr=0.05)     # built right away, as for LoRA
    pm.train()
    for _ in range(2):
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    after_task_1 = _logits(pm.eval(), ids)
    assert (after_task_1 - base_logits).abs().max() > 1e-4

    mk.add_task(pm, optimizer=opt)                            # the next task, same parameters
    assert [m.moram_bank["default"].task_sizes.tolist() for m in layers] == [[R, R]] * WRAPPED
    assert {n: p for n, p in pm.named_parameters() if p.requires_grad} == trainable
    pm.train()
    opt.zero_grad()
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert (_logits(pm.eval(), ids) - after_task_1).abs().max() > 1e-5

    pm.add_adapter("b", MoRAMPeftConfig(**CFG))               # a second adapter: its first task,
    assert [m.moram_bank["b"].task_sizes.tolist() for m in layers] == [[R]] * WRAPPED
    assert not any(".b." in n for n, p in pm.named_parameters() if p.requires_grad)   # inactive
    pm.set_adapter("b")
    assert {n.split(".moram_bank.")[1].split(".")[0]
            for n, p in pm.named_parameters() if p.requires_grad} == {"b"}


# ---- several adapters ------------------------------------------------------------------------

def test_set_disable_and_delete_adapters():
    pm, _ = _three_adapters()
    ids = _ids(2)
    base_logits = _logits(_llama(), ids)
    out = {a: _alone(pm, a, lambda: _logits(pm, ids)) for a in ("default", "b", "c")}
    for a, b in (("default", "b"), ("b", "c"), ("default", "c")):
        assert (out[a] - out[b]).abs().max() > 1e-3, (a, b)
    with pm.disable_adapter():
        torch.testing.assert_close(_logits(pm, ids), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(_logits(pm, ids), out["default"], rtol=0, atol=0)
    assert {s.name: s.available_adapters for s in pm.get_layer_status()}    # PEFT's report works

    pm.delete_adapter("b")
    assert set(pm.peft_config) == {"default", "c"}
    assert all(set(m.moram_bank) == {"default", "c"} for m in _layers(pm))
    pm.set_adapter("c")
    torch.testing.assert_close(_logits(pm, ids), out["c"], rtol=0, atol=0)
    pm.unload()
    torch.testing.assert_close(_logits(pm.get_base_model(), ids), base_logits, rtol=0, atol=0)


# ---- mixed-adapter batches -------------------------------------------------------------------

NAMES = ["c", BASE, "default", "b", "c", "default"]


def test_mixed_batch_of_three_adapters_and_base_equals_row_by_row():
    pm, _ = _three_adapters()
    ids = _ids(len(NAMES))
    rows = {a: _alone(pm, a, lambda: _logits(pm, ids)) for a in set(NAMES)}
    expected = torch.stack([rows[a][i] for i, a in enumerate(NAMES)])

    calls = []                     # (adapter, rows) of every bank call
    hooks = [bank.register_forward_hook(lambda mod, args, out, a=a: calls.append((a, args[0].shape[0])))
             for m in _layers(pm) for a, bank in m.moram_bank.items()]
    mixed = _logits(pm, ids, adapter_names=NAMES)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
    # one call per adapter per layer, on that adapter's rows only
    assert sorted(calls) == sorted([("default", 2), ("b", 1), ("c", 2)] * len(_layers(pm)))
    # the active adapter is untouched: without adapter_names every row gets it
    torch.testing.assert_close(_logits(pm, ids), rows["default"], rtol=0, atol=0)


def _generate(pm, ids, **kw):
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                          min_new_tokens=3, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("beams", [1, 2])
def test_mixed_batch_generate_matches_each_row_alone(beams):
    pm, _ = _three_adapters()
    names = NAMES[:3] if beams > 1 else NAMES[:4]
    ids = _ids(len(names))
    mixed = _generate(pm, ids, adapter_names=names, num_beams=beams)
    for i, a in enumerate(names):
        alone = _alone(pm, a, lambda: _generate(pm, ids[i:i + 1], num_beams=beams))
        assert mixed[i].tolist() == alone[0].tolist(), (i, a)
    assert len({tuple(t) for t in mixed.tolist()}) > 2        # the adapters do differ


def test_mixed_batch_refuses_what_it_cannot_do():
    pm, _ = _three_adapters()
    ids = _ids(3)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\].*'b', 'c', 'default'"):
        _logits(pm, ids, adapter_names=["b", "nope", BASE])
    with pytest.raises(ValueError, match="names 2 rows but this layer's input has 3"):
        _logits(pm, ids, adapter_names=["b", "c"])
    with pytest.raises(TypeError, match="list of adapter names"):
        _logits(pm, ids, adapter_names="b")
    pm.train()
    with pytest.raises(ValueError, match=r"for inference; call model.eval\(\)"):
        _logits(pm, ids, adapter_names=["b", "c", "c"])
    pm.eval()
    assert not any(m._forward_pre_hooks for m in _layers(pm))   # no hook left behind


# ---- saving and loading ----------------------------------------------------------------------

def _json_sizes(path):
    return {n: s["task_sizes"] for n, s in json.loads(path.read_text())["bank_sizes"].items()}


def test_each_adapter_saves_its_own_bank_sizes_on_every_save(tmp_path):
    pm, shared = _three_adapters()
    ids = _ids(2)
    pm.save_pretrained(tmp_path / "ad")
    sizes = {"default": [R, R], "b": [R], "c": [2]}
    for a, sub in (("default", ""), ("b", "b"), ("c", "c")):
        got = _json_sizes(tmp_path / "ad" / sub / "adapter_config.json")
        assert len(got) == WRAPPED and set(map(tuple, got.values())) == {tuple(sizes[a])}, a
    assert shared.bank_sizes == {}              # the caller's object is never changed
    assert pm.peft_config["default"] is not pm.peft_config["b"]

    pm.set_adapter("b")
    mk.add_task(pm)                             # b: a second task; saved again, refreshed
    _randomise(pm, seed=5)
    pm.save_pretrained(tmp_path / "ad")
    assert set(map(tuple, _json_sizes(tmp_path / "ad/b/adapter_config.json").values())) == {(R, R)}
    assert all(s["task_sizes"] == [R, R] for s in pm.peft_config["b"].bank_sizes.values())
    assert all(s["task_sizes"] == [R, R] for s in pm.peft_config["default"].bank_sizes.values())

    # reload every adapter and compare, bit for bit
    want = {a: _alone(pm, a, lambda: _logits(pm, ids)) for a in ("default", "b", "c")}
    back = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ad")
    back.load_adapter(tmp_path / "ad/b", adapter_name="b")
    back.load_adapter(tmp_path / "ad/c", adapter_name="c")
    for a in want:
        torch.testing.assert_close(_alone(back, a, lambda: _logits(back, ids)), want[a],
                                   rtol=0, atol=0, msg=lambda m: f"{a}: {m}")
        assert [m.moram_bank[a].task_sizes.tolist() for m in _layers(back)] == \
            [m.moram_bank[a].task_sizes.tolist() for m in _layers(pm)]


def test_requires_grad_after_loading_and_training_goes_on(tmp_path):
    pm = peft.get_peft_model(_llama(), MoRAMPeftConfig(**CFG))
    mk.add_task(pm)
    _randomise(pm)
    pm.save_pretrained(tmp_path / "ad")
    ids = _ids(2)
    saved = _logits(pm.eval(), ids)

    frozen = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ad")
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(_logits(frozen, ids), saved, rtol=0, atol=0)

    pm = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ad", is_trainable=True)
    trainable = sorted(n.rsplit(".", 1)[1] for n, p in pm.named_parameters() if p.requires_grad)
    assert trainable == ["keys"] * WRAPPED + ["values"] * WRAPPED       # the current task's atoms
    assert [m.moram_bank["default"].task_sizes.tolist() for m in _layers(pm)] == [[R, R]] * WRAPPED
    torch.testing.assert_close(_logits(pm.eval(), ids), saved, rtol=0, atol=0)
    mk.add_task(pm)                             # loading started no task; this one is the 3rd
    assert [m.moram_bank["default"].task_sizes.tolist() for m in _layers(pm)] == [[R, R, R]] * WRAPPED
    pm.save_pretrained(tmp_path / "ad")
    assert set(map(tuple, _json_sizes(tmp_path / "ad/adapter_config.json").values())) == {(R, R, R)}


# ---- what MoRAM cannot do --------------------------------------------------------------------

_REFUSALS = [
    (lambda pm: pm.merge_and_unload(), "cannot be merged"),
    (lambda pm: pm.merge_adapter(), "cannot be merged"),
    (lambda pm: pm.unmerge_adapter(), "cannot be merged"),
    (lambda pm: pm.base_model._unload_and_optionally_merge(merge=True), "cannot be merged"),
    (lambda pm: pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix"),
     "cannot be combined into one weighted adapter"),
    (lambda pm: pm.subtract_mutated_init({}, "default"), "never changes the base weights"),
]


def test_what_moram_cannot_do_raises_clearly_and_changes_nothing():
    pm, _ = _three_adapters()
    ids = _ids(2)
    before = _logits(pm, ids)
    for call, match in _REFUSALS:
        with pytest.raises(ValueError, match=match) as e:
            call(pm)
        assert "MoRAM" in str(e.value), match
    assert set(pm.peft_config) == {"default", "b", "c"} and len(_layers(pm)) == WRAPPED
    torch.testing.assert_close(_logits(pm, ids), before, rtol=0, atol=0)


# ---- the task cycle of docs/training.md ------------------------------------------------------

def test_docs_peft_task_cycle(tmp_path, monkeypatch):
    """The PEFT task cycle of docs/training.md runs as written, with a tiny model, data and
    training loop."""
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    code = re.search(r"The whole cycle with stock PEFT.*?```python\n(.*?)```", text, re.S).group(1)
    tasks = [_ids(2, seed=s) for s in (10, 11, 12)]

    def train(model, opt, ids):
        model.train()
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.eval()

    monkeypatch.chdir(tmp_path)
    scope = {"make_base": _llama, "tasks": tasks, "train": train}
    exec(compile(code, "docs/training.md PEFT cycle", "exec"), scope)
    model, loaded = scope["model"], scope["loaded"]

    sizes = [m.moram_bank["default"].task_sizes.tolist() for m in _layers(loaded)]
    assert sizes == [[4, 4, 4]] * WRAPPED
    torch.testing.assert_close(_logits(loaded, tasks[0]), _logits(model, tasks[0]), rtol=0, atol=0)
