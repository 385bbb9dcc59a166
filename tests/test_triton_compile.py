"""Every Triton kernel variant the launchers can emit compiles for sm_90 and sm_80 (no GPU
needed) and fits the architecture's shared memory per block. The interpreter accepts
things a GPU compile rejects (tl.dot with an inner size below 16, for one), so this is the
check that the kernels would build on Hopper and Ampere."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "variants.csv"
    # a subprocess: the compiler needs TRITON_INTERPRET unset, and conftest sets it here
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_variants.py"),
                        "--jobs", "2", "--csv", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    count = subprocess.run(
        [sys.executable, "-c", "from moram_kernels.backends.triton.variants import all_variants as a; print(len(a()))"],
        env=env, capture_output=True, text=True, check=True)
    n = int(count.stdout)
    assert len(rows) == 2 * n
    for arch in ("90", "80"):
        mine = [r for r in rows if r["arch"] == arch]
        assert len({r["label"] for r in mine}) == n, f"sm_{arch}: a variant is missing"
        assert all(r["ok"] == "True" and r["fits"] == "True" for r in mine)
    labels = {r["label"] for r in rows}
    for kernel in ("scan", "select", "gather", "bwd_gc", "bwd_coef", "bwd_db_atomic", "bwd_db_sorted"):
        assert any(lbl.startswith(kernel + "-") for lbl in labels), kernel
    for kp in (8, 16, 32, 64):
        assert any(f"-K{kp}-" in lbl for lbl in labels), kp
        assert any(lbl.endswith(f"-K{kp}") for lbl in labels), kp
    # the scoring GEMM must hit the tensor cores and the async copy pipeline in 16-bit
    for r in rows:
        if r["label"].startswith(("scan-bf16xbf16", "scan-fp16xfp16")) and "generic" not in r["label"]:
            assert r["mma"] == "True" and r["cp_async"] == "True", r["label"]
