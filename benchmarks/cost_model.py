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
``gpu-check`` preset: each Triton forward route by the package's runtime model
(``moram_kernels.backends.triton.model``: score tiles at ``SCAN_EFF`` of the tensor-core
peak, merge rounds and pick work counted by simulation, over the SMs its grid keeps busy;
:func:`route_ms`); the authors' path as two GEMMs plus ten passes over ``[T, N]`` fp32;
``launch_s`` per eager launch.
The GPU check prints each prediction beside the measured time, so the model is checked on
every GPU run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["forward_flops", "forward_bytes", "backward_flops", "backward_bytes", "work", "dense_flops",
           "floor_s", "HARDWARE", "H200", "GPU_CHECK", "plan", "predict_ms", "issue_rows", "route_ms",
           "route_terms_ms", "decode_floor_ms"]


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
#: bandwidth measured with a device copy and L2 read bandwidth (bytes/s), the SM clock under
#: tensor-core load (Hz) and the cost of one eager launch (s). The same numbers as the
#: package's runtime model (``moram_kernels.backends.triton.model.GPUS``; a test pins the
#: two together): the Triton package is optional, this module must import without it.
HARDWARE: dict[str, dict[str, float]] = {
    "H200": dict(sms=132, tc_peak=990e12, tc_blas=790e12, hbm=4.3e12, l2=7.0e12, clock=1.75e9, launch_s=4e-6),
    "A100": dict(sms=108, tc_peak=312e12, tc_blas=280e12, hbm=1.9e12, l2=4.5e12, clock=1.41e9, launch_s=4e-6),
}
H200 = HARDWARE["H200"]


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


def _gpu(hw: dict):
    """``hw`` as the runtime model's :class:`~moram_kernels.backends.triton.model.Gpu`."""
    from moram_kernels.backends.triton import model
    name = next((k for k, v in HARDWARE.items() if v["sms"] == hw["sms"]), "custom")
    return model.Gpu(name, **{k: hw[k] for k in ("sms", "tc_peak", "tc_blas", "hbm", "clock", "launch_s", "l2")})


def _backward_s(t, d, k, r, hw=H200, variant="v2"):
    """Training backward (``MORAM_TRITON_BWD`` ``variant``, d_out = d_in = d): x G (2 T d^2)
    on tensor cores, P and dA of the r trainable atoms, the gathers (K rows of A and B per
    token, mostly L2) and about ten launches. ``v1`` also writes the trainable segment's
    ``P A`` as a ``[T, d]`` fp32 tensor and sums it with ``x G`` in torch (16 T d bytes,
    two launches), and its dB programs read all of ``gy`` (2 T d bytes), where ``v2`` folds
    the term into the dx kernel and reads ``gy`` only for tokens that hit the segment."""
    v2 = (2 * t * d * d + 4 * t * r * d) / hw["tc_blas"] + 3 * 2 * t * d / hw["hbm"] \
        + 2 * 2 * t * k * d / hw["hbm"] + 10 * hw["launch_s"]
    if variant == "v1":
        return v2 + (16 + 2) * t * d / hw["hbm"] + 2 * hw["launch_s"]
    return v2


def issue_rows(hw: dict = H200) -> list[dict]:
    """Model against floor for the four tracked GPU rows (bf16, d = 4096, k = 16):
    prefill forward and forward + backward at T = 4096, N = 16,384; decode of one token at
    N = 1,024 under a CUDA graph and at N = 65,536 (eager). Per row: ``floor_s``, the
    modelled seconds of every forward route (:func:`route_ms`, plus the backward on the
    fwd+bwd row) and ``auto``, the route ``MORAM_TRITON_FWD=auto`` takes."""
    from moram_kernels.backends.triton.forward import fwd_route
    from moram_kernels.backends.triton.model import ROUTES
    d, k, r = 4096, 16, 16
    out = []
    for case, t, n, bwd, graph in (("prefill fwd", 4096, 16384, False, False),
                                   ("prefill fwd+bwd", 4096, 16384, True, False),
                                   ("decode T=1 N=1024 (graph)", 1, 1024, False, True),
                                   ("decode T=1 N=65536", 1, 65536, False, False)):
        fl = forward_flops(t, d, d, n, k) + (backward_flops(t, d, d, n, k, r) if bwd else 0)
        by = forward_bytes(t, d, d, n, k, 2) + (backward_bytes(t, d, d, n, k, r, 2) if bwd else 0)
        row = dict(case=case, t=t, n=n, floor_s=floor_s(fl, by, hw), auto=fwd_route(t, n, d, sms=hw["sms"]))
        extra = _backward_s(t, d, k, r, hw) if bwd else 0.0
        for v in ROUTES:
            row[v] = 1e-3 * route_ms(v, t, d, d, n, k, hw, graph=graph) + extra
        out.append(row)
    return out


