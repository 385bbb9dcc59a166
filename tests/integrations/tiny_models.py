"""Models the integration tests share: tiny LLaMA, Qwen2, GPT-2 (Conv1D) and CLIP models
built from transformers configs, and tools to randomise atoms and prove a model untouched.
Tests that need transformers skip, saying which, when it is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moram_kernels as mk
from moram_kernels import integrations as mki

ROOT = Path(__file__).resolve().parents[2]


def _need_transformers():
    return pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")


# ---- models ---------------------------------------------------------------------------------

def _tiny_decoder(family: str, seed: int):
    """A 2-layer, width-32 decoder of a transformers family ("Llama", "Qwen2")."""
    tf = _need_transformers()
    torch.manual_seed(seed)
    cfg = getattr(tf, f"{family}Config")(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                         max_position_embeddings=64)
    return getattr(tf, f"{family}Model")(cfg).eval()


def tiny_llama():
    return _tiny_decoder("Llama", 0)


def tiny_qwen():
    return _tiny_decoder("Qwen2", 1)


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


# ---- a trained injected model -----------------------------------------------------------------

CFG = dict(target_modules=["q_proj", "v_proj"], r=4, k=3, tau=0.05, delta=0.1, alpha=8.0)


def trained(build=tiny_llama, tasks=2, cfg=CFG, seed=0):
    model = build()
    mk.inject(model, mk.MoRAMConfig(**cfg))
    for t in range(tasks):
        mk.add_task(model)
        randomise_atoms(model, seed + t)
    return model

