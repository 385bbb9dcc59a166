"""The FLOP / byte cost model of one MoRAM call, its floors per hardware, and the GPU
check's predicted times. Every benchmark figure of useful work comes from here: the main
job's GFLOP/s and GB/s columns (:func:`work`), the ``gpu-check`` preset's floors and
predictions (:func:`plan`, :func:`predict_ms`) and the ``triton-variants`` preset's waves
(:data:`GPU_CHECK`).

Symbols: ``T`` tokens, ``d_in`` / ``d_out`` widths, ``N`` atoms, ``K`` the effective top-K
(``min(max(k, 2), N)``, or 1 when ``N == 1``), ``r`` trainable atoms, ``R`` a LoRA rank,
``e`` bytes per element. Bytes count each tensor read or written once.

MoRAM forward (every MoRAM implementation, the authors' dense one included, is credited
the sparse algorithm's useful work, so GFLOP/s ranks them exactly as time does)::

    FLOPs = 2 T N d_in                  scores x A^T
          + 2 T K d_out                 gather of K value rows per token
    bytes = e (T d_in + N d_in + min(N, T K) d_out + T d_out)
                                        x, keys, the value rows that can be drawn, y

MoRAM backward, training layout (a frozen bank with its Gram matrix cached, r trainable
atoms)::

    FLOPs = 2 T K (d_in + d_out)        gather-dot of the coefficients and the sparse gx
          + 2 T min(N, d_in) d_in       the normalisation term: x G through the Gram
                                        matrix, or P A when N < d_in is cheaper
          + 2 T r d_in + 2 T min(K, r) d_out   gradients of the trainable keys and values
    bytes = forward bytes + e r (d_in + d_out)   (the trainable atoms' gradients)

The train step of a whole layer adds the frozen base ``nn.Linear``: forward and ``gx``,
``2 T d_in d_out`` FLOPs and ``e d_in d_out`` bytes each. LoRA of rank ``R``: forward
``2 T R (d_in + d_out)`` FLOPs, ``e (T d_in + R (d_in + d_out) + T d_out)`` bytes; its
train step three times those FLOPs, twice those bytes plus the gradients
``e R (d_in + d_out)``, plus the base layer. The floor ``x @ keys.T``: ``2 T N d_in``
FLOPs, ``e (T d_in + N d_in + T N)`` bytes. The authors' dense layer, used only to predict
a slow run before starting it: ``2 T N (d_in + d_out)`` FLOPs forward, three times that
plus ``4 T d_in d_out`` for a train step.

Floor of a call on hardware ``hw`` (:data:`HARDWARE`)::

    floor_s = max(FLOPs / hw["tc_blas"], bytes / hw["hbm"])

``tc_blas`` is the bf16 GEMM rate cuBLAS reaches, ``hbm`` the memory bandwidth measured
with a device copy. :func:`predict_ms` refines the floor per implementation for the
``gpu-check`` preset: the Triton scan at ``SCAN_EFF`` of the tensor-core peak plus
its merge rounds counted by simulation (``moram_kernels.backends.triton.model``), over the
SMs its grid keeps busy; the authors'
path as two GEMMs plus ten passes over ``[T, N]`` fp32; ``launch_s`` per eager launch.
The GPU check prints each prediction beside the measured time, so the model is checked on
every GPU run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["forward_flops", "forward_bytes", "backward_flops", "backward_bytes", "work", "dense_flops",
           "floor_s", "HARDWARE", "H200", "GPU_CHECK", "plan", "predict_ms", "issue_rows",
           "DECODE_MODEL", "SCAN_EFF"]


# ---- one call ---------------------------------------------------------------------------------

def forward_flops(t: int, d_in: int, d_out: int, n: int, kk: int) -> float:
    """Scoring GEMM ``2 T N d_in`` plus the K-row gather ``2 T K d_out``."""
    return 2 * t * n * d_in + 2 * t * kk * d_out


def forward_bytes(t: int, d_in: int, d_out: int, n: int, kk: int, elt: int) -> float:
    """Compulsory traffic: x in, the keys once, the distinct value rows (at most N), y out."""
    return elt * (t * d_in + n * d_in + min(n, t * kk) * d_out + t * d_out)


def backward_flops(t: int, d_in: int, d_out: int, n: int, kk: int, r: int) -> float:
    """Gather-dot and sparse gx, the dense normalisation term, the trainable atoms' gradients."""
    return 2 * t * kk * (d_in + d_out) + 2 * t * min(n, d_in) * d_in + 2 * t * r * d_in \
        + 2 * t * min(kk, r) * d_out


def backward_bytes(t: int, d_in: int, d_out: int, n: int, kk: int, r: int, elt: int) -> float:
    """The forward's tensors again, plus the trainable atoms' gradients."""
    return forward_bytes(t, d_in, d_out, n, kk, elt) + elt * r * (d_in + d_out)