def predict_ms(case: str, impl: str, t: int, hw: dict = H200, s: GpuCheckShape = GPU_CHECK) -> float | None:
    """Predicted milliseconds of one GPU check row (launches at ``hw["launch_s"]``), or None
    if not modelled. ``impl`` "triton" (or "triton bwd=v2") is the forward route ``auto``
    takes, "triton fwd=scan2" (or "triton:scan2", any of the five routes) one route."""
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
    if impl == "triton" or impl.startswith(("triton:", "triton ")):
        # "triton fwd=<route>" (or "triton:<route>") is one forward route (MORAM_TRITON_FWD);
        # "triton" (or "triton bwd=<v>") the route fwd_route's auto takes
        from moram_kernels.backends.triton.forward import fwd_route
        m = re.search(r"(?:fwd=|:)(\w+)", impl)
        route = m.group(1) if m else fwd_route(t, n, d, sms=hw["sms"])
        f = 1e-3 * route_ms(route, t, d, d_out, n, k, hw)
    elif impl == "cuda":
        # cuBLAS scores in fp32 chunks written and read back, a select kernel, the gather
        f = gemm + 2 * 4 * t * n / hw["hbm"] + 2 * min(t * k, n) * d_out / hw["hbm"] + 4 * hw["launch_s"]
    else:
        return None
    if fwd_only:
        return 1e3 * f
    return 1e3 * (f + _backward_s(t, d, k, s.r, hw, "v1" if "bwd=v1" in impl else "v2"))


# ---- forward routes: the package's runtime model ----------------------------------------------
#
# The Triton forward has five routes (``MORAM_TRITON_FWD``, docs/backends.md): ``fused``,
# ``scan2``, ``split``, ``gemm`` and ``gemm2``. Their model, with the simulations of the merge rounds
# (the fused scan and its select) and of the pick kernel (split, gemm, gemm2), lives in the
# package, since ``auto`` needs it at run time: ``moram_kernels.backends.triton.model``.
# These wrappers print it in milliseconds for a ``HARDWARE`` entry.

def route_terms_ms(route: str, t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, *,
                   graph: bool = False) -> dict:
    """One forward on ``route`` (bf16), term by term in ms (``scores``, ``select``,
    ``gather``, ``launch``, ``total``: ``model.forward_terms``); ``graph``: the launches
    as CUDA graph nodes."""
    from moram_kernels.backends.triton import model
    terms = model.forward_terms(route, t, d_in, n, k, d_out, "bf16", _gpu(hw), graph)
    return {key: 1e3 * v for key, v in terms.items()}


def route_ms(route: str, t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, *,
             graph: bool = False) -> float:
    """Predicted milliseconds of one forward on ``route`` ("fused", "scan2", "split",
    "gemm", "gemm2"), bf16; ``fwd_route``'s ``auto`` takes ``split`` at decode and the cheapest
    of the others above (a test pins the two together)."""
    return route_terms_ms(route, t, d_in, d_out, n, k, hw, graph=graph)["total"]


def decode_floor_ms(t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, elt: int = 2) -> float:
    """HBM floor of a decode step: keys once, the K value rows, x and y."""
    return 1e3 * forward_bytes(t, d_in, d_out, n, min(k, n), elt) / hw["hbm"]
