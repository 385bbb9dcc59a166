"""Short GPU check of the ``cuda`` backend: build status, parity on the timed shapes, and
timings against the Triton backend, the sparse reference and the authors' dense path.

On a CUDA machine, from the repository root:

    MORAM_WITH_CUDA=1 MORAM_FORCE_EXT=1 MAX_JOBS=8 python setup.py build_ext --inplace
    PYTHONPATH=$PWD python -m pytest -q tests/test_cuda_backend.py tests/test_cuda_compile.py
    PYTHONPATH=$PWD python benchmarks/gpu_check_cuda.py --out results/gpu_check_cuda.json

Exit status 1 when the cuda backend is unavailable or a parity check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import moram_kernels as mk
from moram_kernels import _dispatch, reference

# name: (T, d_in, d_out, N, k, tau, delta, dtype)
SHAPES = {
    "clip_paper": (4096, 768, 768, 160, 16, 0.01, 0.2, torch.bfloat16),
    "llm_big_bank": (4096, 4096, 4096, 16384, 16, 0.03, 0.0, torch.bfloat16),
    "decode_huge_bank": (8, 4096, 4096, 65536, 16, 0.03, 0.0, torch.bfloat16),
}


def _time_ms(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _inputs(T, d_in, d_out, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, d_in, device="cuda", dtype=dtype, generator=g)
    keys = torch.randn(n, d_in, device="cuda", dtype=dtype, generator=g) / d_in ** 0.5
    values = torch.randn(n, d_out, device="cuda", dtype=dtype, generator=g) / n ** 0.5
    return x, keys, values


def _runner(name, x, keys, values, k, tau, delta, train):
    if name == "dense":
        def f():
            return reference.moram_dense(x, keys, values, k=k, tau=tau, delta=delta)
    else:
        def f():
            return mk.moram(x, keys, values, k=k, tau=tau, delta=delta, backend=name)
    if not train:
        return lambda: f()
    gy = torch.randn(x.shape[0], values.shape[1], device="cuda", dtype=x.dtype)

    def step():
        for t in (x, keys, values):
            t.grad = None
        f().backward(gy)
    return step


def parity(x, keys, values, k, tau, delta) -> dict:
    """Max errors of cuda against the reference, forward and backward (same selection)."""
    xs = x.detach()
    K = reference.effective_k(k, keys.shape[0])
    e_k = keys.new_empty(0, keys.shape[1])
    e_v = values.new_empty(0, values.shape[1])
    impl = _dispatch._BY_NAME["cuda"].impl()
    y, idx, p_sel, norm = impl.moram_fwd(xs, keys.detach(), values.detach(), None, e_k, e_v, None,
                                         K, tau, delta, 1e-12)
    ry, ridx, rp, rn = reference.moram_fwd(xs, keys.detach(), values.detach(), None, e_k, e_v, None,
                                           K, tau, delta, 1e-12)
    gy = torch.randn_like(ry)
    args = (gy, xs, keys.detach(), values.detach(), None, e_k, e_v, None, None, ridx, rp, rn,
            tau, delta, 1e-12, True, True, False)
    got, want = impl.moram_bwd(*args), reference.moram_bwd(*args)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()

    same_sel = (idx.sort(-1).values == ridx.sort(-1).values).all(-1).float().mean().item()
    # y against the reference formula on the atoms cuda selected (near-ties may differ)
    w, m = reference._gate(p_sel, rn, tau, delta)
    y_want = torch.einsum("tk,tkd->td", w * m * p_sel, values.detach().float()[idx])
    out = {"y_rel_err": rel(y, y_want), "norm_rel_err": rel(norm, rn),
           "y_vs_reference_y_info": rel(y, ry),
           "tokens_same_selection": same_sel,
           "p_sel_sorted_rel_err": rel(p_sel.sort(-1).values, rp.sort(-1).values)}
    for name, g, r in zip(("gx", "gkeys", "gvalues"), got[:3], want[:3]):
        out[f"{name}_rel_err"] = rel(g, r)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    report = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "available_backends": mk.available_backends(),
              "cuda_unavailable": _dispatch.why_unavailable("cuda"), "shapes": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "shapes"}, indent=1))
    if report["cuda_unavailable"]:
        print("the cuda backend is unavailable; build with "
              "MORAM_WITH_CUDA=1 MORAM_FORCE_EXT=1 python setup.py build_ext --inplace")
        return 1

    failed = False
    for name in args.shapes.split(","):
        T, d_in, d_out, n, k, tau, delta, dtype = SHAPES[name]
        x, keys, values = _inputs(T, d_in, d_out, n, dtype)
        res = {"T": T, "d_in": d_in, "d_out": d_out, "N": n, "k": k, "dtype": str(dtype)}
        res["parity"] = par = parity(x, keys, values, k, tau, delta)
        tol = 2e-2 if dtype != torch.float32 else 1e-3
        ok = all(v <= tol for kk, v in par.items() if kk.endswith("rel_err"))
        failed |= not ok
        print(f"\n== {name}: T={T} d={d_in}x{d_out} N={n} k={k} {dtype}  parity {'ok' if ok else 'FAILED'}")
        print("   " + ", ".join(f"{kk}={v:.2e}" for kk, v in par.items()))
        names = [b for b in ("cuda", "triton", "reference") if b in mk.available_backends()] + ["dense"]
        for train in (False, True):
            xs, ks, vs = (t.detach().requires_grad_(train) for t in (x, keys, values))
            for b in names:
                key = f"{'fwd+bwd' if train else 'fwd'}/{b}"
                try:
                    t0 = time.perf_counter()
                    ctx = torch.no_grad() if not train else torch.enable_grad()
                    with ctx:
                        ms = _time_ms(_runner(b, xs, ks, vs, k, tau, delta if not train else 0.0, train),
                                      iters=args.iters)
                    res[key] = round(ms, 4)
                    print(f"   {key:<22} {ms:9.3f} ms   (measured in {time.perf_counter() - t0:.1f} s)")
                except torch.cuda.OutOfMemoryError as e:
                    res[key] = f"OOM: {e}".splitlines()[0]
                    print(f"   {key:<22} OOM")
                    torch.cuda.empty_cache()
        report["shapes"][name] = res
        del x, keys, values
        torch.cuda.empty_cache()

    if args.out:
        import os
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
