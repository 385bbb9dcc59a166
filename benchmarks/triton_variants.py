"""Compile every Triton kernel variant for sm_90 and sm_80 without a GPU; print the table
(shared memory, registers and stack/spill bytes per thread, tensor-core and cp.async use).

    python benchmarks/triton_variants.py [--arch 90 80] [--jobs 2] [--filter scan] [--csv out.csv]

Exits non-zero if a variant fails to compile or needs more shared memory per block than
the architecture allows. Needs TRITON_INTERPRET unset (the interpreter has nothing to compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Max dynamic shared memory per block (opt-in), CUDA programming guide table 21:
# sm_90: 227 KB = 232,448 B; sm_80: 163 KB = 166,912 B.
SMEM_LIMIT = {90: 232_448, 80: 166_912}


def _compile(job):
    i, arch = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from moram_kernels.backends.triton.variants import all_variants
    v = all_variants()[i]
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(v.fn(), v.signature, v.constexprs, v.attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as e:  # reported in the table, and a failure of the run
        return dict(label=v.label, arch=arch, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}",
                    seconds=time.perf_counter() - t0)
    ptx = k.asm.get("ptx", "")
    regs, stack = _res_usage(k.asm.get("cubin"))
    return dict(label=v.label, arch=arch, ok=True, shared=int(k.metadata.shared),
                mma=("wgmma" in ptx) or ("mma.sync" in ptx), cp_async="cp.async" in ptx,
                regs=regs, stack=stack, seconds=time.perf_counter() - t0)


def _res_usage(cubin):
    """(registers per thread, stack bytes: > 0 means spills) from the cuobjdump that ships
    with Triton; (-1, -1) when it is not there."""
    import re
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def run(archs=(90, 80), jobs=2, filt=None):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    from moram_kernels.backends.triton.variants import all_variants
    vs = all_variants()
    todo = [(i, a) for a in archs for i, v in enumerate(vs) if not filt or filt in v.label]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_compile, todo))
    else:
        rows = [_compile(j) for j in todo]
    for r in rows:
        r["fits"] = r["ok"] and r["shared"] <= SMEM_LIMIT[r["arch"]]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--filter", default=None, help="only labels containing this")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(tuple(a.arch), a.jobs, a.filter)
    print(f"{'variant':40s} {'arch':>4s} {'shared B':>9s} {'limit B':>8s} {'regs':>4s} {'stack':>5s} "
          f"{'mma':>3s} {'cp.async':>8s} {'s':>5s}")
    for r in rows:
        if r["ok"]:
            print(f"{r['label']:40s} {r['arch']:>4d} {r['shared']:>9d} {SMEM_LIMIT[r['arch']]:>8d} "
                  f"{r['regs']:>4d} {r['stack']:>5d} {'y' if r['mma'] else 'n':>3s} "
                  f"{'y' if r['cp_async'] else 'n':>8s} {r['seconds']:5.1f}")
        else:
            print(f"{r['label']:44s} {r['arch']:>4d} FAILED {r['error']}")
    bad = [r for r in rows if not r["fits"]]
    print(f"{len(rows)} compiles, {len(bad)} failed or over the shared-memory limit, "
          f"{time.perf_counter() - t0:.0f} s")
    if a.csv:
        import csv
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
