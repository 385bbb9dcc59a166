"""The GPU check's planning and printing, run on CPU with a fake timer (a dry run), so the
one call a lent GPU gets cannot rot: every tracked GPU row, every forward route in
``forward.FWD_ROUTES`` (the others skipped with a reason), both backward variants, the
model's prediction and measured / predicted beside each line, and the section budgets."""

from __future__ import annotations

import os
import re

import pytest

from benchmarks.presets import gpu_check as gc


def _fake_timer(factor):
    """Milliseconds = factor x the model's prediction (0.5 ms where there is none)."""
    def timer(job, graph):
        pred = gc.model_ms(*job, "graph" if graph else "eager")[0]
        return factor * pred if pred else 0.5
    return timer


def test_rehearsal_times_every_row_route_and_variant(capsys):
    backends = {"triton": "", "cuda": "extension built without CUDA"}
    jobs, rows = gc.rehearse(backends, ("auto", "fused", "split"), _fake_timer(2.0), total_s=300.0)
    out = capsys.readouterr().out
    lines = out.splitlines()
    # the four rows of the table, decode N=1024 under a CUDA graph
    for case in ("prefill fwd", "prefill fwd+bwd", "decode T=1 N=1024", "decode T=1 N=65536"):
        assert any(ln.startswith(case) for ln in lines), case
    assert all(m == "graph" for r, m, _ in jobs if r.case == "decode T=1 N=1024")
    timed = {(r["case"], r["impl"]) for r in rows}
    # forward routes: those in FWD_ROUTES timed, the others skipped and said why
    assert ("prefill fwd", "triton fwd=split") in timed and ("prefill fwd", "triton fwd=fused") in timed
    for route in ("gemm", "scan2"):
        assert ("prefill fwd", f"triton fwd={route}") not in timed
        assert any(f"triton fwd={route}" in ln and "skipped" in ln and "does not exist" in ln for ln in lines)
    # both backward variants in the training row, with their environment variable
    assert {("prefill fwd+bwd", "triton bwd=v1"), ("prefill fwd+bwd", "triton bwd=v2")} <= timed
    envs = {i.name: dict(i.env) for r, _, i in jobs if r.bwd}
    assert envs["triton bwd=v1"] == {"MORAM_TRITON_BWD": "v1"}
    assert ("decode T=1 N=65536", "cuBLAS x@keys.T (graph)") in timed
    assert ("prefill fwd", "authors") in timed
    # an unavailable backend is listed with its reason, never silently missing
    assert any(" cuda " in ln and "extension built without CUDA" in ln for ln in lines)
    assert not any(r["impl"].startswith("cuda") for r in rows)
    # every measured line has the model beside it and the ratio measured / model
    measured = [ln for ln in lines if " ms " in ln and "TFLOP/s" in ln]
    assert len(measured) == len(rows) > 20
    for ln in measured:
        assert re.search(r"measured/model\s+2\.00", ln), ln
    # the section budgets: printed, and within the check's few minutes
    m = re.search(r"time budget: (.*); total (\d+) s", out)
    secs = [float(x) for x in re.findall(r"(\d+) s", m.group(1))]
    assert len(secs) == 4 and abs(sum(secs) - 300) < 2 and int(m.group(2)) <= 300


def test_routes_come_from_forward_and_jobs_stop_at_the_deadline(monkeypatch, capsys):
    from moram_kernels.backends.triton import forward
    monkeypatch.setattr(forward, "FWD_ROUTES", ("auto", "fused", "gemm"), raising=False)
    assert gc.fwd_routes() == ("auto", "fused", "gemm")
    monkeypatch.delattr(forward, "FWD_ROUTES", raising=False)
    assert gc.fwd_routes() == ("auto", "fused")          # a checkout without the tuple: fused only
    monkeypatch.undo()                                   # the model's auto reads the real tuple
    jobs = gc.plan_jobs({"triton": ""}, ("auto", "fused"))
    skipped = []
    clock = iter(range(1000))
    rows = gc.run_jobs(jobs, lambda r, i: (r, i), _fake_timer(1.0), 2.5, lambda: next(clock), skipped)
    assert len(rows) == 3 and skipped and "timing budget spent" in capsys.readouterr().out


def test_known_routes_are_forwards_routes():
    """The check times exactly the routes ``MORAM_TRITON_FWD`` accepts (auto is the plain
    "triton" line)."""
    from moram_kernels.backends.triton import forward
    assert ("auto", *gc.KNOWN_FWD_ROUTES) == forward.FWD_ROUTES


def test_scoped_env_restores(monkeypatch):
    monkeypatch.setenv("MORAM_TRITON_BWD", "v2")
    monkeypatch.delenv("MORAM_TRITON_FWD", raising=False)
    with gc.scoped_env((("MORAM_TRITON_BWD", "v1"), ("MORAM_TRITON_FWD", "split"))):
        assert os.environ["MORAM_TRITON_BWD"] == "v1" and os.environ["MORAM_TRITON_FWD"] == "split"
    assert os.environ["MORAM_TRITON_BWD"] == "v2" and "MORAM_TRITON_FWD" not in os.environ


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_model_is_asked_by_full_name_then_backend(mode):
    from benchmarks import cost_model as cm
    from moram_kernels.backends.triton.model import GRAPH_NODE_S
    row = gc.ROWS[2]
    for route in gc.KNOWN_FWD_ROUTES:     # every route has its own model, scan2 included
        full, note = gc.model_ms(row, gc.Impl(f"triton fwd={route}", "backend", "triton"), mode)
        hw = dict(cm.H200, launch_s=GRAPH_NODE_S) if mode == "graph" else cm.H200
        assert note == "" and full == pytest.approx(cm.route_ms(route, row.t, gc.D_IN, gc.D_OUT, row.n, gc.K, hw))
    base, _ = gc.model_ms(row, gc.Impl("triton", "backend", "triton"), mode)
    assert base == gc.model_ms(row, gc.Impl("triton fwd=split", "backend", "triton"), mode)[0]  # auto: split
    cuda, note = gc.model_ms(row, gc.Impl("cuda graph-only", "backend", "cuda"), mode)
    assert cuda is not None and note == "model of cuda"
    eager = gc.model_ms(row, gc.Impl("triton", "backend", "triton"), "eager")[0]
    assert (base < eager) == (mode == "graph")           # a graph node costs less than an eager launch


def test_the_backward_variants_have_their_own_model():
    """v1 writes and sums the trainable segment's P A as a [T, d] fp32 tensor and reads
    all of gy for dB: the model prices it above v2 on the training row (it printed the
    same time for both before), and the forward rows do not depend on it."""
    from benchmarks import cost_model as cm
    v1 = cm.predict_ms("prefill fwd+bwd", "triton bwd=v1", 4096)
    v2 = cm.predict_ms("prefill fwd+bwd", "triton bwd=v2", 4096)
    assert v2 == cm.predict_ms("prefill fwd+bwd", "triton", 4096)       # auto is v2
    assert 1.03 * v2 < v1 < 1.5 * v2
    assert cm.predict_ms("prefill fwd", "triton bwd=v1", 4096) == cm.predict_ms("prefill fwd", "triton", 4096)
