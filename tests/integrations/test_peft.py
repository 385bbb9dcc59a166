"""MoRAM as a stock PEFT method: get_peft_model, tasks, training, save_pretrained, and the
reload in a FRESH process (PeftModel.from_pretrained, low_cpu_mem_usage, AutoPeftModel,
transformers' load_adapter), with several tasks and two adapters; unload and merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moram_kernels as mk

peft = pytest.importorskip("peft", reason="needs peft (pip install peft==0.21.2)")
tf = pytest.importorskip("transformers", reason="needs transformers")
from moram_kernels.integrations.peft import MoRAMPeftConfig, MoRAMPeftLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(target_modules=["query", "value"], r=3, k=2, tau=0.3, alpha=6.0)


def _base(path: Path):
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=24)
        tf.BertModel(cfg).save_pretrained(path)
    return tf.BertModel.from_pretrained(path).eval()


def _train_tasks(pm, ids, tasks):
    """``tasks`` tasks of 3 AdamW steps each, on the active adapter (whose first task exists
    from its creation); one optimiser, reset by mk.add_task between tasks."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    pm.train()
    for t in range(tasks):
        for _ in range(3):
            opt.zero_grad()
            pm(input_ids=ids).last_hidden_state.pow(2).mean().backward()
            opt.step()
        if t < tasks - 1:
            mk.add_task(pm, optimizer=opt)
    pm.eval()


_LOADER = r"""
import sys, torch, peft, transformers
import moram_kernels.integrations.peft
d = sys.argv[1]
ids = torch.load(d + "/ids.pt")
def base():
    return transformers.BertModel.from_pretrained(d + "/base").eval()
def out(m):
    with torch.no_grad():
        return m(input_ids=ids).last_hidden_state
res = {}
pm = peft.PeftModel.from_pretrained(base(), d + "/ad")
res["a"] = out(pm)
pm.load_adapter(d + "/ad/b", adapter_name="b")
pm.set_adapter("b")
res["b"] = out(pm)
res["sizes_b"] = [m.num_atoms for m in pm.modules() if type(m).__name__ == "MoRAMPeftLayer"]
res["unload"] = out(pm.unload())
res["a_low_mem"] = out(peft.PeftModel.from_pretrained(base(), d + "/ad", low_cpu_mem_usage=True))
res["a_auto"] = out(peft.AutoPeftModel.from_pretrained(d + "/ad"))
m = base()
m.load_adapter(d + "/ad")
res["a_transformers"] = out(m)
torch.save(res, d + "/res.pt")
"""


def _fresh(code, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=240)


def test_peft_round_trip_in_a_fresh_process(tmp_path):
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    base_out = _base(tmp_path / "base")(input_ids=ids).last_hidden_state.detach()
    pm = peft.get_peft_model(_base(tmp_path / "base"), MoRAMPeftConfig(**CFG))
    torch.manual_seed(1)
    _train_tasks(pm, ids, tasks=3)
    pm.add_adapter("b", MoRAMPeftConfig(**{**CFG, "r": 2, "alpha": None}))
    pm.set_adapter("b")
    _train_tasks(pm, ids, tasks=2)          # mk.add_task only touches the active adapter
    layers = [m for m in pm.modules() if isinstance(m, MoRAMPeftLayer)]
    assert len(layers) == 4
    assert [m.moram_bank["default"].task_sizes.tolist() for m in layers] == [[3, 3, 3]] * 4
    assert [(m.num_atoms, m.num_trainable_atoms) for m in layers] == [(4, 2)] * 4
    with torch.no_grad():
        out_b = pm(input_ids=ids).last_hidden_state
        pm.set_adapter("default")
        out_a = pm(input_ids=ids).last_hidden_state
    assert (out_a - base_out).abs().max() > 1e-5 and (out_b - out_a).abs().max() > 1e-5
    pm.save_pretrained(tmp_path / "ad")

    proc = _fresh(_LOADER, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    for key in ("a", "a_low_mem", "a_auto", "a_transformers"):
        torch.testing.assert_close(res[key], out_a, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(res["b"], out_b, rtol=0, atol=0)
    assert res["sizes_b"] == [4] * 4
    torch.testing.assert_close(res["unload"], base_out, rtol=0, atol=0)


def test_method_unknown_without_the_import(tmp_path):
    """The module docstring quotes the error peft gives a process without the import."""
    from moram_kernels.integrations import peft as mkpeft

    error = "KeyError: 'MORAM'"
    assert f"``{error}``" in mkpeft.__doc__
    pm = peft.get_peft_model(_base(tmp_path / "base"), MoRAMPeftConfig(**CFG))
    pm.save_pretrained(tmp_path / "ad")
    code = ("import sys, peft, transformers\n"
            "b = transformers.BertModel.from_pretrained(sys.argv[1] + '/base')\n"
            "peft.PeftModel.from_pretrained(b, sys.argv[1] + '/ad')\n")
    proc = _fresh(code, tmp_path)
    assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]


def test_merge_raises_and_layer_reports_sizes(tmp_path):
    pm = peft.get_peft_model(_base(tmp_path / "base"), MoRAMPeftConfig(**CFG))
    layer = next(m for m in pm.modules() if isinstance(m, MoRAMPeftLayer))
    assert (layer.num_atoms, layer.num_trainable_atoms) == (3, 3)    # the first task
    layer.add_task()
    assert (layer.num_atoms, layer.num_trainable_atoms) == (6, 3)
    assert all(p.requires_grad == ("moram_" in n) for n, p in pm.named_parameters())
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    with pytest.raises(TypeError, match="target_modules"):
        MoRAMPeftConfig(target_modules=[])
    with pytest.raises(ValueError, match="r must be"):
        peft.get_peft_model(_base(tmp_path / "base"), MoRAMPeftConfig(**{**CFG, "r": 0}))


def test_a_bf16_peft_model_takes_the_base_layers_fp32_road(tmp_path, monkeypatch):
    """A bf16 PEFT model's MoRAM layers run their frozen base nn.Linear on the CPU's fp32
    road (moram_kernels/_base_road.py) when it is chosen, and give what torch's own bf16
    product gives within bf16 rounding, forward and backward."""
    from moram_kernels import _base_road
    pm = peft.get_peft_model(_base(tmp_path / "base"), MoRAMPeftConfig(**CFG)).to(torch.bfloat16)
    for m in pm.modules():
        if isinstance(m, MoRAMPeftLayer):
            with torch.no_grad():
                for bank in m.moram_bank.values():
                    bank.values.normal_()
    ids = torch.randint(0, 50, (2, 9))
    real = _base_road._Fp32Linear.apply
    out = {}
    for mode in ("fp32", "native"):
        monkeypatch.setenv("MORAM_CPU_LOWP", mode)
        calls = []
        monkeypatch.setattr(_base_road._Fp32Linear, "apply", lambda *a: calls.append(1) or real(*a))
        pm.zero_grad(set_to_none=True)
        h = pm(input_ids=ids).last_hidden_state
        h.float().square().mean().backward()
        grads = [p.grad.float() for n, p in pm.named_parameters() if p.requires_grad]
        out[mode] = (h.float(), grads, len(calls))
    assert out["fp32"][2] == 4 and out["native"][2] == 0     # query and value of 2 layers
    torch.testing.assert_close(out["fp32"][0], out["native"][0], rtol=0.05, atol=0.05)
    for a, b in zip(out["fp32"][1], out["native"][1]):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.05 * b.abs().max().item())
