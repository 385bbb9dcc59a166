"""The benchmark harness itself: ``python -m benchmarks --smoke`` writes the table, the
CSV and the plots; skips and failures are reported, not hidden; the memory and
saved-bytes meters measure what they claim."""

from __future__ import annotations

import csv
import glob
import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import moram_kernels as mk
from benchmarks import competitors, cost_model, presets, report, run
from benchmarks.competitors import AUTHORS, BASE, COMPILED, FLOOR, LORA_N, LORA_R
from benchmarks.grid import Case, merge
from benchmarks.timing import Budget, saved_for_backward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _read_csv(folder: str) -> list[dict]:
    with open(os.path.join(folder, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_table_csv_and_plots(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--device", "cpu", "--no-compile", "--threads", "1", "--no-progress",
         "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""                 # no warnings, no leak reports at exit: results only
    assert out.stdout.rstrip().endswith("speedup_vs_N.png")
    (folder,) = glob.glob(str(tmp_path / "*-smoke"))
    rows = _read_csv(folder)
    assert set(report.COLUMNS) <= set(rows[0])
    impls = {r["impl"] for r in rows}
    timed = [b for b in mk.available_backends() if b != "triton"]      # CPU run: no interpreter
    assert {AUTHORS, LORA_N, LORA_R, FLOOR, BASE} | {f"moram:{b}" for b in timed} == impls
    assert {r["mode"] for r in rows if r["impl"] == BASE} == {"train"}
    assert COMPILED not in impls
    assert {r["mode"] for r in rows} == {"eval", "train"}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["q25_ms"]) <= float(r["median_ms"]) <= float(r["q75_ms"])
        assert r["timestamp_utc"] and r["torch"] == torch.__version__ and r["cpu"]
        assert r["peak_mem_mb"] != ""
        if r["impl"].startswith("moram:"):
            assert float(r["max_rel_err"]) < 1e-4
            assert float(r["speedup_vs_authors"]) > 0 and float(r["gflops"]) > 0
        if r["mode"] == "train" and r["impl"] != FLOOR:
            assert r["saved_bwd_mb"] != ""
    md = open(os.path.join(folder, "results.md")).read()
    assert "| sweep | d | N | k | T | dtype | authors | " + " | ".join(timed) + " | LoRA R=N |" in md
    assert md.strip() in out.stdout
    # train rows: the adapter's share (layer step minus the base layer's step), best vs LoRA R=N
    by = {(r["mode"], r["N"], r["T"], r["impl"]): float(r["median_ms"]) for r in rows}
    train_lines = [ln for ln in md.split("### Train step")[1].splitlines() if ln.startswith("| N ")]
    assert train_lines
    for ln in train_lines:
        n, t = ln.split(" | ")[2], ln.split(" | ")[4]
        share = ln.rstrip(" |").rsplit(" | ", 1)[1]
        base = by[("train", n, t, BASE)]
        best = min(v - base for (m, nn, tt, i), v in by.items()
                   if (m, nn, tt) == ("train", n, t) and i.startswith("moram:"))
        lora = by[("train", n, t, LORA_N)] - base
        assert share.startswith(report._ms(max(best, 0.0)) + " / " + report._ms(max(lora, 0.0))), (ln, best, lora)
    for name in ("time_vs_N.png", "speedup_vs_N.png"):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_without_matplotlib_the_table_and_csv_are_written_and_one_line_says_why_no_plots(tmp_path):
    # matplotlib made unimportable in a fresh process; the memory pass runs too, and must not
    # leave the garbage collector frozen (frozen objects are never freed, not even at exit,
    # which makes nanobind-based extensions report leaks)
    code = textwrap.dedent(f"""
        import gc, sys
        sys.modules["matplotlib"] = None
        from benchmarks import run
        rc = run.main(["--smoke", "--modes", "eval", "--backends", "reference", "--no-compile",
                       "--threads", "1", "--no-progress", "--out", {str(tmp_path)!r}])
        print("freeze count", gc.get_freeze_count())
        sys.exit(rc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""
    (folder,) = glob.glob(str(tmp_path / "*-smoke"))
    assert sorted(os.listdir(folder)) == ["results.csv", "results.md"]
    assert _read_csv(folder) and open(os.path.join(folder, "results.md")).read().strip() in out.stdout
    lines = out.stdout.rstrip().splitlines()
    assert [ln for ln in lines if "matplotlib" in ln.replace(str(tmp_path), "")] == [lines[-2]]
    assert "pip install" in lines[-2]
    assert lines[-1] == "freeze count 0"


def test_skips_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    # a compile that fails must show its reason, and a baseline too big must be skipped
    def broken(*a, **kw):
        def fn(*args):
            raise RuntimeError("inductor exploded")
        return fn
    monkeypatch.setattr("benchmarks.competitors.compiled_dense", broken)
    rc = run.main(["--smoke", "--modes", "eval", "--no-memory", "--no-plots", "--no-progress",
                   "--max-dense-gb", "1e-9", "--out", str(tmp_path)])
    assert rc == 0
    (folder,) = glob.glob(str(tmp_path / "*-smoke"))
    rows = _read_csv(folder)
    comp = [r for r in rows if r["impl"] == COMPILED]
    auth = [r for r in rows if r["impl"] == AUTHORS]
    assert comp and auth and all(r["status"] == "skipped" and "--max-dense-gb" in r["reason"] for r in auth)
    assert all(r["status"] == "skipped" for r in comp)       # the size rule comes first
    ref = [r for r in rows if r["impl"] == "moram:reference"]
    assert ref and all(r["status"] == "skipped" for r in ref)
    # nothing to compare with, so no speed-up is invented
    assert all(r["speedup_vs_authors"] == "" for r in rows)

    rc = run.main(["--smoke", "--modes", "eval", "--no-memory", "--no-plots", "--no-progress",
                   "--out", str(tmp_path / "b")])
    assert rc == 0      # a failed row is reported in the table, not a failed run
    (folder,) = glob.glob(str(tmp_path / "b" / "*-smoke"))
    comp = [r for r in _read_csv(folder) if r["impl"] == COMPILED]
    assert comp and all(r["status"] == "failed" and "inductor exploded" in r["reason"] for r in comp)
    text = capsys.readouterr().out
    assert "failed [1]" in text and "inductor exploded" in text


def test_peak_rss_sees_an_allocation():
    # in a fresh process: the meter changes malloc settings for the process it runs in
    code = textwrap.dedent("""
        import torch
        from benchmarks.timing import PeakMemory
        m = PeakMemory(torch.device("cpu"))
        m.prepare_cpu()
        assert m.why_not is None, m.why_not
        big = m.measure(lambda: torch.ones(16 * 2**20))        # 64 MiB, freed at once
        small = m.measure(lambda: torch.ones(16))
        again = m.measure(lambda: torch.ones(16 * 2**20))      # freed memory left RSS
        print(big / 2**20, small / 2**20, again / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    big, small, again = map(float, out.stdout.split())
    assert 63 <= big <= 72 and 63 <= again <= 72
    assert small < 2


def test_saved_for_backward_counts_activations_only():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(10, 64)
    # x @ w saves x and w (excluded); tanh saves its [10, 32] output
    y, nbytes = saved_for_backward(lambda: torch.tanh(x @ w), exclude=lambda: [x, w])
    assert y.shape == (10, 32)
    assert nbytes == 10 * 32 * 4


def test_saved_bytes_leave_out_the_layers_cached_gram():
    """MoRAMLinear's cached Gram matrix lives with the layer, not with one step: the
    benchmark's saved-bytes meter leaves it out (it once slipped in, unnoticed, when the
    cache's layout changed)."""
    from benchmarks.competitors import _saved

    layer = mk.MoRAMLinear(torch.nn.Linear(64, 8), r=64, k=2, tau=0.1)
    layer.add_task()
    layer.add_task()                    # 64 frozen atoms >= d_in: the backward uses the Gram
    nbytes = _saved(layer, torch.randn(1, 64, requires_grad=True))
    assert layer._caches.gram.value is not None, "the setup is hollow: no Gram cached"
    assert nbytes < 64 * 64 * 4, nbytes


def test_grid_merges_shared_shapes_and_work_counts():
    a = Case("N", 768, 768, 4096, 16, 256)
    b = Case("k", 768, 768, 4096, 16, 256)
    (m,) = merge([a, b, a])
    assert m.sweep == "N,k"
    work = cost_model.work
    assert work(a, "eval", "floor", 4)[0] == 2 * 256 * 4096 * 768
    f_eval, _ = work(a, "eval", "moram", 4)
    f_train, _ = work(a, "train", "moram", 4)
    assert f_eval == 2 * 256 * 4096 * 768 + 2 * 256 * 16 * 768
    assert f_train > f_eval + 2 * 2 * 256 * 768 * 768


def test_every_eval_check_has_something_to_check():
    """Each eval case of the quick grid, and the paper's layers, gives the authors' layer
    a non-zero output on most rows of its random inputs: a threshold that drops every atom
    would time an empty gather and make the check against the authors vacuous."""
    from benchmarks.grid import full, quick
    from moram_kernels.backends.reference import moram_dense
    cases = quick() + [c for c in full() if c.sweep.startswith("paper") and c.t > 1]
    for case in cases:
        s = competitors.Setup(case, torch.device("cpu"), torch.float32)
        y = moram_dense(s.xs[0], s.keys, s.values, **s.hyper)
        rows = (y.abs().sum(-1) > 0).float().mean().item()
        assert rows > 0.5, f"{case.label()} (delta {case.delta}): only {rows:.0%} of rows non-zero"


@pytest.mark.parametrize("argv", [["--modes", "bogus"], ["--quick", "--smoke"], ["--dtype", "fp32,fp8"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        run.parse_args(argv)


def test_backend_refusal_is_a_skip_with_its_reason(tmp_path, monkeypatch):
    import dataclasses

    from moram_kernels import backends as _dispatch
    ref = _dispatch._BY_NAME["reference"]
    monkeypatch.setitem(_dispatch._BY_NAME, "reference",
                        dataclasses.replace(ref, refuses=lambda inp, forced: [f"no K = {inp.k} today"]))
    run.main(["--smoke", "--modes", "eval", "--no-compile", "--no-memory", "--no-plots", "--no-progress",
              "--out", str(tmp_path)])
    (folder,) = glob.glob(str(tmp_path / "*-smoke"))
    rows = [r for r in _read_csv(folder) if r["impl"] == "moram:reference"]
    assert rows and all(r["status"] == "skipped" and "reference refuses these inputs: no K = 4 today"
                        in r["reason"] for r in rows)


# ---- presets: python -m benchmarks --preset NAME ------------------------------------------------

def test_preset_is_split_from_the_arguments_and_listed_in_help(capsys):
    assert run.split_preset(["--preset", "cpu-goals", "--reps", "2"]) == ("cpu-goals", ["--reps", "2"])
    assert run.split_preset(["--reps", "2", "--preset=cpu-goals"]) == ("cpu-goals", ["--reps", "2"])
    assert run.split_preset(["--quick"]) == (None, ["--quick"])
    with pytest.raises(SystemExit, match="unknown preset 'nope'.*cpu-goals"):
        run.main(["--preset", "nope"])
    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    text = capsys.readouterr().out
    for name, preset in presets.PRESETS.items():
        assert name in text
        mod = importlib.import_module(f"benchmarks.presets.{preset.module}")
        assert callable(mod.main)


@pytest.mark.skipif("cpu" not in mk.available_backends(), reason="the cpu-goals preset times the C++ cpu backend")
def test_cpu_goals_preset_table_matches_its_ratios(tmp_path, capsys):
    out_csv = tmp_path / "goals.csv"
    rc = run.main(["--preset", "cpu-goals", "--T", "96", "--d", "48", "--N", "80", "--reps", "1",
                   "--mem-runs", "1", "--threads", "1", "--csv", str(out_csv)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "not the shape the goals are set for" in text
    rows = [ln.split(" | ") for ln in text.splitlines() if re.match(r"\| .* \| [\d.e+-]+ (ms|MiB) vs ", ln)]
    assert len(rows) == 5, text
    thresholds = {">= 2.5x faster": (2.5, True), "<= 1.25x the GEMM": (1.25, False), ">= 4x faster": (4, True),
                  ">= 8x smaller": (8, True), ">= 50x smaller": (50, True)}
    for cells in rows:
        ratio, cpu_ratio, goal, met = cells[2], cells[3], cells[4], cells[5].rstrip(" |")
        r = float(ratio.rstrip("x"))
        assert r > 0 and (cpu_ratio == "-" or float(cpu_ratio.rstrip("x")) > 0)
        limit, higher_is_better = thresholds[goal]
        assert met == ("yes" if (r >= limit if higher_is_better else r <= limit) else "NO"), cells
    # each ratio is the quotient of the two figures it stands for
    # (at the test's tiny shape a memory figure can round to "0 MiB" on screen; its quotient
    # cannot be checked from the printed figures, but the three timing rows always can)
    checked = 0
    for cells in rows:
        a, b = [float(v.split()[0]) for v in cells[1].split(" vs ")]
        if a == 0 or b == 0:
            continue
        want = a / b if "GEMM" in cells[4] else b / a
        assert float(cells[2].rstrip("x")) == pytest.approx(want, rel=0.015, abs=0.006), cells
        checked += 1
    assert checked >= 3, rows
    errs = re.search(r"forward rel\. err vs authors (\S+); train-step gx rel\. err (\S+), keys\.grad (\S+)", text)
    assert errs and all(float(e) < 1e-4 for e in errs.groups())
    with open(out_csv) as f:
        saved = list(csv.DictReader(f))
    assert [r["goal"] for r in saved] == [c[4] for c in rows]
    assert [r["met"] for r in saved] == [str(c[5].rstrip(" |") == "yes") for c in rows]


@pytest.mark.skipif("cpu" not in mk.available_backends(), reason="the cpu-floor preset times the C++ cpu backend")
def test_cpu_floor_preset_prints_every_goal_with_its_verdict(tmp_path, capsys):
    """Every goal of the issue in one run (tiny shapes): one PASS/MISS row each, each ratio
    the quotient of its two figures and each verdict the goal applied to it, the CPU model
    and ISA above the table, the same rows in the CSV."""
    out_csv = tmp_path / "floor.csv"
    assert run.main(["--preset", "cpu-floor", "--tiny", "--reps", "1", "--threads", "1", "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"# CPU: .+, \d+ cores, ISA: .+\(torch dispatch: \w+\)", text), text
    rows = [ln.strip("| ").split(" | ") for ln in text.splitlines() if re.match(r"\| (one-token|clip|fp32|bf16) \|", ln)]
    scored = [r for r in rows if r[4] != "-"]
    assert [r[0] for r in scored] == ["one-token"] * 3 + ["clip"] + ["fp32"] * 3 + ["bf16"] * 3, text
    # the CLIP share, a difference of two best times, takes three rounds per repetition
    assert "best of 3 rounds" in next(r[2] for r in scored if r[0] == "clip"), text
    unit = {"µs": 1e-6, "ms": 1e-3}
    for group, measure, value, ratio, goal, verdict in scored:
        a, b = [float(v.split()[0]) * unit[v.split()[1]] for v in value.split(" (")[0].split(" vs ")]
        r = float(ratio.rstrip("x"))
        limit = float(re.search(r"[\d.]+", goal).group())
        faster = goal.startswith(">=")
        want = b / a if faster else a / b
        assert r == pytest.approx(want, rel=0.02, abs=0.01), (measure, value, ratio)
        assert verdict == ("PASS" if (r >= limit if faster else 0 < r <= limit) else "MISS"), (measure, ratio, goal)
    assert re.search(rf"{sum(r[5] == 'PASS' for r in scored)} of 10 goals met on .+ \(", text)
    # the note on the forward's parts outside its GEMM: the thin call over the same floor
    thin = [r for r in rows if r[1].startswith("forward with d_in=")]
    assert [r[0] for r in thin] == ["fp32", "bf16"], text
    for group, measure, value, ratio, goal, verdict in thin:
        a, b = [float(v.split()[0]) * unit[v.split()[1]] for v in value.split(" vs ")]
        assert float(ratio.rstrip("x")) == pytest.approx(a / b, rel=0.02, abs=0.01), (measure, value, ratio)
        gemm_row = next(r for r in scored if r[0] == group and "fastest torch GEMM" in r[1])
        assert value.split(" vs ")[1] == gemm_row[2].split(" vs ")[1], (value, gemm_row)   # the same floor
    with open(out_csv) as f:
        saved = list(csv.DictReader(f))
    assert [r["measure"] for r in saved] == [r[1] for r in rows]
    assert all(r["cpu"] and r["isa"] for r in saved)
    with pytest.raises(SystemExit):
        run.main(["--preset", "cpu-floor", "--only", "nope"])


def test_every_preset_has_one_help_line_and_its_own_help(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in presets.PRESETS:
        assert len([ln for ln in text.splitlines() if ln.startswith(f"  {name} ")]) == 1, name
    for name in presets.PRESETS:
        with pytest.raises(SystemExit) as e:
            run.main(["--preset", name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks --preset {name} "), name


def test_a_new_competitor_is_one_row(tmp_path, monkeypatch):
    """A row added to the table is timed, checked, written to the CSV and the table, and
    plotted, with nothing else changed."""
    row = competitors.Competitor(
        "lora:R=2r", "LoRA R=2r", "lora", rank=lambda c: 2 * c.r, style=":",
        eval=lambda s, b: competitors._forward(
            s, lambda x: (x @ s.keys[:2 * s.case.r].t()) @ s.values[:2 * s.case.r]),
        train=None)
    monkeypatch.setattr(competitors, "COMPETITORS", competitors.COMPETITORS + [row])
    run.main(["--smoke", "--modes", "eval,train", "--backends", "reference", "--no-compile", "--no-memory",
              "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    (folder,) = glob.glob(str(tmp_path / "*-smoke"))
    mine = [r for r in _read_csv(folder) if r["impl"] == "lora:R=2r"]
    assert mine and all(r["status"] == "ok" and r["mode"] == "eval" for r in mine)
    for r in mine:          # the cost model counts it as a LoRA of rank 2r
        case = Case("N", int(r["d_in"]), int(r["d_out"]), int(r["N"]), int(r["k"]), int(r["T"]), r=int(r["r"]))
        assert float(r["flops"]) == cost_model.work(case, "eval", "lora", 4, rank=2 * case.r)[0]
    md = open(os.path.join(folder, "results.md")).read()
    # its column sits at its row's place in the table, after the others
    assert "| reference | LoRA R=N | LoRA R=r | x@keys.T | base layer | LoRA R=2r | best/floor |" in md
    assert os.path.exists(os.path.join(folder, "time_vs_N.png"))     # plotted with its style


def test_cost_model_is_the_same_for_the_main_job_and_the_gpu_check():
    """The gpu-check plan's rows are the main job's work() at the gpu-check shape (the train
    step there also counts the frozen base layer)."""
    g = cost_model.GPU_CHECK
    rows = {name: (fl, by) for name, _, fl, by in cost_model.plan()}
    for t in (g.t_prefill, *g.t_decode):
        case = Case("gpu", g.d_in, g.d_out, g.n, g.k, t, r=g.r)
        name = "prefill fwd" if t == g.t_prefill else f"decode T={t} fwd"
        assert rows[name] == cost_model.work(case, "eval", "moram", g.elt)
    case = Case("gpu", g.d_in, g.d_out, g.n, g.k, g.t_prefill, r=g.r)
    f, b = cost_model.work(case, "train", "moram", g.elt)
    base_f, base_b = cost_model.work(case, "train", "base", g.elt)
    assert rows["prefill fwd+bwd"] == (f - base_f, b - base_b)
    # the floor is the slower of the two limits
    hw = cost_model.H200
    assert cost_model.floor_s(hw["tc_blas"], 0) == 1.0 and cost_model.floor_s(0, hw["hbm"]) == 1.0
    with pytest.raises(ValueError, match="no cost model"):
        cost_model.work(case, "eval", "bogus", 4)


def test_one_budget_per_measurement_and_for_a_whole_run():
    b = Budget(total_s=100.0)
    assert 99.0 < b.left() <= 100.0 and 0 <= b.elapsed() < 1.0
    assert Budget().left() == float("inf")
    assert run.BUDGETS["smoke"].max_reps <= run.BUDGETS["quick"].max_reps <= run.BUDGETS["full"].max_reps


def test_gpu_check_preset_plans_without_a_gpu():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "gpu-check", "--dry-run"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "benchmarks/cost_model.py" in out.stdout and "prefill fwd+bwd" in out.stdout
    # the extension here has no CUDA kernels: the plan says the cuda backend would not be
    # timed, and how to build it, instead of leaving a column silently missing
    assert "cuda backend: NOT AVAILABLE, so NOT TIMED" in out.stdout and "MORAM_WITH_CUDA=1" in out.stdout


def test_gpu_check_prepares_deterministic_cublas_and_the_cuda_build(monkeypatch, capsys):
    """The GPU check's pytest step runs the deterministic-mode tests, whose cuBLAS GEMMs
    raise unless CUBLAS_WORKSPACE_CONFIG is set; --build compiles the extension with CUDA
    (forced, so a failed build is an error) and reports a failure instead of going on."""
    from benchmarks.presets import gpu_check as gc
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    env = gc.pytest_env()
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["TRITON_INTERPRET"] == "0"
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None     # the parent's env untouched
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw["env"]))
        return subprocess.CompletedProcess(cmd, 1, "", "nvcc: error")
    monkeypatch.setattr(gc.subprocess, "run", fake_run)
    assert gc.build_extension_with_cuda() is False
    (cmd, env), = calls
    assert cmd[1:] == ["setup.py", "build_ext", "--inplace"]
    assert env["MORAM_WITH_CUDA"] == "1" and env["MORAM_FORCE_EXT"] == "1"
    out = capsys.readouterr().out
    assert "FAILED" in out and "nvcc: error" in out
    assert gc.main(["--build"]) == 1                 # a failed build stops the check


def test_triton_compile_check_refuses_the_interpreter():
    env = dict(_env(), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "triton_compile_check.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unset TRITON_INTERPRET" in out.stderr


def test_cpu_isa_names_the_extensions_that_pick_the_roads():
    from benchmarks.hardware import cpu_isa, detect
    spr = "processor: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
    assert cpu_isa(spr) == "avx2 fma avx512 avx512_bf16 avx512_fp16 amx amx_bf16"
    assert cpu_isa("flags : fpu sse2 avx avx2 fma f16c\n") == "avx2 fma"
    assert cpu_isa("flags : fpu sse2\n") == "none"
    hw = detect(torch.device("cpu"))
    assert hw["cpu_isa"] == cpu_isa() and hw["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert ("avx2" in hw["cpu_isa"].split()) == torch.cpu._is_avx2_supported()
    assert ("avx512_bf16" in hw["cpu_isa"].split()) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx" in hw["cpu_isa"].split()) == torch.cpu._is_amx_tile_supported()
    assert hw["cpu_lowp_road"] == "n/a" or hw["cpu_lowp_road"].startswith("bf16:")


def test_the_floor_is_the_fastest_of_torchs_gemms():
    from benchmarks.baselines import fastest_gemm, gemm_variants
    import time as _time
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(9, 13, generator=g), torch.randn(21, 13, generator=g)
    for dt in (torch.float32, torch.bfloat16):
        for name, fn in gemm_variants(keys.to(dt)).items():
            torch.testing.assert_close(fn(x.to(dt)), x.to(dt) @ keys.to(dt).T, msg=name)

    def slow(x):
        _time.sleep(0.004)
        return x @ keys.T
    name, fn = fastest_gemm(x, keys, variants={"slow": slow, "fast": lambda x: x @ keys.T, "slower": slow})
    assert name == "fast"
    # a variant over 4x slower than the quickest at warm-up is dropped after that one call
    calls = {"crawl": 0, "fast": 0}

    def counted(name, f):
        def run(x):
            calls[name] += 1
            return f(x)
        return run
    name, _ = fastest_gemm(x, keys, reps=3, variants={"crawl": counted("crawl", lambda x: (_time.sleep(0.05), x @ keys.T)[1]),
                                                      "fast": counted("fast", lambda x: x @ keys.T)})
    assert name == "fast" and calls == {"crawl": 1, "fast": 4}


def test_dtype_axis_times_each_case_in_each_dtype_against_its_own_floor(tmp_path):
    from benchmarks.baselines import gemm_variants
    from benchmarks.hardware import cpu_isa
    rc = run.main(["--smoke", "--modes", "eval", "--backends", "cpu", "--dtype", "fp32,bf16", "--d", "16",
                   "--N", "40", "--k", "4", "--T", "8", "--no-memory", "--no-plots", "--no-compile",
                   "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    (folder,) = glob.glob(str(tmp_path / "*-smoke"))
    rows = _read_csv(folder)
    impls = {r["impl"] for r in rows}
    assert {(r["impl"], r["dtype"]) for r in rows} == {(i, d) for i in impls for d in ("float32", "bfloat16")}
    names = set(gemm_variants(torch.zeros(1, 1)))
    for r in rows:
        assert r["status"] == "ok", r
        assert r["cpu_isa"] == cpu_isa() and r["cpu"] and r["torch_cpu_capability"]
        assert (r["floor_variant"] in names) if r["impl"] == FLOOR else r["floor_variant"] == ""
        floor = next(f for f in rows if f["impl"] == FLOOR and f["dtype"] == r["dtype"])
        assert float(r["time_vs_floor"]) == pytest.approx(float(r["median_ms"]) / float(floor["median_ms"]))
    md = open(os.path.join(folder, "results.md")).read()
    lines = [ln for ln in md.splitlines() if ln.startswith("| custom ")]
    assert [ln.split(" | ")[5] for ln in lines] == ["fp32", "bf16"]
    assert "float32, bfloat16" in md and cpu_isa() in md


@pytest.mark.skipif("cpu" not in mk.available_backends(), reason="ab_builds times the C++ cpu backend")
def test_ab_builds_times_both_trees_and_prints_each_ratio(capsys):
    """Two builds side by side (here the same tree twice): one row per shape, each ratio the
    quotient of its two times, the CPU above the table; a malformed shape is refused."""
    from benchmarks import ab_builds
    shapes = ["9,40,16,8,4,float32", "9,40,16,8,4,bfloat16"]
    assert ab_builds.main(["--old", ROOT, "--new", ROOT, "--rounds", "1",
                           *[a for s in shapes for a in ("--shape", s)]]) == 0
    text = capsys.readouterr().out
    assert re.search(r"# CPU: .+, \d+ cores, ISA: ", text), text
    rows = [ln.strip("| ").split(" | ") for ln in text.splitlines() if re.match(r"\| \d+, ", ln)]
    assert [r[0] for r in rows] == [s.replace(",", ", ") for s in shapes], text
    for _, old, new, ratio in rows:
        assert float(old) > 0 and float(new) > 0
        assert float(ratio) == pytest.approx(float(new) / float(old), rel=0.02, abs=0.011), rows
    with pytest.raises(SystemExit):
        ab_builds.main(["--old", ROOT, "--shape", "9,40,16,8,4,int8"])
