"""Two builds of the cpu backend side by side: the same forward calls timed in each, in
alternating processes, so that both see the same machine noise.

    python -m benchmarks.ab_builds --old /path/to/old/checkout [--new .] [--rounds 4] [--threads 1]
        [--shape 2048,4096,16,1024,16,bfloat16 ...]

Each tree must hold a built extension (``python setup.py build_ext --inplace``). A round
runs every shape once in an ``--old`` process and once in a ``--new`` one; each process
keeps the best of its repetitions, and the table keeps the best of the rounds. The default
shapes separate the forward's parts: ``d_in = 16`` makes the score GEMM small, so what is
timed is mostly the selection over ``T x N`` scores and the gather of ``K`` value rows of
``d_out`` (the parts that decide the ratio to the GEMM on a CPU whose GEMM is fast).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .hardware import cpu_isa, detect

DEFAULT_SHAPES = ["2048,4096,16,1024,16,float32", "2048,4096,16,1024,16,bfloat16",
                  "2048,4096,16,1024,16,float16", "2048,4096,16,16,64,float32",
                  "1576,160,768,768,16,float32", "1576,160,768,768,16,bfloat16"]

# run in the tree under test: its moram_kernels first on the path
_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import moram_kernels as mk
torch.set_num_threads(int(sys.argv[2]))
out = {}
for spec in sys.argv[3:]:
    t, n, d_in, d_out, k, dt = spec.split(",")
    t, n, d_in, d_out, k, dt = int(t), int(n), int(d_in), int(d_out), int(k), getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=g).to(dt)
    keys = (torch.randn(n, d_in, generator=g) / d_in ** 0.5).to(dt)
    values = (torch.randn(n, d_out, generator=g) * 0.02).to(dt)
    best = float("inf")
    reps = max(3, min(30, int(0.5 / max(1e-4, 2e-12 * t * n * (d_in + 8 * k)))))
    with torch.no_grad():
        mk.moram(x, keys, values, k=k, tau=0.01, backend="cpu")
        for _ in range(reps):
            t0 = time.perf_counter()
            mk.moram(x, keys, values, k=k, tau=0.01, backend="cpu")
            best = min(best, time.perf_counter() - t0)
    out[spec] = best
print(json.dumps(out))
"""


def _run(tree: str, threads: int, shapes: list[str]) -> dict[str, float]:
    p = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(tree), str(threads), *shapes],
                       capture_output=True, text=True, cwd=os.path.abspath(tree))
    if p.returncode:
        raise SystemExit(f"{tree}: the timing process failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_builds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the checkout to compare against (built in place)")
    ap.add_argument("--new", default=".", help="the checkout under test (default: this one)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (best of them is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process (1: steadiest)")
    ap.add_argument("--shape", action="append", default=None,
                    help="T,N,d_in,d_out,k,dtype (repeatable); default: " + " ".join(DEFAULT_SHAPES))
    args = ap.parse_args(argv)
    shapes = args.shape or DEFAULT_SHAPES
    for s in shapes:
        parts = s.split(",")
        if len(parts) != 6 or parts[5] not in ("float32", "bfloat16", "float16"):
            ap.error(f"--shape {s!r}: want T,N,d_in,d_out,k,dtype with dtype float32/bfloat16/float16")
    hw = detect(torch.device("cpu"))
    print(f"# cpu forward, two builds alternated ({hw['timestamp_utc']}): old {args.old}, new {args.new}")
    print(f"# CPU: {hw['cpu']}, {hw['cpu_cores']} cores, ISA: {cpu_isa()}; {args.threads} thread(s), "
          f"best of {args.rounds} rounds, load average {hw['load_avg_1min']}\n")
    best = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for name, tree in (("old", args.old), ("new", args.new)):
            for s, v in _run(tree, args.threads, shapes).items():
                best[name][s] = min(best[name].get(s, float("inf")), v)
    print("| T, N, d_in, d_out, k, dtype | old ms | new ms | new / old |")
    print("|---|---:|---:|---:|")
    for s in shapes:
        o, n = best["old"][s], best["new"][s]
        print(f"| {s.replace(',', ', ')} | {o * 1e3:.4g} | {n * 1e3:.4g} | {n / o:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
