"""The ``triton`` backend: fused MoRAM forward and backward (contract in
:mod:`moram_kernels.backends.reference`).

The forward takes one of three roads, chosen per call by ``forward.fwd_route`` from
``MORAM_TRITON_FWD`` (``auto``: the cost model's fastest, ``split`` for decode and
``gemm`` for prefill): ``fused`` (below), ``split`` and ``gemm`` (:mod:`.split`: scores written
as fp32 ``[T, N]``, by a BGMV-style kernel that gives every SM two or more programs, or by
cuBLAS, then one select kernel over packed (score, id) keys with ``tl.topk`` networks;
no host synchronisation, so a decode step can be captured in a CUDA graph). All three
save the same idx/p_sel/norm, so the backward is one.

The ``fused`` road, three launches, no ``[T, N]`` tensor in device memory:

1. ``_moram_scan_kernel``, grid (token blocks, N splits): each program streams its atom
   tiles (segment 0 first, then segment 1; global ids), computes the ``[BT, BN]`` scores
   with ``tl.dot`` (fp32 accumulation), adds their squares to a running sum, and merges
   the tile into a running top-K per token (``merge_topk``: only scores above the current
   K-th are considered, so warm tiles cost one compare). It writes a partial list
   ``[T, splits, KP]``, partial sums of squares and its K-th best score ``[T, splits]``:
   O(T K) bytes.
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

Design notes
------------
**Dtype policy** (:mod:`moram_kernels._precision`, shared by every backend). Both dot
operands always have one dtype: the autocast dtype, else the lowest of x's and the atoms'
(the launchers cast at entry; through the public op the inputs already arrive cast, and
``MoRAMLinear`` caches its frozen bank in that dtype). So the scan is a bf16/fp16 MMA with
fp32 accumulation, never a mixed bf16 x fp32 product on CUDA cores (the variant that
existed before compiled without MMA instructions: an estimated 20-40x slower). fp32 runs as
TF32 unless ``torch.get_float32_matmul_precision()`` is "highest" (then IEEE on CUDA cores,
small tiles). The backward's torch GEMMs take the lower dtype of their operands with an
fp32 output (``aten::mm.dtype``, probed once per device; if missing, one warning and fp32
GEMMs); ``gram0`` is used in the dtype it comes in (MoRAMLinear caches it in the compute
dtype: no 67 MB cast per backward at d = 4096). Gradients return in each input's dtype.
In the interpreter (``UPCAST``) 16-bit operands are upcast exactly and fp32 ones rounded
to TF32 as ``cvt.rna.tf32`` does, so parity tests see a GPU's operand rounding.

**Grid plan.** ``plan_splits`` splits the atom tiles so that waves x (tiles per program
+ one tile of fixed cost) is least over SM count x ``ScanConfig.per_sm`` slots (a single
wave is not always best: 133 token blocks on 132 SMs gave two waves, the second one
program long; 32 blocks x 3 splits left 11 % of an A100 idle), where ``per_sm``
comes from the compiler's register and shared-memory counts (``.ci/triton_compile_check.py``
recomputes it and fails when a config claims more, or when any variant the launcher can
pick spills). Prefill at T = 4096, K <= 16: 128 x 64 tiles, 187 registers, one 8-warp
program per SM, 32 token blocks x 4 splits = 128 programs on 132 SMs (0.97 wave; before:
128 x 128 tiles, 255 registers with spills, 9 splits, 3 waves with the last 18 % full).
Decode (T <= 64): up to one tile per program, every SM streaming its share of the keys.
Integer sizes that only bound loops and masks are ``do_not_specialize`` (a new T or bank
size never recompiles); D and the strides stay specialised, since their divisibility by
16 decides vectorised, pipelined loads. Offsets that can pass 2^31 (column x stride of a
transposed view, chunk x T) are int64.

**Merge.** Inside a split, tiles are merged into the running top-K only above its current
K-th. Across splits the select kernel prunes first: every split holds K scores at least
its own K-th best, so a candidate below the largest split K-th cannot be in the global
top-K and is dropped before the merge. That prunes little at decode: a simulation
(``benchmarks/cost_model.py``: ``simulate_fused_rounds``) leaves ~2,300 of 4,096
candidates at N = 65,536 (256 splits, K = 16), ~1,000 merge rounds; the ``split`` road's
select instead picks the top KP groups of 16 atoms by maximum, then the top K of those
KP x 16 atoms (two ``tl.topk`` passes, no data-dependent loop).
Not done yet: seeding each split's threshold from a shared bound in the scan itself, and
``tl.topk`` / packed-key merges (both want a GPU to measure).

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
