"""One prepared check for a machine with a CUDA GPU (about 4 minutes on an H100/H200).

    python -m benchmarks --preset gpu-check            # warm-up, parity, timings, pytest; table last
    python -m benchmarks --preset gpu-check --dry-run  # the plan, the FLOP/byte model, the predictions
    python -m benchmarks --preset gpu-check --no-pytest --csv out.csv --budget 200
    python benchmarks/gpu_check.py [same options]      # the same check, as a script

0. Warm-up: every backend runs once at every shape class (prefill forward, forward +
   backward, decode T in {1, 16, 64}), so first-time Triton compiles (about 70 variants
   took 111 s on a shared CPU) are paid before any timing and never inside one.
1. Parity on the GPU: an inline check of every available backend against the reference
   at realistic sizes (forward and backward).
2. Timings with ``triton.testing.do_bench`` at d_in = d_out = 4096, N = 16384, k = 16,
   bf16: T = 4096 forward and forward+backward (training layout: a frozen bank plus 16
   trainable atoms, gram of the bank cached in bf16), and decode T in {1, 16, 64}.
   Baselines: the authors' dense path (``reference.moram_dense``), ``torch.compile`` of it,
   and a bare cuBLAS ``x @ keys.T``. Every backend of ``mk.available_backends()`` is timed,
   each row printed as soon as it is measured, beside the prediction of the cost model
   (``benchmarks/cost_model.py``: FLOPs, bytes, floors and predicted times).
3. ``tests/backends/triton/test_triton_interpret.py`` with the interpreter off (its cases then run on CUDA
   tensors), in whatever time is left.

Every phase has a time budget inside ``--budget`` seconds (default 230; one
``benchmarks.timing.Budget`` shared out between the phases). A phase that runs
out, a timing that raises or a pytest that times out is reported and the check goes on,
so one slow compile cannot cost the timings; the exit code is non-zero if anything failed
or was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
import time

from ..cost_model import (GPU_CHECK, H200, SCAN_EFF, floor_s, forward_bytes, forward_flops, plan,
                          predict_ms)
from ..timing import Budget

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

S = GPU_CHECK
D_IN, D_OUT, N_ATOMS, R_TRAIN, K, TAU = S.d_in, S.d_out, S.n, S.r, S.k, S.tau
T_PREFILL, T_DECODE = S.t_prefill, S.t_decode


def fwd_flops(t: int) -> float:
    return forward_flops(t, D_IN, D_OUT, N_ATOMS, K)


def fwd_bytes(t: int) -> float:
    return forward_bytes(t, D_IN, D_OUT, N_ATOMS, K, S.elt)


def print_plan(backends):
    print(f"shape: d_in = d_out = {D_IN}, N = {N_ATOMS} (of which {R_TRAIN} trainable in fwd+bwd), "
          f"k = {K}, tau = {TAU}, bf16")
    print(f"backends timed: {', '.join(backends)}; baselines: authors (moram_dense), "
          f"torch.compile(moram_dense), cuBLAS x @ keys.T")
    hw = H200
    print(f"cost model (benchmarks/cost_model.py, H200): {hw['tc_blas'] / 1e12:.0f} TFLOP/s cuBLAS bf16, "
          f"{hw['tc_peak'] / 1e12:.0f} peak, Triton scan at {SCAN_EFF:.0%} of peak + simulated merges, "
          f"{hw['hbm'] / 1e12:.1f} TB/s HBM, {hw['launch_s'] * 1e6:.0f} us per eager launch")
    print(f"{'case':22s} {'T':>5s} {'GFLOP':>9s} {'MB':>8s} {'FLOP/B':>7s} {'floor ms':>9s}  predicted ms")
    for name, t, fl, by in plan():
        floor = 1e3 * floor_s(fl, by, hw)
        pred = []
        for impl in ("cuBLAS x@keys.T", "authors", *[b.split()[0] for b in backends]):
            ms = predict_ms(name, impl, t)
            if ms is not None:
                pred.append(f"{impl.split()[0]} {ms:.3f}")
        print(f"{name:22s} {t:>5d} {fl / 1e9:>9.2f} {by / 1e6:>8.1f} {fl / by:>7.0f} {floor:>9.3f}  "
              + ", ".join(pred))


# ---- GPU parts ------------------------------------------------------------------------------

#: cuBLAS refuses GEMMs under ``torch.use_deterministic_algorithms(True)`` unless this is set
#: before its first handle is made (the deterministic tests run such GEMMs)
CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

#: how to get the cuda backend where the extension was built without CUDA
CUDA_BUILD = "MORAM_FORCE_EXT=1 MORAM_WITH_CUDA=1 pip install --no-build-isolation -e ."


def pytest_env() -> dict:
    """The environment of the pytest step: the interpreter off (the cases run on CUDA
    tensors), cuBLAS in its deterministic-capable mode, this checkout first on the path."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k, v in CUBLAS_DETERMINISTIC.items():
        env.setdefault(k, v)
    return env


