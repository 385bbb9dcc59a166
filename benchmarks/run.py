"""``python -m benchmarks``: every competitor of ``benchmarks/competitors.py`` (each
available moram backend, the authors' layer, ``torch.compile`` of it, LoRA and the bare
scoring GEMM) on this machine, in eval and train mode; ``--preset NAME`` runs one of the
focused presets of ``benchmarks/presets/`` instead."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch

import moram_kernels as mk

from . import grid, presets, report
from .competitors import AUTHORS, FLOOR, Competitor, Setup, entries, rel_err
from .cost_model import dense_flops, work
from .hardware import detect
from .presets import split_preset
from .timing import Budget, PeakMemory, TooSlow, time_cpu, time_cuda

BUDGETS = {
    "full": Budget(warmup=2, min_reps=5, max_reps=50, seconds=0.5),
    "quick": Budget(warmup=1, min_reps=3, max_reps=15, seconds=0.12),
    "smoke": Budget(warmup=1, min_reps=2, max_reps=3, seconds=0.0),
}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _dtypes(s: str) -> list[torch.dtype]:
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in names if v not in DTYPE_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad or [s]}; use {', '.join(DTYPE_NAMES)}")
    return list(dict.fromkeys(DTYPE_NAMES[v] for v in names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=presets.listing())
    p.add_argument("--preset", choices=list(presets.PRESETS), default=None,
                   help="run a preset instead of the grid; the options after it are the preset's own")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid, under a minute on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="a tiny grid that only checks the harness runs")
    p.add_argument("--modes", default="eval,train", help="comma list of: eval (forward), train (fwd + bwd)")
    p.add_argument("--backends", default=None,
                   help="comma list (default: every available backend; the Triton interpreter is never timed)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, type=_dtypes,
                   help="comma list of fp32, bf16, fp16 (or float32, bfloat16, float16): each case is timed "
                        "in each, interleaved, against the fastest torch GEMM of the same dtype "
                        "(default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--d", type=_ints, default=None, help="custom grid: widths, e.g. 768,4096")
    p.add_argument("--N", type=_ints, default=None, help="custom grid: atom counts")
    p.add_argument("--k", type=_ints, default=None, help="custom grid: k values")
    p.add_argument("--T", type=_ints, default=None, help="custom grid: token counts")
    p.add_argument("--r", type=int, default=16, help="custom grid: trainable atoms in the train step")
    p.add_argument("--compile", default=None, choices=["all", "eval", "none"],
                   help="modes in which to time torch.compile of the authors' layer (default: all; "
                        "eval with --quick, whose budget a cold compile of the train step would break)")
    p.add_argument("--no-compile", action="store_true", help="same as --compile none")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--max-dense-gb", type=float, default=2.0,
                   help="skip an implementation whose [T, N] fp32 tensors would exceed this (default 2)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip an implementation estimated or measured slower than this per call")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="results folder (default benchmarks/results/); a timestamped subfolder is made")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.command = " ".join(["python -m benchmarks"] + list(sys.argv[1:] if argv is None else argv))
    args.size = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.max_call_s is None:
        args.max_call_s = {"full": 20.0, "quick": 5.0, "smoke": 5.0}[args.size]
    if args.no_compile:
        args.compile = "none"
    elif args.compile is None:
        args.compile = "eval" if args.size == "quick" else "all"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("eval", "train")]
    if bad:
        p.error(f"--modes: unknown mode(s) {bad}; use eval and/or train")
    return args


def choose_backends(requested: str | None, device: torch.device) -> tuple[list[str], list[str]]:
    """(backends to time, lines saying why others are not timed)."""
    avail = mk.available_backends()
    notes = []
    if requested:
        names = [b.strip() for b in requested.split(",") if b.strip()]
        for b in names:
            if b not in avail:
                raise SystemExit(f"--backends: {b!r} is not available here (available: {', '.join(avail)})")
    else:
        names = list(avail)
    if device.type == "cpu" and "triton" in names:
        names.remove("triton")
        notes.append("triton: not timed on CPU (TRITON_INTERPRET runs an interpreter, for tests only)")
    if device.type == "cuda" and "cpu" in names:
        names.remove("cpu")
        notes.append("cpu: not timed, the inputs are on CUDA")
    for b in ("triton", "cuda", "cpu"):
        if b not in avail:
            from moram_kernels import backends as _dispatch
            notes.append(f"{b}: unavailable ({_dispatch.why_unavailable(b)})")
    return names, notes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def refusal(case, s: Setup, backend: str) -> str | None:
    """Why the dispatch table would refuse this backend for these inputs, if it would."""
    from moram_kernels import backends as _dispatch
    inp = _dispatch.Inputs(s.device, s.dtype, s.dtype, s.dtype, case.d_in, case.d_out, case.n, case.kk)
    reasons = _dispatch._BY_NAME[backend].refuses(inp, True)
    return "; ".join(reasons) if reasons else None


def timed_in(mode: str, backends: list[str], compile: bool) -> list[Competitor]:
    """The competitors of ``mode`` in timing order: the floor first (its rate predicts the
    others' time), then the table's order (the authors' layer before the backends it checks)."""
    return sorted(entries(backends, compile, mode), key=lambda c: c.kind != "floor")


def bench_case(case, mode, setup: Setup, backends, args, device, dtype, timer, budget, pbar) -> list[dict]:
    rows: list[dict] = []
    floor_rate = None           # FLOP/s of the bare GEMM, to predict slow implementations
    ref_out = None
    elem = torch.empty(0, dtype=dtype).element_size()
    for comp in timed_in(mode, backends, args.compile != "none"):
        impl = comp.build(mode, setup)
        pbar.set_postfix_str(f"{mode} {case.label()} {comp.name}", refresh=True)
        flops, nbytes = work(case, mode, comp.kind, elem, comp.lora_rank(case))
        row = dict(mode=mode, sweep=case.sweep, d_in=case.d_in, d_out=case.d_out, N=case.n, k=case.k,
                   K=case.kk, T=case.t, r=case.r, tau=case.tau, delta=case.delta if mode == "eval" else 0.0,
                   dtype=_dtype_name(dtype), impl=comp.name, status="ok", reason="",
                   flops=flops, bytes=nbytes)
        rows.append(row)
        if comp.compiled and args.compile not in ("all", mode):
            row.update(status="skipped", reason=f"torch.compile not timed in {mode} mode (--compile {args.compile}; "
                                                "a cold compile of the train step takes tens of seconds on 2 cores)")
            pbar.update(1)
            continue
        why = refusal(case, setup, comp.backend) if comp.backend else None
        if why:
            row.update(status="skipped", reason=f"{comp.backend} refuses these inputs: {why}")
            pbar.update(1)
            continue
        gb = impl.dense_tn * case.t * case.n * 4 / 1e9
        if gb > args.max_dense_gb:
            row.update(status="skipped", reason=f"would hold ~{gb:.1f} GB of [T, N] fp32 tensors "
                                                f"(> --max-dense-gb {args.max_dense_gb:g})")
            pbar.update(1)
            continue
        if floor_rate and comp.kind != "floor":
            est = max(flops, dense_flops(case, mode) if impl.dense_tn >= 2 else 0) / floor_rate
            if est > args.max_call_s:
                row.update(status="skipped", reason=f"estimated {est:.0f} s per call at the GEMM floor's "
                                                    f"rate (> --max-call-s {args.max_call_s:g})")
                pbar.update(1)
                continue
        try:
            if comp.compiled:       # compile (and recompile for this shape) outside the timing
                t0 = time.perf_counter()
                impl.run()
                _sync(device)
                row["compile_s"] = round(time.perf_counter() - t0, 2)
            out = impl.output()
            if comp.name == AUTHORS:
                ref_out = out
            elif comp.kind == "moram" and ref_out is not None:
                row["max_rel_err"] = rel_err(out, ref_out)
            del out
            timing = timer(impl.run, budget, args.max_call_s)
            if mode == "train" and impl.saved is not None:
                row["saved_bwd_mb"] = impl.saved() / 2**20
        except TooSlow as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # a failed baseline (e.g. compile) is a result, not a crash
            row.update(status="failed", reason=_short(e))
        else:
            med = timing.median
            row.update(median_ms=med, q25_ms=timing.quantile(0.25), q75_ms=timing.quantile(0.75),
                       min_ms=min(timing.times_ms), max_ms=max(timing.times_ms), reps=len(timing.times_ms),
                       gflops=flops / med / 1e6, gbs=nbytes / med / 1e6)
            if comp.kind == "floor":
                floor_rate = flops / (med / 1e3)
                row["floor_variant"] = impl.variant
        pbar.update(1)
    by = {r["impl"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if AUTHORS in by:
            r["speedup_vs_authors"] = by[AUTHORS]["median_ms"] / r["median_ms"]
        if FLOOR in by:
            r["time_vs_floor"] = r["median_ms"] / by[FLOOR]["median_ms"]
    return rows


def memory_pass(cases, args, backends, device, dtypes, rows, pbar) -> str | None:
    """Peak memory of one call of every implementation that was timed (after all timing)."""
    mem = PeakMemory(device)
    mem.prepare_cpu()
    if mem.why_not:
        return mem.why_not
    gc.collect()
    gc.freeze()     # later collections skip the (many) objects torch and compile created
    try:
        _measure_all(mem, cases, args, backends, device, dtypes, rows, pbar)
    finally:
        # Frozen objects are never collected, not even at exit: extension objects kept alive
        # by a cycle then outlive their module, and nanobind-based libraries (triton >= 3.7,
        # imported by torch.compile) print hundreds of "nanobind: leaked" lines at exit.
        gc.unfreeze()
    return None


def _measure_all(mem, cases, args, backends, device, dtypes, rows, pbar) -> None:
    ok = {(r["mode"], r["d_in"], r["N"], r["k"], r["T"], r["r"], r["tau"], r["dtype"], r["impl"]): r
          for r in rows if r["status"] == "ok"}
    for case in cases:
        for dt in dtypes:
            setup = Setup(case, device, dt, seed=args.seed)
            for mode in args.modes:
                for comp in timed_in(mode, backends, args.compile != "none"):
                    r = ok.get((mode, case.d_in, case.n, case.k, case.t, case.r, case.tau, _dtype_name(dt),
                                comp.name))
                    if r is None:
                        continue
                    pbar.set_postfix_str(f"memory {mode} {case.label()} {comp.name}", refresh=True)
                    try:
                        r["peak_mem_mb"] = mem.measure(comp.build(mode, setup).run) / 2**20
                    except Exception as e:
                        r["peak_mem_note"] = _short(e)
                    pbar.update(1)
            del setup
            gc.collect()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = split_preset(argv)
    if name is not None:
        return presets.run(name, rest)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = args.dtype or [torch.bfloat16 if device.type == "cuda" else torch.float32]
    backends, notes = choose_backends(args.backends, device)
    if any(v is not None for v in (args.d, args.N, args.k, args.T)):
        cases = grid.custom(args.d or [768], args.N or [4096], args.k or [16], args.T or [256], args.r)
    else:
        cases = {"full": grid.full, "quick": grid.quick, "smoke": grid.smoke}[args.size]()
    budget = BUDGETS[args.size]
    timer = time_cuda if device.type == "cuda" else time_cpu
    hw = detect(device)
    warnings.filterwarnings("ignore", message=".*TF32.*")

    from tqdm.auto import tqdm
    total = len(cases) * len(dtypes) * sum(len(timed_in(m, backends, args.compile != "none")) for m in args.modes)
    rows: list[dict] = []
    t_start = time.perf_counter()
    with tqdm(total=total, desc="timing", unit="run", file=sys.stderr, disable=args.no_progress) as pbar:
        for case in cases:          # dtypes innermost: a case's dtypes are timed side by side
            for dt in dtypes:
                setup = Setup(case, device, dt, seed=args.seed)
                for mode in args.modes:
                    rows += bench_case(case, mode, setup, backends, args, device, dt, timer, budget, pbar)
                del setup
                gc.collect()
    mem_note = "disabled (--no-memory)"
    if not args.no_memory:
        n_ok = sum(r["status"] == "ok" for r in rows)
        with tqdm(total=n_ok, desc="memory", unit="run", file=sys.stderr, disable=args.no_progress) as pbar:
            why = memory_pass(cases, args, backends, device, dtypes, rows, pbar)
        mem_note = why or ("peak RSS growth of one call (VmHWM)" if device.type == "cpu"
                           else "torch.cuda.max_memory_allocated growth of one call")
    for r in rows:
        r.update(hw)
    elapsed = time.perf_counter() - t_start
    paths = report.write_all(rows, hw, args, notes, mem_note, elapsed)
    print(paths["markdown_text"])
    print(f"\nWrote {paths['csv']}")
    print(f"      {paths['md']}")
    for p in paths["plots"]:
        print(f"      {p}")
    if paths["plot_note"]:
        print(paths["plot_note"])
    return 0
