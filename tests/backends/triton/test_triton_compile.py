"""Triton kernel variants compile for sm_90 (no GPU needed) and fit the architecture's
shared memory per block. The interpreter accepts things a GPU compile rejects (tl.dot with
an inner size below 16, for one), so this is the check that the kernels would build on
Hopper. The suite compiles a cover of the variants (every kernel family, every part of
their labels) through the CI's compile check, ``.ci/triton_compile_check.py --sample``;
``.ci/run`` runs the whole check, every variant for sm_90 and sm_80 (about 260 compiles,
minutes with a cold Triton cache), as a step of its own."""

from __future__ import annotations

import csv
import re
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CHECK = os.path.join(ROOT, ".ci", "triton_compile_check.py")


def _compile_env() -> dict:
    """The environment of a compiling subprocess: the compiler needs TRITON_INTERPRET
    unset, and conftest sets it here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _labels(env: dict) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c",
         "from moram_kernels.backends.triton.variants import all_variants as a; print(*(v.label for v in a()))"],
        env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_sample_covers_every_family_and_label_part():
    """The suite compiles a cover of the variants (``.ci/run`` compiles all of them): it
    must reach every kernel family and, within each, every part of the labels (dtype, K,
    tile config, generic, ieee), and be a real sample, not the whole list."""
    sys.path.insert(0, os.path.dirname(CHECK))
    try:
        from triton_compile_check import cover
    finally:
        sys.path.pop(0)
    labels = _labels(_compile_env())
    picked = [labels[i] for i in cover(labels)]
    want = {(lbl.split("-")[0], p) for lbl in labels for p in lbl.split("-")}
    got = {(lbl.split("-")[0], p) for lbl in picked for p in lbl.split("-")}
    assert got == want
    assert len(set(picked)) == len(picked) < 0.6 * len(labels)


@pytest.mark.slow
def test_a_cover_of_the_variants_compiles_for_sm90(tmp_path):
    """The compile check as the suite runs it (``--sample --arch 90``): every sampled variant
    compiles, fits, does not spill and fits the programs per SM its grid plan assumes."""
    out = tmp_path / "variants.csv"
    env = _compile_env()
    r = subprocess.run([sys.executable, CHECK, "--jobs", "2", "--arch", "90", "--sample", "--csv", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    sys.path.insert(0, os.path.dirname(CHECK))
    try:
        from triton_compile_check import cover
    finally:
        sys.path.pop(0)
    labels = _labels(env)
    assert sorted(r["label"] for r in rows) == sorted(labels[i] for i in cover(labels))
    assert all(r["arch"] == "90" and r["ok"] == "True" and r["fits"] == "True" for r in rows)
    got = {r["label"] for r in rows}
    for kernel in ("scan", "scan2", "split_scores", "pick", "select", "gather", "bwd_gc", "bwd_coef",
                   "bwd_dx", "bwd_db_atomic", "bwd_db_sorted", "bwd_db_hit"):
        assert any(lbl.startswith(kernel + "-") for lbl in got), kernel
    for kp in (8, 16, 32, 64):
        assert any(f"-K{kp}-" in lbl for lbl in got), kp
        assert any(lbl.endswith(f"-K{kp}") for lbl in got), kp
    # the scoring GEMM must hit the tensor cores and the async copy pipeline in 16-bit, and
    # in TF32 for fp32 (only float32_matmul_precision "highest" keeps IEEE fp32 FMAs)
    scans = [r for r in rows if r["label"].startswith(("scan-bf16xbf16", "scan-fp16xfp16", "scan-fp32xfp32"))
             and "generic" not in r["label"] and not r["label"].endswith("-ieee")]
    assert len(scans) >= 3
    for r in scans:
        assert r["mma"] == "True" and r["cp_async"] == "True", r["label"]
    # no variant the launchers pick spills, and every scan config fits the programs per SM
    # its grid plan assumes (the check exits non-zero otherwise; the rows say why)
    assert not [r["label"] for r in rows if r.get("problems")]


_TTIR_PROBE = r"""
import sys
sys.path.insert(0, {ci!r})
from triton_compile_check import compile_variant
from moram_kernels.backends.triton.variants import all_variants
v = next(v for v in all_variants() if v.label.endswith("-generic"))
print(compile_variant(v, 90).asm["ttir"])
"""


def test_scan_column_offsets_are_int64():
    """``column * stride`` of x and of the keys is formed in int64 (a transposed view has
    stride T or N, and d * T passes 2^31 long before memory runs out). Checked on the
    compiled IR of the generic scan variant, where the strides are runtime values: the
    strides are widened to i64 and no [1, BD] i32 product remains."""
    probe = _TTIR_PROBE.format(ci=os.path.dirname(CHECK))
    r = subprocess.run([sys.executable, "-c", probe], env=_compile_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ttir = r.stdout
    for stride in ("sxd", "s0d", "s1d"):
        assert f"arith.extsi %{stride} : i32 to i64" in ttir, f"{stride} is not widened to int64"
    narrow = [ln.strip() for ln in ttir.splitlines() if re.search(r"arith\.muli .*: tensor<1x\d+xi32>", ln)]
    assert not narrow, f"int32 column-offset products: {narrow[:3]}"