def _linear(t: int, d_in: int, d_out: int, elt: int) -> tuple[float, float]:
    return 2 * t * d_in * d_out, elt * d_in * d_out


def _lora(t: int, d_in: int, d_out: int, rank: int, elt: int) -> tuple[float, float]:
    return 2 * t * rank * (d_in + d_out), elt * (t * d_in + rank * (d_in + d_out) + t * d_out)


def work(case, mode: str, kind: str, elt: int, rank: int = 0) -> tuple[float, float]:
    """Nominal ``(FLOPs, bytes)`` of one call of a competitor of ``kind`` ("moram", "lora",
    "floor" or "base", see ``benchmarks/competitors.py``) on ``case`` (a
    ``benchmarks.grid.Case``), in ``mode`` "eval" (forward of the adapter) or "train" (step
    of the whole layer)."""
    t, n, di, do, kk, r = case.t, case.n, case.d_in, case.d_out, case.kk, case.r
    base_f, base_b = _linear(t, di, do, elt)
    if kind == "floor":
        return 2 * t * n * di, elt * (t * di + n * di + t * n)
    if kind == "base":
        return 2 * base_f, 2 * base_b
    if kind == "lora":
        f, b = _lora(t, di, do, rank, elt)
        if mode == "eval":
            return f, b
        return 3 * f + 2 * base_f, 2 * b + 2 * base_b + elt * rank * (di + do)
    if kind != "moram":
        raise ValueError(f"no cost model for competitor kind {kind!r} (moram, lora, floor, base)")
    f, b = forward_flops(t, di, do, n, kk), forward_bytes(t, di, do, n, kk, elt)
    if mode == "eval":
        return f, b
    return (f + backward_flops(t, di, do, n, kk, r) + 2 * base_f,
            b + backward_bytes(t, di, do, n, kk, r, elt) + 2 * base_b)


def dense_flops(case, mode: str) -> float:
    """FLOPs of the authors' dense layer, to predict a slow run before starting it."""
    f = 2 * case.t * case.n * (case.d_in + case.d_out)
    return f if mode == "eval" else 3 * f + 4 * case.t * case.d_in * case.d_out


# ---- hardware and floors ----------------------------------------------------------------------

#: Per hardware: SMs, dense bf16 tensor-core peak and the rate cuBLAS reaches (FLOP/s), HBM
#: bandwidth measured with a device copy (bytes/s), and the cost of one eager launch (s).
HARDWARE: dict[str, dict[str, float]] = {
    "H200": dict(sms=132, tc_peak=990e12, tc_blas=790e12, hbm=4.3e12, launch_s=4e-6),
}
H200 = HARDWARE["H200"]
from moram_kernels.backends.triton.model import SCAN_EFF  # noqa: E402  (one assumption, one place)


def floor_s(flops: float, nbytes: float, hw: dict = H200) -> float:
    """Seconds no implementation can beat: the GEMM rate or the memory bandwidth."""
    return max(flops / hw["tc_blas"], nbytes / hw["hbm"])


# ---- the GPU check's shape, plan and predictions ----------------------------------------------

@dataclass(frozen=True)
class GpuCheckShape:
    """The shape the ``gpu-check`` preset times (and ``triton-variants`` counts waves for)."""

    d_in: int = 4096
    d_out: int = 4096
    n: int = 16384          # atoms, of which ``r`` trainable in the forward + backward rows
    r: int = 16
    k: int = 16
    tau: float = 0.03
    t_prefill: int = 4096
    t_decode: tuple[int, ...] = (1, 16, 64)
    elt: int = 2            # bf16


GPU_CHECK = GpuCheckShape()


def plan(s: GpuCheckShape = GPU_CHECK) -> list[tuple[str, int, float, float]]:
    """The GPU check's rows: ``(case, T, FLOPs, bytes)``."""
    def fwd(t):
        return forward_flops(t, s.d_in, s.d_out, s.n, s.k), forward_bytes(t, s.d_in, s.d_out, s.n, s.k, s.elt)

    t = s.t_prefill
    f, b = fwd(t)
    rows = [("prefill fwd", t, f, b),
            ("prefill fwd+bwd", t, f + backward_flops(t, s.d_in, s.d_out, s.n, s.k, s.r),
             b + backward_bytes(t, s.d_in, s.d_out, s.n, s.k, s.r, s.elt))]
    rows += [(f"decode T={t} fwd", t, *fwd(t)) for t in s.t_decode]
    return rows