def cuda_backend_line(mk) -> tuple[bool, str]:
    """``(available, line)``: whether the compiled cuda backend can be timed here, and a line
    that says so, or says why not and how to build it (it is easy to miss otherwise: the
    other backends run and the table simply has no cuda column)."""
    from moram_kernels import backends as _dispatch
    why = _dispatch.why_unavailable("cuda")
    if why is None:
        return True, "cuda backend: available (the extension was built with CUDA)"
    return False, (f"cuda backend: NOT AVAILABLE, so NOT TIMED: {why}. Build the extension with CUDA "
                   f"first: {CUDA_BUILD} (or rerun this check with --build)")


def build_extension_with_cuda(timeout_s: float = 420.0) -> bool:
    """Build ``moram_kernels._C`` in place with the CUDA kernels (before the package is
    imported); False, reported, if the build fails or times out."""
    env = dict(os.environ, MORAM_FORCE_EXT="1", MORAM_WITH_CUDA="1")
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    print("$ MORAM_FORCE_EXT=1 MORAM_WITH_CUDA=1", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"extension build TIMED OUT after {timeout_s:.0f} s", flush=True)
        return False
    if r.returncode:
        print(f"extension build FAILED (exit {r.returncode}):\n{r.stderr[-3000:]}", flush=True)
        return False
    print(f"extension built with CUDA in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def run_pytest(timeout_s):
    """The interpreter test file on CUDA tensors; False (reported) on failure or timeout."""
    if timeout_s < 20:
        print(f"pytest skipped: {timeout_s:.0f} s left in the budget", flush=True)
        return False
    env = pytest_env()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", os.path.join(ROOT, "tests", "backends", "triton", "test_triton_interpret.py"),
           "-p", "no:cacheprovider"]
    print("$", " ".join(cmd), f"(timeout {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"pytest TIMED OUT after {time.perf_counter() - t0:.0f} s", flush=True)
        return False
    print(f"pytest exit {r.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    return r.returncode == 0


PARITY_CASES = (  # T, d_in, N0, N1, k, dtype name
    (256, 512, 3000, 16, 16, "bfloat16"), (1, 4096, 16384, 0, 16, "bfloat16"),
    (77, 97, 500, 33, 8, "float32"), (64, 256, 1000, 8, 64, "float16"))
SMOKE_CASES = ((5, 24, 40, 8, 4, "float32"), (3, 16, 30, 0, 8, "bfloat16"))


def inline_parity(mk, ref, torch, backends, dev="cuda", cases=PARITY_CASES):
    """Each backend against the reference (fp32 math) on ``dev`` tensors; returns failures."""
    from moram_kernels import backends as _dispatch
    g = torch.Generator(device=dev).manual_seed(0)
    fails = []
    for t, d, n0, n1, k, dn in cases:
        dt = getattr(torch, dn)
        x = torch.randn(t, d, device=dev, generator=g).to(dt)
        keys = (torch.randn(n0 + n1, d, device=dev, generator=g) / d**0.5).to(dt)
        values = torch.randn(n0 + n1, 64, device=dev, generator=g).to(dt)
        sc1 = torch.full((n1,), 2.0, device=dev)
        segs = (keys[:n0], values[:n0], None, keys[n0:], values[n0:], sc1)
        kk = ref.effective_k(k, n0 + n1)
        want = ref.moram_fwd(x, *segs, kk, TAU, 0.0, 1e-12)
        gy = torch.randn(t, 64, device=dev, generator=g).to(dt)
        gram0 = ref.gram(keys[:n0])
        for b in backends:
            impl = _dispatch._BY_NAME[b].impl()
            y, idx, p_sel, norm = impl.moram_fwd(x, *segs, kk, TAU, 0.0, 1e-12)
            # compare only tokens whose K-th and (K+1)-th scores are clearly apart
            p = x.float() @ keys.float().t()
            if kk < n0 + n1:
                top = p.topk(kk + 1, -1).values
                ok = (top[:, kk - 1] - top[:, kk]) > 1e-2 * p.abs().amax(-1)
            else:
                ok = torch.ones(t, dtype=torch.bool, device=dev)
            same = (idx.sort(1).values == want[1].sort(1).values).all(1)
            tol = 2e-2 if dt != torch.float32 else 1e-4
            scale = want[0].float().abs().max().clamp_min(1e-6)
            err = ((y.float() - want[0].float()).abs().amax(-1)[ok] / scale).max().item() if ok.any() else 0.0
            bad = (~same & ok).sum().item()
            need = (True, False, n1 > 0)
            gw = ref.moram_bwd(gy, x, *segs, gram0, *want[1:], TAU, 0.0, 1e-12, *need)
            gg = impl.moram_bwd(gy, x, *segs, gram0, *want[1:], TAU, 0.0, 1e-12, *need)
            gerr = max(((a.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)).item()
                       for a, w in zip(gg, gw) if w is not None and w.numel())
            status = "ok" if (bad == 0 and err <= tol and gerr <= 2 * tol) else "FAIL"
            print(f"parity {b:8s} T={t:<4d} d={d:<4d} N={n0}+{n1} K={kk:<2d} {str(dt)[6:]:8s} "
                  f"fwd err {err:.2e}, top-K mismatches {bad}, bwd err {gerr:.2e}: {status}", flush=True)
            if status != "ok":
                fails.append((b, t, d, n0, n1, kk, dt))
    return fails


def print_table(rows, peak_tflops, peak_gbs):
    """The short table: each row against the authors' path and cuBLAS of the same case
    (CUDA-graph rows against CUDA-graph rows)."""
    print(f"ceilings: {peak_tflops:.0f} TFLOP/s bf16 GEMM, {peak_gbs:.0f} GB/s copy")
    print(f"{'case':18s} {'impl':24s} {'ms':>8s} {'TFLOP/s':>8s} {'%GEMM':>6s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'vs authors':>10s} {'vs cuBLAS':>9s}")
    for r in rows:
        graph = r["impl"].endswith("(graph)")     # compare graphs with graphs, eager with eager
        same = [q for q in rows if q["case"] == r["case"] and q["impl"].endswith("(graph)") == graph]
        base = next((q["ms"] for q in same if q["impl"].startswith("authors")
                     and "compile" not in q["impl"]), None)
        blas = next((q["ms"] for q in same if q["impl"].startswith("cuBLAS")), None)
        print(f"{r['case']:18s} {r['impl']:24s} {r['ms']:8.3f} {r['tflops']:8.1f} "
              f"{100 * r['tflops'] / peak_tflops:5.0f}% {r['gbs']:7.0f} {100 * r['gbs'] / peak_gbs:5.0f}% "
              f"{(base / r['ms']) if base else float('nan'):9.2f}x {(r['ms'] / blas) if blas else float('nan'):8.2f}x")


def gpu_backends(mk, torch, only_available=True):
    """Backends that take bf16 CUDA tensors at the benchmark shape (not "cpu"), best first;
    only those usable on this machine unless ``only_available`` is False."""
    from moram_kernels import backends as _dispatch
    inp = _dispatch.Inputs(torch.device("cuda"), torch.bfloat16, torch.bfloat16, torch.bfloat16,
                           D_IN, D_OUT, N_ATOMS, K)
    names = mk.available_backends() if only_available else _dispatch.NAMES
    return [b for b in names if b != "reference" and not _dispatch._BY_NAME[b].refuses(inp, True)]


def bench(args):
    import torch
    import triton

    import moram_kernels as mk
    from moram_kernels.backends import reference as ref
    from moram_kernels.functional import moram_segments

    budget = Budget(total_s=args.budget)
    backends = gpu_backends(mk, torch)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"backends {mk.available_backends()}, budget {args.budget:.0f} s", flush=True)
    print_plan(backends)
    have_cuda, line = cuda_backend_line(mk)
    print(line, flush=True)
    ok = have_cuda
    dev, dt = "cuda", torch.bfloat16
    do_bench = triton.testing.do_bench
    torch.manual_seed(0)
    keys = (torch.randn(N_ATOMS, D_IN, device=dev) / D_IN**0.5).to(dt)
    values = (torch.randn(N_ATOMS, D_OUT, device=dev) * 0.02).to(dt)
    n0 = N_ATOMS - R_TRAIN
    k0, v0 = keys[:n0], values[:n0]
    k1 = keys[n0:].clone().requires_grad_()
    v1 = values[n0:].clone().requires_grad_()
    sc1 = torch.full((R_TRAIN,), 2.0, device=dev)
    gram0 = ref.gram(k0).to(dt)        # cached in the compute dtype, as MoRAMLinear keeps it
    xs = {t: torch.randn(t, D_IN, device=dev).to(dt) for t in (T_PREFILL, *T_DECODE)}
    xg = xs[T_PREFILL].clone().requires_grad_()
    gy = torch.randn(T_PREFILL, D_OUT, device=dev).to(dt)

    def ours_step(b):
        def step():
            y, _ = moram_segments(xg, k0, v0, None, k1, v1, sc1, k=K, tau=TAU, delta=0.0, eps=1e-12,
                                  gram0=gram0, backend=b)
            torch.autograd.grad(y, (xg, k1, v1), gy)
        return step

    # 0. warm-up: first-time compiles of every shape class, outside any timing
    warm_end = budget.elapsed() + 0.4 * budget.left()
    for b in backends:
        for what, fn in [("prefill fwd", lambda b=b: mk.moram(xs[T_PREFILL], keys, values, k=K, tau=TAU, backend=b)),
                         ("prefill fwd+bwd", ours_step(b))] + \
                        [(f"decode T={t}", lambda b=b, t=t: mk.moram(xs[t], keys, values, k=K, tau=TAU, backend=b))
                         for t in T_DECODE]:
            if budget.elapsed() > warm_end:
                print(f"warm-up {b} {what}: skipped, warm-up budget spent", flush=True)
                ok = False
                continue
            t0 = time.perf_counter()
            try:
                with torch.no_grad() if "bwd" not in what else contextlib.nullcontext():
                    fn()
                torch.cuda.synchronize()
                print(f"warm-up {b:8s} {what:16s} {time.perf_counter() - t0:6.1f} s", flush=True)
            except Exception as e:   # reported, counted as a failure, and the check goes on
                ok = False
                print(f"warm-up {b:8s} {what:16s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)

    # 1. parity at realistic sizes
    if budget.left() > 60:
        try:
            fails = inline_parity(mk, ref, torch, backends)
        except Exception as e:
            fails = [str(e)]
            print(f"parity FAILED with {type(e).__name__}: {str(e)[:300]}", flush=True)
        ok &= not fails
    else:
        print("parity skipped: budget", flush=True)
        ok = False
    print(f"parity done at {budget.elapsed():.0f} s", flush=True)

    rows = []
    peak_tflops, peak_gbs = H200["tc_blas"] / 1e12, H200["hbm"] / 1e9
    try:   # ceilings measured here: a large bf16 GEMM and a device copy
        a = torch.randn(8192, 8192, device=dev, dtype=dt)
        ms = do_bench(lambda: a @ a, warmup=25, rep=100)
        peak_tflops = 2 * 8192**3 / ms / 1e9
        big = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
        ms = do_bench(lambda: big.clone(), warmup=10, rep=50)
        peak_gbs = 2 * big.numel() / ms / 1e6
        del a, big
        print(f"ceilings here: bf16 GEMM {peak_tflops:.0f} TFLOP/s, copy {peak_gbs:.0f} GB/s", flush=True)
    except Exception as e:
        print(f"ceilings not measured ({type(e).__name__}: {e}); the model's are used", flush=True)

    reserve = 45 if not args.no_pytest else 5      # seconds kept for pytest at the end
    skipped = []

    def record(case, name, fn, fl, by, graph=False):
        nonlocal ok
        if budget.left() < reserve:
            skipped.append(f"{case} / {name}")
            return
        try:
            ms = triton.testing.do_bench_cudagraph(fn) if graph else do_bench(fn, rep=50)
        except Exception as e:   # one row that cannot run must not cost the others
            if not graph:
                ok = False
            print(f"{case:22s} {name:22s} {'not capturable' if graph else 'FAILED'}: {type(e).__name__}: "
                  f"{str(e)[:200]}", flush=True)
            return
        t = int(case.split("T=")[1].split()[0]) if "T=" in case else T_PREFILL
        pred = None if graph else predict_ms(case, name, t)
        rows.append(dict(case=case, impl=name, ms=ms, tflops=fl / ms / 1e9, gbs=by / ms / 1e6,
                         predicted_ms=pred if pred is not None else float("nan")))
        print(f"{case:22s} {name:22s} {ms:9.3f} ms {fl / ms / 1e9:8.1f} TFLOP/s {by / ms / 1e6:8.0f} GB/s"
              + (f"   model {pred:.3f} ms" if pred is not None else ""), flush=True)

    dense_c = torch.compile(ref.moram_dense)

    # 2a. decode first: it is what the model is least sure of, and quick
    with torch.no_grad():
        for t in T_DECODE:
            x = xs[t]
            case = f"decode T={t} fwd"
            fl, by = fwd_flops(t), fwd_bytes(t)
            impls = [("cuBLAS x@keys.T", lambda x=x: x @ keys.t(), 2 * t * N_ATOMS * D_IN),
                     ("authors", lambda x=x: ref.moram_dense(x, keys, values, k=K, tau=TAU), fl)]
            impls += [(b, (lambda b=b, x=x: mk.moram(x, keys, values, k=K, tau=TAU, backend=b)), fl)
                      for b in backends]
            for name, fn, f in impls:
                record(case, name, fn, f, by)
                # decode is launch-bound in eager mode; a CUDA graph shows the GPU time alone
                record(case, name + " (graph)", fn, f, by, graph=True)

    # 2b. prefill forward
    t = T_PREFILL
    x = xs[t]
    fl, by = fwd_flops(t), fwd_bytes(t)
    with torch.no_grad():
        record("prefill fwd", "cuBLAS x@keys.T", lambda: x @ keys.t(), 2 * t * N_ATOMS * D_IN, by)
        for b in backends:
            record("prefill fwd", b, lambda b=b: mk.moram(x, keys, values, k=K, tau=TAU, backend=b), fl, by)
        record("prefill fwd", "authors", lambda: ref.moram_dense(x, keys, values, k=K, tau=TAU), fl, by)
        record("prefill fwd", "authors+compile", lambda: dense_c(x, keys, values, k=K, tau=TAU), fl, by)

    # 2c. prefill forward + backward, training layout: frozen bank + R_TRAIN trainable atoms
    _, _, fl, by = next(row for row in plan() if row[0] == "prefill fwd+bwd")
    scale_all = torch.cat([torch.ones(n0, device=dev), sc1])

    def authors_step(fn):
        def step():
            kk_ = torch.cat([k0, k1])                 # the authors concatenate old and new atoms
            vv_ = torch.cat([v0, v1])
            y = fn(xg, kk_, vv_, k=K, tau=TAU, value_scale=scale_all)
            torch.autograd.grad(y, (xg, k1, v1), gy)
        return step

    for b in backends:
        record("prefill fwd+bwd", b, ours_step(b), fl, by)
    record("prefill fwd+bwd", "authors", authors_step(ref.moram_dense), fl, by)
    record("prefill fwd+bwd", "authors+compile", authors_step(dense_c), fl, by)
    if skipped:
        ok = False
        print(f"{len(skipped)} timings skipped for the budget: {'; '.join(skipped)}", flush=True)
    print(f"timings done at {budget.elapsed():.0f} s", flush=True)

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "impl", "ms", "predicted_ms", "tflops", "gbs", "gpu",
                                              "torch", "triton", "when"])
            w.writeheader()
            meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            for r in rows:
                w.writerow({**r, **meta})

    # 3. the interpreter tests on CUDA tensors, in what is left
    if not args.no_pytest:
        ok &= run_pytest(budget.left() - 5)

    print()
    print(f"check {'passed' if ok else 'FAILED (see above)'} in {budget.elapsed():.0f} s")
    print_table(rows, peak_tflops, peak_gbs)
    return 0 if ok else 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the FLOP/byte model, run nothing")
    ap.add_argument("--no-pytest", action="store_true", help="skip the pytest part of the parity check")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--budget", type=float, default=230.0,
                    help="wall-clock seconds for the whole check (default 230: a lent GPU gives a few minutes)")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: run the inline parity check on tiny CPU cases under TRITON_INTERPRET=1")
    ap.add_argument("--build", action="store_true",
                    help="first build the C++ extension in place with the CUDA kernels (a few minutes)")
    args = ap.parse_args(argv)
    for k, v in CUBLAS_DETERMINISTIC.items():     # before the first cuBLAS handle
        os.environ.setdefault(k, v)
    if args.build and not (args.smoke or args.dry_run) and not build_extension_with_cuda():
        return 1
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import torch

        import moram_kernels as mk
        from moram_kernels.backends import reference as ref
        backends = [b for b in mk.available_backends() if b != "reference"] + ["reference"]
        return 1 if inline_parity(mk, ref, torch, backends, dev="cpu", cases=SMOKE_CASES) else 0
    if args.dry_run:
        import torch

        import moram_kernels as mk
        print_plan([f"{b} (if available there)" for b in gpu_backends(mk, torch, only_available=False)])
        print(cuda_backend_line(mk)[1])
        return 0
    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run, or run this on a GPU machine", file=sys.stderr)
        return 2
    return bench(args)

