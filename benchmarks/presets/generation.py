"""ms per generated token of a small Llama (built from a config, random weights), with and
without MoRAM in ``q_proj``/``v_proj``, timed in one run with the two models interleaved.

    python -m benchmarks --preset generation [--hidden 1024] [--layers 8] [--n 64] [--k 8] [--reps 7]

Greedy decoding with the KV cache, one token per call after the prompt: the row where the
per-call overhead of the adapter shows. Needs transformers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import moram_kernels as mk


def build(hidden: int, layers: int, n_atoms: int, k: int, r: int, device: str, dtype: torch.dtype, seed: int = 0):
    """``(bare, adapted)``: the same random Llama twice, the second with MoRAM layers holding
    ``n_atoms`` atoms each (``n_atoms / r`` tasks) with non-zero values."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    bare = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    adapted = copy.deepcopy(bare)
    mk.inject(adapted, mk.MoRAMConfig(target_modules=["q_proj", "v_proj"], r=r, k=k, tau=0.03, delta=0.2,
                                      alpha=2.0 * r, eps=1e-8))
    with torch.no_grad():
        for _ in range(max(1, n_atoms // r)):
            mk.add_task(adapted)
            for m in adapted.modules():
                if isinstance(m, mk.MoRAMLinear):
                    m.values.normal_(0.0, 0.02)
    return bare, adapted.eval()


def ms_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        sync()
    return (time.perf_counter() - t0) * 1e3 / new_tokens


def measure(hidden=1024, layers=8, n_atoms=64, k=8, r=8, prompt_len=16, new_tokens=32, reps=7,
            device="cpu", dtype=torch.float32) -> dict:
    """Medians and interquartile spreads of ms/token, bare and with MoRAM, interleaved."""
    bare, adapted = build(hidden, layers, n_atoms, k, r, device, dtype)
    prompt = torch.randint(3, 1024, (1, prompt_len), device=device)
    for m in (bare, adapted):                      # warm-up
        ms_per_token(m, prompt, 4)
    times: dict[str, list[float]] = {"bare": [], "moram": []}
    for _ in range(reps):
        times["bare"].append(ms_per_token(bare, prompt, new_tokens))
        times["moram"].append(ms_per_token(adapted, prompt, new_tokens))
    out = dict(hidden=hidden, layers=layers, N=n_atoms, k=k, device=device, dtype=str(dtype).replace("torch.", ""))
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[f"{name}_ms"], out[f"{name}_iqr_ms"] = statistics.median(ts), q[2] - q[0]
    out["ratio"] = out["moram_ms"] / out["bare_ms"]
    return out


def row(m: dict) -> str:
    spread = lambda name: 100 * m[f"{name}_iqr_ms"] / m[f"{name}_ms"]  # noqa: E731
    return (f"| d={m['hidden']}, {m['layers']} layers, N={m['N']}, k={m['k']} ({m['device']}, {m['dtype']}) | "
            f"{m['bare_ms']:.1f} ±{spread('bare'):.0f}% | {m['moram_ms']:.1f} ±{spread('moram'):.0f}% | "
            f"{m['ratio']:.2f}× |")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--n", type=int, default=64, help="atoms per MoRAM layer")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = measure(a.hidden, a.layers, a.n, a.k, a.r, new_tokens=a.new_tokens, reps=a.reps, device=a.device)
    print("| model | bare ms/token | with MoRAM ms/token | ratio |\n|---|---:|---:|---:|")
    print(row(m))
    return 0
