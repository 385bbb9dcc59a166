"""Presets of the main job: ``python -m benchmarks --preset NAME [its options]``.

A preset is a focused measurement with its own options and its own table, run through the
main job's command line. Adding one is one module in this folder with a
``main(argv, prog) -> int`` (``prog`` names the command in its help) and one row in
``PRESETS`` below; the module is imported only when its preset runs.
``python -m benchmarks --preset NAME --help`` lists its options.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    module: str          # benchmarks.presets.<module>, with main(argv) -> int
    summary: str         # one line for ``python -m benchmarks --help``


PRESETS: dict[str, Preset] = {
    "cpu-goals": Preset("cpu_goals", "the C++ cpu backend against its goals (forward, train step, memory, "
                                     "saved for backward) at T=2048, d=1024, N=4096, k=16"),
    "bank-parallel": Preset("bank_parallel", "the frozen bank sharded over P = 1, 2, 4 gloo processes: per-rank "
                                             "compute, bytes per call, and the NVLink / Ethernet model "
                                             "against all-gathering the bank"),
}


def run(name: str, argv: list[str]) -> int:
    """Run preset ``name`` with its own arguments ``argv``."""
    if name not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    mod = importlib.import_module(f"{__name__}.{PRESETS[name].module}")
    return mod.main(argv, prog=f"python -m benchmarks --preset {name}")
