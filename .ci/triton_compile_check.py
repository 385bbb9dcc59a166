#!/usr/bin/env python
"""Compile-only check of the Triton kernels: no GPU needed.

Every kernel variant the launchers can emit (``moram_kernels.backends.triton.variants``)
is compiled ahead of time with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``,
sm_90 and sm_80 by default, and a table is printed: shared memory, registers and
stack/spill bytes per thread, tensor-core (``wgmma`` / ``mma.sync``) and ``cp.async`` use,
programs per SM on H100/H200, and the modelled waves at the ``gpu-check`` shape
(``benchmarks/cost_model.py``: ``GPU_CHECK``). It sits beside ``cuda_compile_check.py``,
which does the same for the CUDA kernels with nvcc.

Fails (exit 1) if a variant fails to compile, needs more shared memory per block than the
architecture allows, spills registers on sm_90 (stack > 0; the generic variant excepted,
which no aligned launch picks; sm_80 spills are shown, not enforced: the block configs are
tuned for Hopper), or fits fewer programs per SM than the grid plan assumes (``per_sm`` of
its scan config). Exit 2: ``TRITON_INTERPRET`` is set (the interpreter compiles nothing).

Programs per SM (sm_90: H100 and H200 alike, 132 SMs on the SXM parts): the minimum of
65,536 registers / (registers per thread rounded up to 8 x threads), 228 KB shared memory
/ (the program's + 1 KB reserved), 2,048 threads / threads, and 32. Waves: the grid the
launcher builds for the gpu-check shape (scan: ``plan_splits``; the others: token blocks x
column chunks) over 132 x programs per SM.

Usage: ``python .ci/triton_compile_check.py [--arch 90 80] [--jobs 2] [--filter scan] [--sample]
[--csv out.csv]``, or the same options to ``python -m benchmarks --preset triton-variants``.
``.ci/run`` runs the whole check (every variant, both architectures: about 260 compiles,
minutes on 2 cores with a cold Triton cache) as a step of its own; the test suite
(``tests/backends/triton/test_triton_compile.py``) runs ``--sample --arch 90`` and reads its
CSV, so that it stays within its time on a fresh machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Max dynamic shared memory per block (opt-in), CUDA programming guide table 21:
# sm_90: 227 KB = 232,448 B; sm_80: 163 KB = 166,912 B.
SMEM_LIMIT = {90: 232_448, 80: 166_912}


def compile_variant(v, arch: int):
    """``triton.compile`` of one variant for ``sm_<arch>``: the compiled kernel (``.asm``
    holds its ttir, ptx and cubin, ``.metadata`` its shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    return triton.compile(ASTSource(v.fn(), v.signature, v.constexprs, v.attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=v.num_warps, num_stages=v.num_stages))


def _compile(job):
    i, arch = job
    from moram_kernels.backends.triton.variants import all_variants
    v = all_variants()[i]
    t0 = time.perf_counter()
    try:
        k = compile_variant(v, arch)
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


SMS_H100_H200 = 132


def per_sm(regs, shared, warps, arch=90):
    """Resident programs per SM from the compiler's numbers (sm_90 / sm_80 limits)."""
    if regs <= 0:
        return -1
    regs_file, smem = 65536, (233_472 if arch == 90 else 167_936)
    threads = 32 * warps
    by_regs = regs_file // (((regs + 7) // 8) * 8 * threads)
    by_smem = smem // (shared + 1024)
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


def waves(v, blocks):
    """``"T=..: waves"`` at the gpu-check shape, for the token counts this variant serves."""
    import triton

    from benchmarks.cost_model import GPU_CHECK as g
    from moram_kernels.backends.triton.forward import plan_splits
    if blocks <= 0:
        return "-"
    c = v.constexprs
    slots = SMS_H100_H200 * blocks
    if v.kernel in ("_moram_scan_kernel", "_moram_scan2_kernel"):
        ts = {"prefill": (g.t_prefill,), "decode16": (1, 16), "decode64": (64,)}.get(v.config, ())
        out = []
        for t in ts:
            s, _ = plan_splits(t, g.n, 0, c["BT"], c["BN"], None, v.per_sm, sms=SMS_H100_H200)
            out.append(f"T{t}:{triton.cdiv(t, c['BT']) * s / slots:.2f}")
        return " ".join(out)
    t = g.t_prefill
    progs = triton.cdiv(t, c.get("BT", 16))
    if "BO" in c and v.kernel != "_moram_bwd_db_sorted_kernel":
        progs *= triton.cdiv(g.d_out, c["BO"])
    elif v.kernel == "_moram_bwd_db_sorted_kernel":
        progs = g.r * triton.cdiv(g.d_out, c["BO"])       # the trainable atoms
    elif v.kernel == "_moram_pick_kernel":
        progs = t                                          # one program per token
    elif v.kernel == "_moram_groups_kernel":
        progs *= triton.cdiv(g.n, c["BN"])                # token blocks x atom blocks
    return f"T{t}:{progs / slots:.2f}"


def cover(labels: list[str]) -> list[int]:
    """A sample of the variants that still reaches every kernel family and, within a family,
    every part of its labels (dtype, K, tile config, ``generic``, ``ieee``): the index of
    each label that brings a (family, part) not seen before. 62 of the 130 variants, for a
    check that must stay short on a machine whose Triton cache is cold."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for i, label in enumerate(labels):
        fam, *parts = label.split("-")
        feats = {(fam,)} | {(fam, p) for p in parts}
        if not feats <= seen:
            seen |= feats
            out.append(i)
    return out


def run(archs=(90, 80), jobs=2, filt=None, sample=False):
    """One row per (variant, arch): the compiler's numbers, ``fits`` and ``problems``;
    ``sample``: only the variants of :func:`cover`."""
    from moram_kernels.backends.triton.variants import all_variants
    vs = all_variants()
    keep = set(cover([v.label for v in vs])) if sample else set(range(len(vs)))
    todo = [(i, a) for a in archs for i, v in enumerate(vs) if i in keep and (not filt or filt in v.label)]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_compile, todo))
    else:
        rows = [_compile(j) for j in todo]
    for r, (i, _) in zip(rows, todo):
        v = vs[i]
        r["fits"] = r["ok"] and r["shared"] <= SMEM_LIMIT[r["arch"]]
        if not r["ok"]:
            continue
        r["per_sm"] = per_sm(r["regs"], r["shared"], v.num_warps, r["arch"])
        r["plan"] = v.per_sm
        r["waves"] = waves(v, r["per_sm"]) if r["arch"] == 90 else "-"
        problems = []
        if r["stack"] > 0 and not v.label.endswith("-generic"):
            if r["arch"] == 90:
                problems.append(f"spills ({r['stack']} B stack)")
            else:   # the configs are tuned for sm_90; Ampere's spills are shown, not enforced
                r["note"] = f"spills {r['stack']} B on sm_{r['arch']}"
        if r["arch"] == 90 and v.per_sm and 0 <= r["per_sm"] < v.per_sm:
            problems.append(f"fits {r['per_sm']} per SM, the grid plan assumes {v.per_sm}")
        r["problems"] = "; ".join(problems)
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--filter", default=None, help="only labels containing this")
    ap.add_argument("--sample", action="store_true",
                    help="only a cover of the variants: every kernel family, and every part of its labels")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_compile_check: unset TRITON_INTERPRET, the interpreter compiles nothing", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = run(tuple(a.arch), a.jobs, a.filter, a.sample)
    print(f"{'variant':40s} {'arch':>4s} {'shared B':>9s} {'limit B':>8s} {'regs':>4s} {'stack':>5s} "
          f"{'mma':>3s} {'cp.async':>8s} {'/SM':>3s} {'plan':>4s} {'waves (gpu-check shape)':24s} {'s':>5s}")
    for r in rows:
        if r["ok"]:
            print(f"{r['label']:40s} {r['arch']:>4d} {r['shared']:>9d} {SMEM_LIMIT[r['arch']]:>8d} "
                  f"{r['regs']:>4d} {r['stack']:>5d} {'y' if r['mma'] else 'n':>3s} "
                  f"{'y' if r['cp_async'] else 'n':>8s} {r['per_sm']:>3d} {r['plan'] or '-':>4} "
                  f"{r['waves']:24s} {r['seconds']:5.1f}" + (f"  <- {r['problems']}" if r["problems"] else "")
                  + (f"  ({r['note']})" if r.get("note") else ""))
        else:
            print(f"{r['label']:44s} {r['arch']:>4d} FAILED {r['error']}")
    bad = [r for r in rows if not r["fits"] or r.get("problems")]
    print(f"triton_compile_check: {'FAILED' if bad else 'ok'}, {len(rows)} compiles, {len(bad)} failed, over the shared-memory limit, spilling or "
          f"below the planned occupancy; /SM = programs per SM (H100 = H200 on sm_90), "
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
