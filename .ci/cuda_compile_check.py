#!/usr/bin/env python
"""Compile-only check of the CUDA kernels (csrc/cuda/*.cu): no GPU, no CUDA torch needed.

Runs ``nvcc -c`` on every ``.cu`` for each arch (default sm_80 and sm_90, all archs in one
nvcc call) against the headers of the installed torch, with ``-Xptxas -v``, and prints
registers, shared memory, stack frame and spills per kernel. Fails (exit 1) on a compile
error or on any register spill in the project's kernels (namespace ``moram_cuda``).

The CPU torch wheel lacks the generated header ``c10/cuda/impl/cuda_cmake_macros.h``; a
one-line shim in a temporary include directory stands in for it.

Usage: ``python .ci/cuda_compile_check.py [--archs 80,90] [--keep DIR]``
(``MORAM_CUDA_ARCHS`` is the default for ``--archs``). Exit 2: nvcc not found.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_NAMESPACE = "moram_cuda::"

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
_PROPS = re.compile(r"Function properties for (?P<name>\S+)")
_SPILL = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
                    r"(?P<ld>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, src: Path, obj: Path, archs: list[str], shim: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    cmd = [nvcc, "-c", str(src), "-o", str(obj), "-std=c++17", "-O3", "-lineinfo",
           "-Xptxas", "-v", "-Xcompiler", "-fPIC", "--threads", "0",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DMORAM_WITH_CUDA", "-I", str(shim), "-I", sysconfig.get_paths()["include"]]
    cmd += cpp_extension.COMMON_NVCC_FLAGS          # the flags torch's CUDAExtension adds
    for inc in cpp_extension.include_paths():
        cmd += ["-I", inc]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines())) if out else {n: n for n in names}


def parse_ptxas(log: str) -> list[dict]:
    """One record per (kernel, arch): regs, smem, stack, spill stores/loads."""
    recs, cur, pending = [], {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m["name"], "arch": m["arch"]}
            continue
        m = _PROPS.search(line)
        if m:
            pending = m["name"]
            continue
        m = _SPILL.search(line)
        if m and cur and pending == cur["name"]:
            cur.update(stack=int(m["stack"]), spill_st=int(m["st"]), spill_ld=int(m["ld"]))
            continue
        m = _USED.search(line)
        if m and cur:
            cur.update(regs=int(m["regs"]), smem=int(m["smem"] or 0))
            recs.append(cur)
            cur, pending = {}, None
    return recs


def short(name: str) -> str:
    name = re.sub(r"^void ", "", name)        # templates demangle with their return type
    name = name.replace(OWN_NAMESPACE, "").replace("c10::", "")
    name = re.sub(r"std::integral_constant<int, (\d+)>", r"\1", name)
    return re.sub(r"\(.*\)$", "", name)      # drop the parameter list


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=os.environ.get("MORAM_CUDA_ARCHS", "80;90"),
                    help="compute capabilities, ';' or ',' separated (default 80;90)")
    ap.add_argument("--keep", default=None, help="write objects and logs here instead of a temp dir")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in re.split(r"[;,]", args.archs) if a.strip()]

    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_compile_check: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 2
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        print("cuda_compile_check: no csrc/cuda/*.cu to compile")
        return 1

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moram_nvcc_"))
    work.mkdir(parents=True, exist_ok=True)
    shim = work / "shim"
    (shim / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
    (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
        "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")

    failed = False
    records = []
    for src in sources:
        cmd = nvcc_command(nvcc, src, work / (src.stem + ".o"), archs, shim)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        (work / (src.stem + ".log")).write_text(" ".join(cmd) + "\n\n" + log)
        rel = src.relative_to(ROOT)
        if proc.returncode != 0:
            print(f"FAIL {rel}: nvcc exit {proc.returncode} after {dt:.1f} s")
            print("\n".join(ln for ln in log.splitlines() if "ptxas info" not in ln)[-6000:])
            failed = True
            continue
        print(f"ok   {rel}: sm_{', sm_'.join(archs)} in {dt:.1f} s")
        for r in parse_ptxas(log):
            r["file"] = str(rel)
            records.append(r)

    names = demangle(sorted({r["name"] for r in records}))
    own = [r for r in records if OWN_NAMESPACE in names[r["name"]]]
    if not failed:
        for a in archs:
            if not any(r["arch"] == f"sm_{a}" for r in own):
                print(f"FAIL no moram_cuda kernel was compiled for sm_{a}")
                failed = True
    print(f"\n{'arch':<6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel")
    for r in sorted(own, key=lambda r: (short(names[r["name"]]), r["arch"])):
        spill = r.get("spill_st", 0) + r.get("spill_ld", 0)
        print(f"{r['arch']:<6} {r['regs']:>4} {r['smem']:>6} {r.get('stack', 0):>5} "
              f"{r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<5}  {short(names[r['name']])}"
              + ("   <-- SPILLS" if spill else ""))
        if spill:
            failed = True
    if failed:
        print("\ncuda_compile_check: FAILED" + (f" (logs in {work})" if args.keep else ""))
    else:
        print(f"\ncuda_compile_check: ok, {len(own)} kernel builds, no spills")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
