"""The ``triton`` backend: fused MoRAM forward and backward (contract in
:mod:`moram_kernels.backends.reference`).

The forward takes one of five routes, chosen per call by ``forward.fwd_route`` from
``MORAM_TRITON_FWD``: ``fused`` (below), ``scan2`` (the fused route with the prefill scan
of :mod:`.scan2`), ``split``, ``gemm`` and ``gemm2`` (:mod:`.split`: scores written as
fp32 ``[T, N]``, by a BGMV-style kernel that gives every SM two or more programs, or by
cuBLAS, then one pick kernel over packed (score, id) keys with ``tl.topk`` networks;
``gemm2`` first reduces cuBLAS's scores to group maxima with a kernel as wide as them;
no host synchronisation, so a decode step can be captured in a CUDA graph). ``auto``
(the default) takes ``split`` up to 16 tokens and above that the route the runtime model
(:mod:`.model`) prices lowest. All five save the
same idx/p_sel/norm, so the backward is one.

The ``fused`` road, three launches, no ``[T, N]`` tensor in device memory:

1. ``_moram_scan_kernel``, grid (token blocks, N splits): each program streams its atom
   tiles (segment 0 first, then segment 1; global ids), computes the ``[BT, BN]`` scores
   with ``tl.dot`` (fp32 accumulation), adds their squares to a running sum, and merges
   the tile into a running top-K per token (``merge_topk``: only scores above the current
   K-th are considered; a tile costs one compare only when no row of the block has such
   a score, which at 128 rows never happens: see **Merge**). It writes a partial list
   ``[T, splits, KP]``, partial sums of squares and its K-th best score ``[T, splits]``:
   O(T K) bytes. ``MORAM_TRITON_FWD=scan2`` (or ``auto``, when the model prices it lower)
   runs ``_moram_scan2_kernel`` (:mod:`.scan2`) instead: 128 x 128 tiles in one flattened
   tile loop, every tile merged by a sorting network over packed (score, id) int64 keys;
   same outputs.
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
recomputing ``P A`` costs fewer FLOPs. That is backward ``v1``; ``MORAM_TRITON_BWD``
(read per call, :func:`.backward.bwd_variant`) picks it or ``v2``, the default: a small
segment's ``P A`` (the trainable atoms) folded into ``_moram_bwd_dx_kernel`` instead of a
``[T, d_in]`` tensor, a missing Gram built in the compute dtype, and the atomic dB kernel
reading ``gy`` only for the tokens that selected an atom of its segment.

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

**Merge** (counts from :mod:`.model`'s simulation on Gaussian scores, k = 16, d = 4096).
Inside a split, the old scan merges a tile into the running top-K only above its current
K-th, with one loop trip per candidate of the busiest row (at most KP). A row's top-K
changes about ``K ln(N / K)`` times, but the loop runs for the busiest of 128 rows: at
T = 4096, N = 16,384 a program runs about 280 rounds over its 64 tiles (550 SASS
instructions each on sm_90) and no tile is ever skipped; only decode's single real row
makes warm tiles cheap. ``scan2`` merges every tile with no data-dependent loop
(``tl.topk`` of each column half to KP, a bitonic merge with the running list), a fixed
cost the model prices per tile. Across splits the select kernel prunes first: every split
holds K scores at least its own K-th best, so a candidate below the largest split K-th
cannot be in the global top-K and is dropped before the merge. That leaves about 50 of
64 candidates at prefill's 4 splits, and about 1,600 of 4,096 at decode's 256 splits
(N = 65,536), merged in about 90 rounds: pruning is weak when the splits are short. The
``split`` route's pick has no such merge: the top KP groups of 16 atoms by maximum, then
the top K of those KP x 16 atoms (``tl.topk`` passes, no data-dependent loop).
Not done yet: seeding each split's threshold from a shared bound in the scan itself.

**Model.** :mod:`.model` prices each route from its score tiles' MMAs (or the cuBLAS
GEMM, or the keys' bytes at decode), the simulated merge rounds or pick work, the gather
and the launches. At the shape below (H200, bf16, T = 4096, N = 16,384) it gives the old
scan ~1.12 ms (64 tiles of 128 x 64 per program, each with a pipeline refill, plus ~280
merge rounds), ``scan2`` ~1.11 ms (32 tiles of 128 x 128, each with a 6,348-instruction
merge that nothing overlaps: one 255-register program per SM) and ``gemm`` ~1.11 ms
(0.70 ms GEMM, 0.36 ms pick over the fp32 scores), against the 0.70 ms floor: a dead heat
(``auto`` takes ``scan2``, by 0.4 %), and the merges, not the MMA pipeline, hold the
scans back. At decode (T = 1, N = 65,536) ``split`` ~0.147 ms against the keys' 0.125 ms
read. ``benchmarks/cost_model.py: issue_rows()`` prints the four tracked rows.

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
