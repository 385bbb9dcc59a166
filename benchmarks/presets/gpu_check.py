"""One prepared check for a machine with a CUDA GPU (about 5 minutes on an H100/H200).

    python -m benchmarks --preset gpu-check --build    # cuda built first, then the check; table last
    python -m benchmarks --preset gpu-check --dry-run  # the plan, the model, the timings rehearsed
    python -m benchmarks --preset gpu-check --no-pytest --csv out.csv --budget 200
    python benchmarks/gpu_check.py [same options]      # the same check, as a script

It times the four tracked GPU rows (:data:`ROWS`: prefill forward and forward + backward at
T = 4096, N = 16,384; decode T = 1 at N = 1,024 under a CUDA graph and at N = 65,536),
d_in = d_out = 4096, k = 16, bf16, for every implementation (:func:`plan_jobs`): cuBLAS
``x @ keys.T``, the authors' dense path, the cuda backend, the triton backend as users get
it, each forward route ``MORAM_TRITON_FWD`` in ``forward.FWD_ROUTES`` (the routes this
checkout lacks are printed as skipped, with the reason) and each backward variant
``MORAM_TRITON_BWD``. Each line shows the cost model's prediction
(``benchmarks/cost_model.py``, ``predict_ms``) and measured / predicted.

0. Warm-up: every job's call once, so first-time Triton compiles are paid before any
   timing and never inside one.
1. Parity on the GPU: every available backend against the reference at realistic sizes
   (forward and backward), then the other triton variants.
2. Timings (``triton.testing.do_bench``; ``do_bench_cudagraph`` for graph lines).
3. The Triton test files (:data:`PYTEST_FILES`) with the interpreter off (their cases then
   run on CUDA tensors), in whatever time is left.

``--budget`` seconds (default 300) are shared out between the sections
(:data:`SECTIONS`, printed first; a section's unused time passes on). A section that runs
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
from dataclasses import dataclass, replace

from ..cost_model import (GPU_CHECK, H200, backward_bytes, backward_flops, floor_s, forward_bytes, forward_flops,
                          predict_ms)
from ..cost_model import plan  # noqa: F401  (re-exported: the tests read gpu_check.plan)
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
    print(f"shape: d_in = d_out = {D_IN}, N per row (of which {R_TRAIN} trainable in fwd+bwd), "
          f"k = {K}, tau = {TAU}, bf16")
    print(f"backends timed: {', '.join(backends)}, every triton forward route and backward variant; "
          f"baselines: authors (moram_dense), cuBLAS x @ keys.T")
    hw = H200
    from moram_kernels.backends.triton.model import SCAN_EFF
    print(f"cost model (benchmarks/cost_model.py over moram_kernels.backends.triton.model, H200): "
          f"{hw['tc_blas'] / 1e12:.0f} TFLOP/s cuBLAS bf16, {hw['tc_peak'] / 1e12:.0f} peak, Triton tiles at "
          f"{SCAN_EFF:.0%} of peak + simulated merges, {hw['hbm'] / 1e12:.1f} TB/s HBM, "
          f"{hw['launch_s'] * 1e6:.0f} us per eager launch")
    print(f"{'case':22s} {'T':>5s} {'N':>6s} {'GFLOP':>9s} {'MB':>8s} {'FLOP/B':>7s} {'floor ms':>9s}  predicted ms (eager)")
    for row in ROWS:
        fl, by = row_work(row)
        floor = 1e3 * floor_s(fl, by, hw)
        pred = []
        has_triton = any(b.split()[0] == "triton" for b in backends)
        triton = [f"triton fwd={r}" for r in KNOWN_FWD_ROUTES] if has_triton and not row.bwd else []
        for impl in ("cuBLAS x@keys.T", "authors", *[b.split()[0] for b in backends], *triton):
            ms = model_ms(row, Impl(impl, ""), "eager")[0]
            if ms is not None and not (row.bwd and impl.startswith("cuBLAS")):
                pred.append(f"{impl.split()[-1] if impl.startswith('triton ') else impl.split()[0]} {ms:.3f}")
        print(f"{row.case:22s} {row.t:>5d} {row.n:>6d} {fl / 1e9:>9.2f} {by / 1e6:>8.1f} {fl / by:>7.0f} {floor:>9.3f}  "
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


#: the Triton tests run on CUDA tensors by the check: parity and both backward variants
#: first, then the near-tie test, where a real GPU's TF32 rounding is what is checked
PYTEST_FILES = tuple(os.path.join(ROOT, "tests", "backends", "triton", f) for f in
                     ("test_triton_interpret.py", "test_triton_bwd.py", "test_triton_rounding.py"))


def run_pytest(timeout_s):
    """The interpreter test file on CUDA tensors; False (reported) on failure or timeout."""
    if timeout_s < 20:
        print(f"pytest skipped: {timeout_s:.0f} s left in the budget", flush=True)
        return False
    env = pytest_env()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", *PYTEST_FILES, "-p", "no:cacheprovider"]
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


# ---- what is timed: the four tracked rows x every variant ---------------------------------------

@dataclass(frozen=True)
class Row:
    """One row of the table the check fills: T tokens against N atoms (d_in = d_out = 4096,
    k = 16, bf16), forward or forward + backward (training layout: the bank frozen but for
    ``R_TRAIN`` trainable atoms), in ``modes`` "eager" and/or "graph" (a CUDA graph: the
    GPU time alone, what decode is judged by)."""

    case: str
    t: int
    n: int
    bwd: bool = False
    modes: tuple[str, ...] = ("eager",)

    @property
    def model_case(self) -> str:
        """The case name :func:`predict_ms` knows."""
        return "prefill fwd+bwd" if self.bwd else ("prefill fwd" if self.t > 64 else f"decode T={self.t} fwd")


ROWS = (
    Row("prefill fwd", T_PREFILL, N_ATOMS),
    Row("prefill fwd+bwd", T_PREFILL, N_ATOMS, bwd=True),
    Row("decode T=1 N=1024", 1, 1024, modes=("graph",)),
    Row("decode T=1 N=65536", 1, 65536, modes=("eager", "graph")),
)

#: every forward route the check knows (``MORAM_TRITON_FWD``): fused = the original scan +
#: select, split = the decode road, gemm = cuBLAS scores + select, scan2 = the new prefill
#: scan. Only those in ``forward.FWD_ROUTES`` of this checkout are timed; the others are
#: listed as skipped, with the reason.
KNOWN_FWD_ROUTES = ("fused", "split", "gemm", "scan2", "gemm2")
#: the backward variants (``MORAM_TRITON_BWD``)
KNOWN_BWD = ("v1", "v2")

#: seconds per section of the default 300 s budget (what a section leaves unused passes on)
SECTIONS = (("warm-up", 95.0), ("parity", 35.0), ("timings", 110.0), ("pytest", 60.0))


@dataclass(frozen=True)
class Impl:
    """One implementation of a row: ``kind`` "blas" (cuBLAS ``x @ keys.T``), "authors" (the
    authors' dense path) or "backend" (``backend`` with ``env`` set while it runs);
    ``skip`` says why it cannot run here."""

    name: str
    kind: str
    backend: str = ""
    env: tuple = ()
    skip: str = ""


def fwd_routes() -> tuple[str, ...]:
    """``MORAM_TRITON_FWD``'s allowed values in this checkout (``forward.FWD_ROUTES``);
    ("auto", "fused") where the tuple does not exist yet (the only road then)."""
    try:
        from moram_kernels.backends.triton import forward
    except ImportError:          # no triton installed: nothing of it is timed anyway
        return ("auto", "fused")
    return tuple(getattr(forward, "FWD_ROUTES", ("auto", "fused")))


def plan_jobs(backends: dict[str, str], routes: tuple[str, ...]) -> list[tuple[Row, str, Impl]]:
    """``(row, mode, impl)`` in timing order. ``backends``: GPU backend name -> "" when it
    can run here, else the reason it cannot."""
    jobs = []
    for row in ROWS:
        impls = [] if row.bwd else [Impl("cuBLAS x@keys.T", "blas")]
        impls.append(Impl("authors", "authors"))
        for b, why in backends.items():
            if b != "triton":
                impls.append(Impl(b, "backend", b, skip=why))
            elif row.bwd:
                impls += [Impl(f"triton bwd={v}", "backend", b, (("MORAM_TRITON_BWD", v),), why)
                          for v in KNOWN_BWD]
            else:
                impls.append(Impl("triton", "backend", b, skip=why))       # auto: what users get
                for r in KNOWN_FWD_ROUTES:
                    no = "" if r in routes else (f"MORAM_TRITON_FWD={r} does not exist in this checkout "
                                                 f"(forward.FWD_ROUTES = {routes})")
                    impls.append(Impl(f"triton fwd={r}", "backend", b, (("MORAM_TRITON_FWD", r),), why or no))
        jobs += [(row, mode, i) for mode in row.modes for i in impls]
    return jobs


def row_work(row: Row) -> tuple[float, float]:
    """FLOPs and bytes of one row (benchmarks/cost_model.py)."""
    f = forward_flops(row.t, D_IN, D_OUT, row.n, K)
    b = forward_bytes(row.t, D_IN, D_OUT, row.n, K, S.elt)
    if row.bwd:
        f += backward_flops(row.t, D_IN, D_OUT, row.n, K, R_TRAIN)
        b += backward_bytes(row.t, D_IN, D_OUT, row.n, K, R_TRAIN, S.elt)
    return f, b


def model_ms(row: Row, impl: Impl, mode: str) -> tuple[float | None, str]:
    """The cost model's prediction for one job and a note: ``predict_ms`` is asked for the
    implementation's full name first ("triton fwd=split"), then its backend ("triton"),
    which the note then names; in a CUDA graph a launch costs a graph node's
    (``model.GRAPH_NODE_S``)."""
    from moram_kernels.backends.triton.model import GRAPH_NODE_S
    hw = dict(H200, launch_s=GRAPH_NODE_S) if mode == "graph" else H200
    shape = replace(GPU_CHECK, n=row.n)
    for key in dict.fromkeys((impl.name, impl.name.split()[0])):
        ms = predict_ms(row.model_case, key, row.t, hw, shape)
        if ms is not None:
            return ms, "" if key == impl.name else f"model of {key}"
    return None, "no model"


@contextlib.contextmanager
def scoped_env(pairs):
    """Set ``pairs`` in os.environ for the block (the routes are read on every call)."""
    old = {k: os.environ.get(k) for k, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def section_plan(total_s: float) -> dict[str, float]:
    """Seconds per section, scaled to ``total_s``; printed before anything runs."""
    whole = sum(s for _, s in SECTIONS)
    shares = {name: total_s * s / whole for name, s in SECTIONS}
    print("time budget: " + ", ".join(f"{n} {s:.0f} s" for n, s in shares.items())
          + f"; total {total_s:.0f} s (a section's unused time passes to the next)", flush=True)
    return shares


def run_jobs(jobs, make_fn, timer, until_s, clock, skipped):
    """Time each job, each line printed as soon as it is measured beside the model's
    prediction and measured / predicted; returns the table rows. ``make_fn(row, impl)``
    builds the call, ``timer(fn, graph)`` returns milliseconds, ``clock()`` seconds since
    the start; past ``until_s`` the rest is skipped (and listed in ``skipped``)."""
    rows = []
    for row, mode, impl in jobs:
        label = f"{row.case:20s} {mode:5s} {impl.name:18s}"
        if impl.skip:
            print(f"{label} skipped: {impl.skip}", flush=True)
            continue
        if clock() > until_s:
            skipped.append(f"{row.case} {mode} {impl.name}")
            print(f"{label} skipped: timing budget spent", flush=True)
            continue
        fl, by = row_work(row)
        if impl.kind == "blas":
            fl = 2 * row.t * row.n * D_IN
        try:
            with scoped_env(impl.env):
                ms = timer(make_fn(row, impl), mode == "graph")
        except Exception as e:   # one job that cannot run must not cost the others
            if mode != "graph":
                skipped.append(f"{row.case} {mode} {impl.name} (failed)")
            print(f"{label} {'not capturable' if mode == 'graph' else 'FAILED'}: {type(e).__name__}: "
                  f"{str(e)[:200]}", flush=True)
            continue
        pred, note = model_ms(row, impl, mode)
        model = (f"model {pred:8.3f} ms  measured/model {ms / pred:5.2f}" if pred else "model    -")
        print(f"{label} {ms:9.3f} ms {fl / ms / 1e9:7.1f} TFLOP/s {by / ms / 1e6:7.0f} GB/s   {model}"
              + (f" ({note})" if note and pred else ""), flush=True)
        rows.append(dict(case=row.case, impl=impl.name + (" (graph)" if mode == "graph" else ""), ms=ms,
                         tflops=fl / ms / 1e9, gbs=by / ms / 1e6,
                         predicted_ms=pred if pred is not None else float("nan")))
    return rows


def rehearse(backends: dict[str, str], routes: tuple[str, ...], timer, total_s: float = 300.0):
    """The timing section without a GPU: the same jobs and lines, with ``timer`` standing in
    for the GPU (the dry run passes the model's own prediction; the tests a fake)."""
    section_plan(total_s)
    jobs = plan_jobs(backends, routes)
    skipped: list[str] = []
    rows = run_jobs(jobs, lambda row, impl: (row, impl), timer, float("inf"), lambda: 0.0, skipped)
    return jobs, rows


def bench(args):
    import torch
    import triton

    import moram_kernels as mk
    from moram_kernels.backends import reference as ref
    from moram_kernels.functional import moram_segments

    budget = Budget(total_s=args.budget)
    shares = section_plan(args.budget)
    backends = gpu_backends(mk, torch)
    routes = fwd_routes()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"backends {mk.available_backends()}, forward routes {routes}, budget {args.budget:.0f} s", flush=True)
    print_plan(backends)
    have_cuda, line = cuda_backend_line(mk)
    print(line, flush=True)
    ok = have_cuda
    status = {b: "" for b in backends}
    for b in gpu_backends(mk, torch, only_available=False):
        status.setdefault(b, "not available here" if b != "cuda" else line)
    jobs = plan_jobs(status, routes)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    banks = {}

    def bank(n):
        """keys, values [n, d] bf16 and the training layout's pieces, made once per N."""
        if n not in banks:
            keys = (torch.randn(n, D_IN, device=dev) / D_IN**0.5).to(dt)
            values = (torch.randn(n, D_OUT, device=dev) * 0.02).to(dt)
            n0 = n - R_TRAIN
            banks[n] = dict(keys=keys, values=values, k0=keys[:n0], v0=values[:n0],
                            k1=keys[n0:].clone().requires_grad_(), v1=values[n0:].clone().requires_grad_(),
                            sc1=torch.full((R_TRAIN,), 2.0, device=dev),
                            scale_all=torch.cat([torch.ones(n0, device=dev), torch.full((R_TRAIN,), 2.0, device=dev)]),
                            gram0=ref.gram(keys[:n0]).to(dt))     # cached in bf16, as MoRAMLinear keeps it
        return banks[n]

    xs = {}

    def make_fn(row, impl):
        """The call one job times (tensors made once per shape)."""
        bk = bank(row.n)
        if row.t not in xs:
            xs[row.t] = torch.randn(row.t, D_IN, device=dev).to(dt)
        x = xs[row.t]
        if row.bwd:
            xg = x.clone().requires_grad_()
            gy = torch.randn(row.t, D_OUT, device=dev).to(dt)
            if impl.kind == "authors":
                def step():
                    y = ref.moram_dense(xg, torch.cat([bk["k0"], bk["k1"]]), torch.cat([bk["v0"], bk["v1"]]),
                                        k=K, tau=TAU, value_scale=bk["scale_all"])
                    torch.autograd.grad(y, (xg, bk["k1"], bk["v1"]), gy)
                return step

            def step():
                y, _ = moram_segments(xg, bk["k0"], bk["v0"], None, bk["k1"], bk["v1"], bk["sc1"], k=K, tau=TAU,
                                      delta=0.0, eps=1e-12, gram0=bk["gram0"], backend=impl.backend)
                torch.autograd.grad(y, (xg, bk["k1"], bk["v1"]), gy)
            return step
        keys, values = bk["keys"], bk["values"]
        if impl.kind == "blas":
            fn = lambda: x @ keys.t()                                                   # noqa: E731
        elif impl.kind == "authors":
            fn = lambda: ref.moram_dense(x, keys, values, k=K, tau=TAU)                 # noqa: E731
        else:
            fn = lambda: mk.moram(x, keys, values, k=K, tau=TAU, backend=impl.backend)  # noqa: E731

        def call():
            with torch.no_grad():
                return fn()
        return call

    # 0. warm-up: first-time compiles of every job's call, outside any timing
    until = shares["warm-up"]
    failed = set()
    seen = set()
    for row, _, impl in jobs:
        key = (row.case, impl.name)
        if impl.skip or key in seen:
            continue
        seen.add(key)
        if budget.elapsed() > until:
            print(f"warm-up {row.case} {impl.name}: skipped, warm-up budget spent", flush=True)
            ok = False
            continue
        t0 = time.perf_counter()
        try:
            with scoped_env(impl.env):
                make_fn(row, impl)()
            torch.cuda.synchronize()
            print(f"warm-up {row.case:20s} {impl.name:18s} {time.perf_counter() - t0:6.1f} s", flush=True)
        except Exception as e:   # reported, counted as a failure, and the check goes on
            ok = False
            failed.add(key)
            print(f"warm-up {row.case:20s} {impl.name:18s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    jobs = [(r, m, replace(i, skip="failed in the warm-up") if (r.case, i.name) in failed else i)
            for r, m, i in jobs]
    print(f"warm-up done at {budget.elapsed():.0f} s", flush=True)

    # 1. parity at realistic sizes: every backend, then the other triton variants
    until += shares["parity"]
    try:
        fails = inline_parity(mk, ref, torch, backends)
        for pairs in [(("MORAM_TRITON_BWD", "v1"),)] + [(("MORAM_TRITON_FWD", r),) for r in KNOWN_FWD_ROUTES
                                                          if r in routes]:
            if "triton" not in backends or budget.elapsed() > until:
                break
            print(f"parity with {pairs[0][0]}={pairs[0][1]}:", flush=True)
            with scoped_env(pairs):
                fails += inline_parity(mk, ref, torch, ["triton"], cases=PARITY_CASES[:2])
    except Exception as e:
        fails = [str(e)]
        print(f"parity FAILED with {type(e).__name__}: {str(e)[:300]}", flush=True)
    ok &= not fails
    print(f"parity done at {budget.elapsed():.0f} s", flush=True)

    peak_tflops, peak_gbs = H200["tc_blas"] / 1e12, H200["hbm"] / 1e9
    try:   # ceilings measured here: a large bf16 GEMM and a device copy
        a = torch.randn(8192, 8192, device=dev, dtype=dt)
        ms = triton.testing.do_bench(lambda: a @ a, warmup=25, rep=100)
        peak_tflops = 2 * 8192**3 / ms / 1e9
        big = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
        ms = triton.testing.do_bench(lambda: big.clone(), warmup=10, rep=50)
        peak_gbs = 2 * big.numel() / ms / 1e6
        del a, big
        print(f"ceilings here: bf16 GEMM {peak_tflops:.0f} TFLOP/s, copy {peak_gbs:.0f} GB/s", flush=True)
    except Exception as e:
        print(f"ceilings not measured ({type(e).__name__}: {e}); the model's are used", flush=True)

    # 2. timings: the tracked rows, every variant, each beside the model's prediction
    until += shares["timings"]

    def timer(fn, graph):
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=40)
        return triton.testing.do_bench(fn, warmup=10, rep=40)

    skipped: list[str] = []
    rows = run_jobs(jobs, make_fn, timer, until, budget.elapsed, skipped)
    if skipped:
        ok = False
        print(f"{len(skipped)} timings skipped or failed: {'; '.join(skipped)}", flush=True)
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
    ap.add_argument("--budget", type=float, default=300.0,
                    help="wall-clock seconds for the whole check, shared out between its sections "
                         "(default 300: a lent GPU gives a few minutes)")
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
        names = gpu_backends(mk, torch, only_available=False)
        print_plan([f"{b} (if available there)" for b in names])
        print(cuda_backend_line(mk)[1])
        print("dry run of the timings: the model's prediction stands in for each measurement")

        def model_timer(job, graph):
            return model_ms(*job, "graph" if graph else "eager")[0] or float("nan")
        rehearse({b: "" for b in names}, fwd_routes(), model_timer, args.budget)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run, or run this on a GPU machine", file=sys.stderr)
        return 2
    return bench(args)

