#!/usr/bin/env python
"""Pipeline facts of the scoring kernels, read from the compiler's TTGIR: no GPU needed.

For each scan variant (``moram_kernels.backends.triton.variants``), compiled with
``triton.compile`` for sm_90 / sm_80 (``triton_compile_check.compile_variant``), it finds
the *tile loop* (the outermost ``scf.for`` that holds the MMA) and reports:

- ``nested``: whether the MMA sits in a loop inside the tile loop (the old scan's d_in
  loop per tile: the software pipeline drains and refills at every tile);
- ``allocs_in``: ``ttg.local_alloc`` inside the tile loop (shared memory that is not
  hoisted);
- ``waits``: the ``ttg.async_wait`` counts inside the tile loop, in order (``num`` =
  copy groups left in flight; a 0 inside the loop is a drain);
- ``drains_in``: how many of those are ``num = 0`` (``wait 0``) in the tile loop's own
  body or in a loop nested in it;
- ``prologue_in``: ``ttg.async_commit_group`` issued inside the tile loop but outside
  the innermost MMA loop (a per-tile pipeline prologue);
- ``groups``: the copy groups committed before the tile loop (the pipeline's prologue
  depth: ``num_stages - 1`` per operand);
- ``mma``: ``wgmma`` (``ttng.warp_group_dot``, sm_90), ``mma.sync`` (``tt.dot`` with an
  ``#mma`` result, sm_80) or ``fma``;
- ``sass_loops``: ``(size, skipped)`` per loop of the SASS (:func:`sass_loops`), the
  instruction counts behind ``moram_kernels/backends/triton/model.py``'s merge costs.

``--check`` fails (exit 1) when a ``scan2`` variant is nested, allocates or drains inside
its tile loop, has a per-tile prologue, or has no tensor-core MMA on sm_90 (wgmma) /
sm_80 (mma.sync). The old scan is reported, not checked: its drain per tile is the
reason ``scan2`` exists. ``tests/backends/triton/test_scan2.py`` runs :func:`facts` on
a compiled variant, and on hand-written IR with a drain planted.

Usage: ``python .ci/ttgir_facts.py [--arch 90 80] [--filter scan2-bf16-K16] [--check]``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

_FOR = re.compile(r"=\s*scf\.for\b")
_WAIT = re.compile(r"ttg\.async_wait\b.*\{num = (\d+) : i32\}")
_DOT = re.compile(r"ttng\.warp_group_dot\b(?!_wait)|=\s*tt\.dot\b")


def _loops(lines):
    """``[(start, end)]`` line spans of every ``scf.for``: a loop opened on a line where
    the brace depth was ``d`` ends on the first later line that brings it back to ``d``."""
    spans, open_, depth = [], [], 0
    for i, line in enumerate(lines):
        code = line.split(" loc(")[0]
        if _FOR.search(code):
            open_.append((i, depth))
        depth += code.count("{") - code.count("}")
        while open_ and open_[-1][0] < i and depth <= open_[-1][1]:
            spans.append((open_.pop()[0], i))
    return spans


def facts(ttgir: str) -> dict:
    """The facts above from one kernel's TTGIR text."""
    lines = ttgir.splitlines()
    spans = _loops(lines)
    dot_lines = [i for i, line in enumerate(lines) if _DOT.search(line)]
    if not dot_lines:
        return dict(found=False)
    with_dot = [s for s in spans if any(s[0] < d < s[1] for d in dot_lines)]
    # the tile loop: the outermost loop around an MMA (others may exist, e.g. a fallback
    # copy of the loop for an empty d_in, which holds no MMA)
    tile = min(with_dot, key=lambda s: s[0]) if with_dot else None
    if tile is None:
        return dict(found=False)
    inner = [s for s in with_dot if s != tile and tile[0] < s[0] and s[1] <= tile[1]]
    innermost = max(inner, key=lambda s: s[0]) if inner else tile
    body = range(tile[0] + 1, tile[1])
    waits = [int(m.group(1)) for i in body for m in [_WAIT.search(lines[i])] if m]
    allocs = sum("ttg.local_alloc" in lines[i] for i in body)
    prologue_in = sum("ttg.async_commit_group" in lines[i] for i in body
                      if inner and not (innermost[0] <= i <= innermost[1]))
    groups = sum("ttg.async_commit_group" in lines[i] for i in range(0, tile[0]))
    text = "\n".join(lines[tile[0]:tile[1]])
    if "ttng.warp_group_dot" in text:
        mma = "wgmma"
    elif re.search(r"=\s*tt\.dot\b.*-> tensor<[^>]*#mma", text):
        mma = "mma.sync"
    else:
        mma = "fma"
    return dict(found=True, nested=bool(inner), allocs_in=allocs, waits=waits,
                drains_in=sum(w == 0 for w in waits), prologue_in=prologue_in, groups=groups, mma=mma)


_SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_loops(sass: str) -> list[dict]:
    """Loops of a ``cuobjdump -sass`` listing: one per backward branch, with its size in
    instructions (``size``) and the largest block a forward branch inside it skips
    (``skipped``: scan2's per-tile merge, jumped over on the d_in steps that are not a
    tile's last). Instructions are 16 bytes on sm_80 and sm_90."""
    branches = []
    for line in sass.splitlines():
        m = _SASS.match(line)
        if m:
            b = re.search(r"\bBRA\s+(?:`?\(?\.?L?_?x?_?)?0x([0-9a-f]+)", m.group(2))
            if b:
                branches.append((int(m.group(1), 16), int(b.group(1), 16)))
    out = []
    for at, to in branches:
        if to < at:
            skips = [t - a for a, t in branches if to <= a < at and a < t <= at + 16]
            out.append(dict(start=to, end=at, size=(at - to) // 16 + 1,
                            skipped=(max(skips) // 16 - 1) if skips else 0))
    return out


def sass_of(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin, with the cuobjdump that ships with Triton ("" if absent)."""
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


def problems(f: dict, arch: int) -> list[str]:
    """What a pipelined scan must not show (empty: fine)."""
    if not f.get("found"):
        return ["no MMA loop found"]
    out = []
    if f["nested"]:
        out.append("MMA loop nested in the tile loop (pipeline refills per tile)")
    if f["allocs_in"]:
        out.append(f"{f['allocs_in']} shared-memory allocation(s) inside the tile loop")
    if f["drains_in"]:
        out.append(f"{f['drains_in']} async_wait 0 inside the tile loop")
    if f["prologue_in"]:
        out.append(f"{f['prologue_in']} async copies committed per tile outside the MMA loop (prologue)")
    want = "wgmma" if arch == 90 else "mma.sync"
    if f["mma"] != want:
        out.append(f"MMA is {f['mma']}, expected {want}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--filter", default="scan2-bf16-K16-prefill",
                    help="labels containing this (default: the prefill scan2 variant)")
    ap.add_argument("--check", action="store_true", help="fail on a scan2 variant with a problem")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("ttgir_facts: unset TRITON_INTERPRET, the interpreter compiles nothing", file=sys.stderr)
        return 2
    from triton_compile_check import compile_variant

    from moram_kernels.backends.triton.variants import all_variants
    bad = 0
    for v in all_variants():
        if a.filter not in v.label or not v.kernel.startswith("_moram_scan"):
            continue
        for arch in a.arch:
            k = compile_variant(v, arch)
            f = facts(k.asm["ttgir"])
            p = problems(f, arch)
            # loop sizes in SASS instructions (the model's merge costs: the old scan's and
            # the select's merge_topk round, scan2's per-tile merge = the skipped block)
            f["sass_loops"] = [(lp["size"], lp["skipped"]) for lp in sass_loops(sass_of(k.asm.get("cubin")))]
            checked = v.kernel == "_moram_scan2_kernel" and not v.label.endswith("-generic")
            bad += bool(p) and checked and a.check
            print(f"{v.label:36s} sm_{arch} " + " ".join(f"{k}={f[k]}" for k in f if k != "found")
                  + (f"  <- {'; '.join(p)}" if p else ""))
    print(f"ttgir_facts: {'FAILED' if bad else 'ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
