"""Presets of the main job: ``python -m benchmarks --preset NAME [its options]``.

A preset is a focused run with its own options and its own output, started through the
main job's command line. Adding one is one module in this folder with a
``main(argv, prog) -> int`` (``prog`` names the command in its help) and one row in
``PRESETS`` below; the module is imported only when its preset runs, and this file imports
nothing heavy, so a preset may set environment variables (``TRITON_INTERPRET``) before
torch is loaded. ``python -m benchmarks --help`` lists the presets, one line each;
``python -m benchmarks --preset NAME --help`` lists a preset's options.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    module: str          # benchmarks.presets.<module>, with main(argv, prog) -> int
    summary: str         # one line for ``python -m benchmarks --help``


PRESETS: dict[str, Preset] = {
    "cpu-goals": Preset("cpu_goals", "the C++ cpu backend against its goals (forward, train step, memory, "
                                     "saved for backward) at T=2048, d=1024, N=4096, k=16"),
    "cpu-floor": Preset("cpu_floor", "every CPU goal in one interleaved run (one token vs the authors and the GEMV, "
                                     "the CLIP train step vs LoRA, fp32 and bf16 at large N), PASS/MISS each"),
    "bank-parallel": Preset("bank_parallel", "the frozen bank sharded over P = 1, 2, 4 gloo processes: per-rank "
                                             "compute, bytes per call, and the NVLink / Ethernet model "
                                             "against all-gathering the bank"),
    "sharded-checkpoint": Preset("sharded_checkpoint", "load_moram / save_moram of banks sharded over 8 gloo "
                                                       "processes: each rank's peak memory growth against "
                                                       "its share of the file"),
    "fsdp-bank-memory": Preset("fsdp_bank_memory", "bytes each FSDP2 rank holds (base and trainable shards, the "
                                                   "replicated frozen bank), task after task, on gloo processes"),
    "generation": Preset("generation", "ms per generated token of a small random Llama, bare and with MoRAM in "
                                       "q_proj / v_proj (needs transformers)"),
    "triton-variants": Preset("triton_variants", "every Triton kernel variant compiled for sm_90 and sm_80 without "
                                                 "a GPU: shared memory, registers, spills, programs per SM, waves"),
    "gpu-check": Preset("gpu_check", "the prepared check for a CUDA GPU: warm-up, parity, timings beside the cost "
                                     "model's predictions, the interpreter tests on CUDA (--dry-run: no GPU)"),
}


def listing() -> str:
    """The presets, one line each, for ``python -m benchmarks --help``."""
    return ("presets (python -m benchmarks --preset NAME [its options]; --preset NAME --help for them):\n"
            + "\n".join(f"  {name:17s} {p.summary}" for name, p in PRESETS.items()))


def split_preset(argv: list[str]) -> tuple[str | None, list[str]]:
    """(preset name or None, the other arguments) from ``--preset NAME`` / ``--preset=NAME``."""
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith("--preset="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def run(name: str, argv: list[str]) -> int:
    """Run preset ``name`` with its own arguments ``argv``."""
    if name not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    mod = importlib.import_module(f"{__name__}.{PRESETS[name].module}")
    rc = mod.main(argv, prog=f"python -m benchmarks --preset {name}")
    return 0 if rc is None else rc
