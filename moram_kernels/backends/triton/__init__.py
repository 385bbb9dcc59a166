"""The ``triton`` backend: fused MoRAM forward and backward (contract in
:mod:`moram_kernels.backends.reference`).

Forward, two launches, no ``[T, N]`` tensor in device memory:

1. ``_moram_scan_kernel``, grid (token blocks, N splits): each program streams its atom
   tiles (segment 0 first, then segment 1; global ids), computes the ``[BT, BN]`` scores
   with ``tl.dot`` (fp32 accumulation), adds their squares to a running sum, and merges
   the tile into a running top-K per token (``merge_topk``: only scores above the current
   K-th are considered, so warm tiles cost one compare). It writes a partial list
   ``[T, splits, KP]`` and partial sums of squares ``[T, splits]``: O(T K) bytes. Splits are
   chosen so the grid holds about two programs per SM: decode (T <= 64) and small T use
   every SM instead of one or two.
2. ``_moram_select_kernel``: merges the partial lists, then the epilogue (norm, s,
   softmax/tau, threshold, ``c = w m p scale``); saves idx/p_sel/norm and c.
3. ``_moram_gather_kernel``, grid (token blocks, column chunks): ``y = sum_k c_k b_k`` in
   fp32, the K row loads unrolled so they are all in flight at once.

Backward: ``_moram_bwd_gc_kernel`` (gather-dot ``gc`` per column chunk),
``_moram_bwd_coef_kernel`` (softmax and norm terms, alpha), ``_moram_gather_kernel``
again for dx (sparse sum over the K keys fused with ``-alpha * (G x)``),
``_moram_bwd_db_*_kernel`` (dB scatter-add: atomics, or a sorted deterministic reduction
under ``torch.use_deterministic_algorithms(True)``); the dense GEMMs (``x G``,
``P_s = x A_s^T`` and ``dA_s = gp_s^T x`` for the segments that need key gradients) are
torch matmuls. ``G x`` uses ``gram0`` when given, or whichever of building G or
recomputing ``P A`` costs fewer FLOPs.

Floors, for d_in = d_out = d = 4096, N = 16384, k = 16, T = 4096, bf16 (H100/H200:
~990 TFLOP/s dense bf16 peak, ~790 reached by cuBLAS; HBM ~4.3 TB/s measured on H200):

=====================  ==========================  =========================================
part                   FLOPs                       bytes
=====================  ==========================  =========================================
scoring x A^T          2 T N d = 549.8 G           A: N d 2 = 134.2 MB (x, y: 33.6 MB each)
value gather           2 T K d = 0.54 G            <= min(T K, N) d 2 = 134.2 MB of B rows
forward total          550.3 G                     335.5 MB  -> 1640 FLOP/B: compute-bound,
                                                   floor ~0.70 ms at 790 TFLOP/s
backward, training     gc + dx gather 4 T K d =    gy, x, gx: 33.6 MB each; K rows of A and B
(frozen bank + 16      1.07 G; x G 2 T d^2 =       per token (L2 hits mostly)
trainable, gram0       137.4 G; P1, dA1 4 T r d =
cached)                1.07 G; total 139.6 G       floor ~0.18 ms
decode T <= 64         2 T N d (<= 8.6 G)          A once: 134.2 MB -> floor 31 us at 4.3 TB/s
=====================  ==========================  =========================================

The authors' dense path adds a [T, N] x [N, d] value GEMM (549.8 G), ~five [T, N] fp32
tensors (268 MB each) and ``torch.topk``; its backward two more dense [T, N] GEMMs.
"""

from .backward import moram_bwd
from .forward import moram_fwd

__all__ = ["moram_fwd", "moram_bwd"]
