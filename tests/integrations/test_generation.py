"""Greedy decoding through MoRAM layers: a small ``LlamaForCausalLM`` built from a config,
MoRAM in ``q_proj``/``v_proj`` after several tasks with non-zero values. Decoding with the
KV cache (one token per call after the prompt) must give the same tokens as decoding
without it (the whole sequence every step), on every available backend."""

from __future__ import annotations

import os

import pytest
import torch

import moram_kernels as mk

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 4
# an interpreted backend (Triton on CPU) decodes two: each of its calls costs seconds
NEW_TOKENS_INTERPRETED = 2
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()


def _model():
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    mk.inject(model, mk.MoRAMConfig(target_modules=["q_proj", "v_proj"], r=4, k=4, tau=0.3,
                                    delta=0.2, alpha=8.0, eps=1e-8))
    with torch.no_grad():
        for _ in range(3):                 # 2 frozen tasks + the current one: N = 12 per layer
            mk.add_task(model)
            for m in model.modules():
                if isinstance(m, mk.MoRAMLinear):
                    m.values.normal_(0.0, 2.0)
    return model.eval()                    # eval: the threshold delta applies


def _greedy(model, prompt, use_cache, new):
    """The ``new`` tokens, and the logits each step chose them from ``[steps, B, vocab]``."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, use_cache=use_cache,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits)


@pytest.mark.parametrize("backend", mk.available_backends())
def test_greedy_generate_same_tokens_with_and_without_kv_cache(backend):
    torch.manual_seed(0)
    model = _model()
    prompt = torch.randint(3, 61, (2, 5))
    new = NEW_TOKENS_INTERPRETED if backend in INTERPRETED else NEW_TOKENS
    with torch.no_grad(), mk.use_backend(backend):
        with_cache, logits_cache = _greedy(model, prompt, True, new)
        without_cache, logits_full = _greedy(model, prompt, False, new)
        logits = model(prompt).logits
    assert with_cache.shape == (2, new)
    assert torch.equal(with_cache, without_cache), (with_cache, without_cache)
    # one token per call (cache) and the whole sequence per call compute the same logits
    torch.testing.assert_close(logits_cache, logits_full, rtol=1e-4, atol=1e-4 * logits_full.abs().max().item())

    # the adapters take part: with them removed, the same prompt gives other logits
    with torch.no_grad():
        bare = mk.remove(model)(prompt).logits
    assert (logits - bare).abs().max() > 1e-2


def test_generation_benchmark_row():
    """``python -m benchmarks --preset generation``: both models timed, the MoRAM one really adapted."""
    from benchmarks.presets import generation
    bare, adapted = generation.build(64, 1, 8, 4, 4, "cpu", torch.float32)
    layers = [m for m in adapted.modules() if isinstance(m, mk.MoRAMLinear)]
    assert len(layers) == 2 and all(m.num_atoms == 8 and m.values.abs().sum() > 0 for m in layers)
    assert not any(isinstance(m, mk.MoRAMLinear) for m in bare.modules())
    m = generation.measure(hidden=64, layers=1, n_atoms=8, k=4, r=4, prompt_len=4, new_tokens=2, reps=2)
    assert m["bare_ms"] > 0 and m["moram_ms"] > 0
    assert m["ratio"] == pytest.approx(m["moram_ms"] / m["bare_ms"])
    assert generation.row(m).startswith("| d=64, 1 layers, N=8, k=4 (cpu, float32) | ")