def _triton_fwd_s(t, d, d_out, n, k, hw=H200, variant=None):
    """The Triton forward by the package's model (``moram_kernels.backends.triton.model``:
    scan MMAs, merge rounds counted by simulation, select, gather, launches). ``variant``:
    "fused", "scan2" or "gemm"; None: what ``MORAM_TRITON_FWD=auto`` picks."""
    from moram_kernels.backends.triton import model
    from moram_kernels.backends.triton._common import k_bucket
    if variant is None:
        variant = model.prefill_route(t, d, n, k_bucket(k), "bf16", "tf32", hw["sms"])
    return model.forward_s(variant, t, d, n, k, d_out, "bf16", _gpu(hw))


def _gpu(hw):
    from moram_kernels.backends.triton import model
    g = model.H200
    return model.Gpu(g.name, int(hw["sms"]), hw["tc_peak"], hw["tc_blas"], hw["hbm"], g.clock, g.issue,
                     hw["launch_s"])


def _backward_s(t, d, k, r, hw=H200):
    """Training backward: x G (2 T d^2) on tensor cores, P and dA of the r trainable atoms,
    the gathers (K rows of A and B per token, mostly L2) and about ten launches."""
    return (2 * t * d * d + 4 * t * r * d) / hw["tc_blas"] + 3 * 2 * t * d / hw["hbm"] \
        + 2 * 2 * t * k * d / hw["hbm"] + 10 * hw["launch_s"]


#: hook for the decode road's model (another branch): ``f(t, d, n, k, d_out, gpu) -> s`` or None
DECODE_MODEL = None


def issue_rows(hw: dict = H200) -> list[dict]:
    """Model against floor for the four rows issue 18 tracks (bf16, d = 4096, k = 16):
    prefill forward and forward + backward at T = 4096, N = 16,384; decode of one token at
    N = 1,024 and N = 65,536. Per row: the floor and the modelled seconds of each forward
    variant (``fused`` the old scan, ``scan2``, ``gemm`` cuBLAS scores + select; decode:
    the old scan, or :data:`DECODE_MODEL` when set)."""
    from moram_kernels.backends.triton import model
    g, d, k, r = _gpu(hw), 4096, 16, 16
    out = []
    for case, t, n, bwd in (("prefill fwd", 4096, 16384, False), ("prefill fwd+bwd", 4096, 16384, True),
                            ("decode T=1 N=1024", 1, 1024, False), ("decode T=1 N=65536", 1, 65536, False)):
        fl = forward_flops(t, d, d, n, k) + (backward_flops(t, d, d, n, k, r) if bwd else 0)
        by = forward_bytes(t, d, d, n, k, 2) + (backward_bytes(t, d, d, n, k, r, 2) if bwd else 0)
        row = dict(case=case, t=t, n=n, floor_s=floor_s(fl, by, hw))
        extra = _backward_s(t, d, k, r, hw) if bwd else 0.0
        if t <= 64:
            row["fused"] = model.forward_s("fused", t, d, n, k, d, "bf16", g) + extra
            if DECODE_MODEL is not None:
                row["decode"] = DECODE_MODEL(t, d, n, k, d, g)
        else:
            for v in ("fused", "scan2", "gemm"):
                row[v] = model.forward_s(v, t, d, n, k, d, "bf16", g) + extra
        out.append(row)
    return out


def predict_ms(case: str, impl: str, t: int, hw: dict = H200, s: GpuCheckShape = GPU_CHECK) -> float | None:
    """Predicted milliseconds of one GPU check row (eager launches), or None if not modelled."""
    d, d_out, n, k = s.d_in, s.d_out, s.n, s.k
    gemm = max(2 * t * n * d / hw["tc_blas"], 2 * (n * d + t * d + t * n) / hw["hbm"])
    if impl.startswith("cuBLAS"):
        return 1e3 * gemm
    fwd_only = "bwd" not in case
    if impl.startswith("authors"):
        # score GEMM, dense value GEMM, ~10 passes over [T, N] fp32 (norm, s, topk, scatter,
        # softmax, threshold, c), reading all of B
        value = max(2 * t * n * d_out / hw["tc_blas"], 2 * n * d_out / hw["hbm"])
        tn = 10 * 4 * t * n / hw["hbm"]
        f = gemm + value + tn + 12 * hw["launch_s"]
        return 1e3 * (f if fwd_only else 3 * f)   # autograd: two more [T, N] GEMMs and passes
    if impl == "triton" or impl.startswith("triton:"):
        f = _triton_fwd_s(t, d, d_out, n, k, hw, impl.partition(":")[2] or None)
    elif impl == "cuda":
        # cuBLAS scores in fp32 chunks written and read back, a select kernel, the gather
        f = gemm + 2 * 4 * t * n / hw["hbm"] + 2 * min(t * k, n) * d_out / hw["hbm"] + 4 * hw["launch_s"]
    else:
        return None
    if fwd_only:
        return 1e3 * f
    return 1e3 * (f + _backward_s(t, d, k, s.r, hw))
