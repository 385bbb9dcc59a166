"""One prepared check for a machine with a CUDA GPU (under 5 minutes on an H100/H200).

    python benchmarks/gpu_check.py            # parity on the GPU, then timings, table last
    python benchmarks/gpu_check.py --dry-run  # print the plan and the FLOP/byte model only
    python benchmarks/gpu_check.py --no-pytest --csv out.csv

1. Parity on the GPU: ``tests/test_triton_interpret.py`` with the interpreter off (its
   cases then run on CUDA tensors), plus an inline check of every available backend
   against the reference at a realistic size (forward and backward).
2. Timings with ``triton.testing.do_bench`` at d_in = d_out = 4096, N = 16384, k = 16,
   bf16: T = 4096 forward and forward+backward (training layout: a frozen bank plus 16
   trainable atoms, gram of the bank cached), and decode T in {1, 16, 64}. Baselines:
   the authors' dense path (``reference.moram_dense``), ``torch.compile`` of it, and a bare
   cuBLAS ``x @ keys.T``. Every backend of ``mk.available_backends()`` is timed.
3. Achieved TFLOP/s and GB/s against measured ceilings (a large bf16 cuBLAS GEMM and a
   device-to-device copy), and a short table last.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

D_IN = D_OUT = 4096
N_ATOMS = 16384
R_TRAIN = 16
K = 16
TAU = 0.03
T_PREFILL = 4096
T_DECODE = (1, 16, 64)


# ---- the FLOP / byte model (also in moram_kernels/backends/triton/__init__.py) -------------------------

def fwd_flops(t, d_in, d_out, n, k):
    """Scoring GEMM 2 T N d_in plus the K-row gather 2 T K d_out."""
    return 2 * t * n * d_in + 2 * t * k * d_out


def fwd_bytes(t, d_in, d_out, n, k, elt=2):
    """Compulsory traffic: keys once, x in, y out, the distinct value rows (at most N)."""
    return elt * (n * d_in + t * d_in + t * d_out + min(t * k, n) * d_out)


def bwd_flops(t, d_in, d_out, n_train, k):
    """Training backward with a cached gram of the frozen bank: gather-dot and dx gather
    (2 T K d each), the dense term x G (2 T d_in^2), and P, dA of the trainable atoms."""
    return 2 * t * k * (d_out + d_in) + 2 * t * d_in * d_in + 4 * t * n_train * d_in


def plan():
    rows = [("prefill fwd", T_PREFILL, fwd_flops(T_PREFILL, D_IN, D_OUT, N_ATOMS, K),
             fwd_bytes(T_PREFILL, D_IN, D_OUT, N_ATOMS, K)),
            ("prefill fwd+bwd", T_PREFILL,
             fwd_flops(T_PREFILL, D_IN, D_OUT, N_ATOMS, K) + bwd_flops(T_PREFILL, D_IN, D_OUT, R_TRAIN, K),
             fwd_bytes(T_PREFILL, D_IN, D_OUT, N_ATOMS, K) * 2)]
    for t in T_DECODE:
        rows.append((f"decode T={t} fwd", t, fwd_flops(t, D_IN, D_OUT, N_ATOMS, K),
                     fwd_bytes(t, D_IN, D_OUT, N_ATOMS, K)))
    return rows


def print_plan(backends):
    print(f"shape: d_in = d_out = {D_IN}, N = {N_ATOMS} (of which {R_TRAIN} trainable in fwd+bwd), "
          f"k = {K}, tau = {TAU}, bf16")
    print(f"backends timed: {', '.join(backends)}; baselines: authors (moram_dense), "
          f"torch.compile(moram_dense), cuBLAS x @ keys.T")
    print(f"{'case':22s} {'T':>5s} {'GFLOP':>9s} {'MB':>8s} {'FLOP/B':>7s}")
    for name, t, fl, by in plan():
        print(f"{name:22s} {t:>5d} {fl / 1e9:>9.2f} {by / 1e6:>8.1f} {fl / by:>7.0f}")


# ---- GPU parts ------------------------------------------------------------------------------

def run_pytest():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", os.path.join(ROOT, "tests", "test_triton_interpret.py"),
           "-p", "no:cacheprovider"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, timeout=240)
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
    from moram_kernels.ops import moram_segments

    t_start = time.perf_counter()
    backends = gpu_backends(mk, torch)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"backends {mk.available_backends()}", flush=True)
    print_plan(backends)
    ok = True
    if not args.no_pytest:
        ok &= run_pytest()
    fails = inline_parity(mk, ref, torch, backends)
    ok &= not fails
    print(f"parity done at {time.perf_counter() - t_start:.0f} s", flush=True)

    dev, dt = "cuda", torch.bfloat16
    do_bench = triton.testing.do_bench
    torch.manual_seed(0)
    keys = (torch.randn(N_ATOMS, D_IN, device=dev) / D_IN**0.5).to(dt)
    values = (torch.randn(N_ATOMS, D_OUT, device=dev) * 0.02).to(dt)
    rows = []

    # ceilings measured here: a large bf16 GEMM and a device copy
    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    ms = do_bench(lambda: a @ a, warmup=25, rep=200)
    peak_tflops = 2 * 8192**3 / ms / 1e9
    big = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    ms = do_bench(lambda: big.clone(), warmup=10, rep=100)
    peak_gbs = 2 * big.numel() / ms / 1e6
    del a, big
    print(f"ceilings here: bf16 GEMM {peak_tflops:.0f} TFLOP/s, copy {peak_gbs:.0f} GB/s", flush=True)

    def record(case, name, ms, fl, by):
        rows.append(dict(case=case, impl=name, ms=ms, tflops=fl / ms / 1e9, gbs=by / ms / 1e6))
        print(f"{case:22s} {name:16s} {ms:9.3f} ms {fl / ms / 1e9:8.1f} TFLOP/s {by / ms / 1e6:8.0f} GB/s",
              flush=True)

    dense_c = torch.compile(ref.moram_dense)

    # prefill forward
    t = T_PREFILL
    x = torch.randn(t, D_IN, device=dev).to(dt)
    fl, by = fwd_flops(t, D_IN, D_OUT, N_ATOMS, K), fwd_bytes(t, D_IN, D_OUT, N_ATOMS, K)
    with torch.no_grad():
        record("prefill fwd", "cuBLAS x@keys.T", do_bench(lambda: x @ keys.t()), 2 * t * N_ATOMS * D_IN, by)
        record("prefill fwd", "authors", do_bench(lambda: ref.moram_dense(x, keys, values, k=K, tau=TAU)), fl, by)
        record("prefill fwd", "authors+compile",
               do_bench(lambda: dense_c(x, keys, values, k=K, tau=TAU)), fl, by)
        for b in backends:
            record("prefill fwd", b, do_bench(lambda: mk.moram(x, keys, values, k=K, tau=TAU, backend=b)), fl, by)

    # prefill forward + backward, training layout: frozen bank + R_TRAIN trainable atoms
    n0 = N_ATOMS - R_TRAIN
    k0, v0 = keys[:n0], values[:n0]
    k1 = keys[n0:].clone().requires_grad_()
    v1 = values[n0:].clone().requires_grad_()
    sc1 = torch.full((R_TRAIN,), 2.0, device=dev)
    gram0 = ref.gram(k0)
    xg = x.clone().requires_grad_()
    gy = torch.randn(t, D_OUT, device=dev).to(dt)
    fl = fwd_flops(t, D_IN, D_OUT, N_ATOMS, K) + bwd_flops(t, D_IN, D_OUT, R_TRAIN, K)
    by = 2 * fwd_bytes(t, D_IN, D_OUT, N_ATOMS, K)
    scale_all = torch.cat([torch.ones(n0, device=dev), sc1])

    def authors_step(fn):
        def step():
            kk_ = torch.cat([k0, k1])                 # the authors concatenate old and new atoms
            vv_ = torch.cat([v0, v1])
            y = fn(xg, kk_, vv_, k=K, tau=TAU, value_scale=scale_all)
            torch.autograd.grad(y, (xg, k1, v1), gy)
        return step

    def ours_step(b):
        def step():
            y, _ = moram_segments(xg, k0, v0, None, k1, v1, sc1, k=K, tau=TAU, delta=0.0, eps=1e-12,
                                  gram0=gram0, backend=b)
            torch.autograd.grad(y, (xg, k1, v1), gy)
        return step

    record("prefill fwd+bwd", "authors", do_bench(authors_step(ref.moram_dense)), fl, by)
    record("prefill fwd+bwd", "authors+compile", do_bench(authors_step(dense_c)), fl, by)
    for b in backends:
        record("prefill fwd+bwd", b, do_bench(ours_step(b)), fl, by)
    del xg, gy, gram0

    # decode
    with torch.no_grad():
        for t in T_DECODE:
            x = torch.randn(t, D_IN, device=dev).to(dt)
            case = f"decode T={t} fwd"
            fl, by = fwd_flops(t, D_IN, D_OUT, N_ATOMS, K), fwd_bytes(t, D_IN, D_OUT, N_ATOMS, K)
            impls = [("cuBLAS x@keys.T", lambda: x @ keys.t(), 2 * t * N_ATOMS * D_IN),
                     ("authors", lambda: ref.moram_dense(x, keys, values, k=K, tau=TAU), fl)]
            impls += [(b, (lambda b=b: mk.moram(x, keys, values, k=K, tau=TAU, backend=b)), fl)
                      for b in backends]
            for name, fn, f in impls:
                record(case, name, do_bench(fn), f, by)
                # decode is launch-bound in eager mode; a CUDA graph shows the GPU time alone
                try:
                    record(case, name + " (graph)", triton.testing.do_bench_cudagraph(fn), f, by)
                except Exception as e:  # capture can fail for an implementation: say so, go on
                    print(f"{case:22s} {name + ' (graph)':16s} not capturable: {type(e).__name__}: {e}",
                          flush=True)
    print(f"timings done at {time.perf_counter() - t_start:.0f} s", flush=True)

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "impl", "ms", "tflops", "gbs", "gpu", "torch", "triton", "when"])
            w.writeheader()
            meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            for r in rows:
                w.writerow({**r, **meta})

    print()
    print(f"parity {'passed' if ok else 'FAILED'}")
    print_table(rows, peak_tflops, peak_gbs)
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the FLOP/byte model, run nothing")
    ap.add_argument("--no-pytest", action="store_true", help="skip the pytest part of the parity check")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: run the inline parity check on tiny CPU cases under TRITON_INTERPRET=1")
    args = ap.parse_args()
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
        return 0
    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run, or run this on a GPU machine", file=sys.stderr)
        return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
