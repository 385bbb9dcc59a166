"""Top-K membership under the scoring dot's operand rounding (docs/testing.md, "Tolerances",
near-ties). The other tests keep a 2 % gap between the K-th and (K+1)-th score; here
every token has a near-tie far below the rounding bound of the dot's operands (TF32 for
fp32 at float32_matmul_precision "high", bf16 for bf16 compute), built so that exact
arithmetic and rounded operands rank the pair in OPPOSITE orders. The kernel's selection
must equal the selection of the fp64 reference computed on the operands rounded as the GPU
rounds them (the interpreter rounds fp32 to TF32 as ``cvt.rna.tf32.f32``; 16-bit operands
are the inputs cast by the dtype policy), and y must stay within the documented bound of
the fp64 oracle on the unrounded inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err, oracle, triton_test_device

DEV = triton_test_device()       # skips this module where the triton backend is unavailable

from moram_kernels.backends import triton as tk  # noqa: E402

TAU, EPS = 0.1, 1e-12
T, BLOCK, K = 4, 8, 3          # token t lives on coordinates [8 t, 8 t + 8): d_in = 32
#: docs/testing.md, "Tolerances": y against fp64 on the UNROUNDED inputs, relative to
#: max |y|; TF32 keeps fp16's 10-bit mantissa, so fp32-as-TF32 takes the fp16 line
BOUND = {"tf32": 2e-3, "bf16": 1.6e-2}


def tf32(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32, ties away from zero (``cvt.rna.tf32.f32``), written here
    independently of the kernel's ``round_tf32``."""
    b = v.float().contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


def rounding(kind):
    """(round an fp32 tensor to the dot's operand format, unit in the last place at 1.0)."""
    if kind == "tf32":
        return tf32, 2.0 ** -10
    return (lambda v: v.to(torch.bfloat16).float()), 2.0 ** -7


def near_tie_bank(kind, seed=0):
    """x [T, 32] and keys [16, 32] (fp32, x already representable in the operand format).
    Per token: two strong keys, then a pair (a, b) that ties within one ulp of a small
    component: b = a + 0.4 ulp at a component near 1 (below half an ulp: rounding erases
    it) - 1 ulp at a component near 1/64 (representable: rounding keeps it). Exactly, b
    scores higher; on rounded operands, a does. Both keep the same value row, so whichever
    wins, y moves only by the score difference."""
    rnd, ulp1 = rounding(kind)
    g = torch.Generator().manual_seed(seed)
    d = T * BLOCK
    x = torch.zeros(T, d)
    keys = torch.zeros(4 * T, d)
    values = torch.randn(4 * T, 12, generator=g)
    for t in range(T):
        c = slice(BLOCK * t, BLOCK * (t + 1))
        xb = rnd(torch.rand(BLOCK, generator=g) * 0.2)
        xb[0], xb[1] = 1.0, 1.0                      # m1 = 0, m2 = 1
        x[t, c] = xb
        a = rnd(torch.randn(BLOCK, generator=g) * 0.01)
        a[0], a[1] = 1.0, 1.0 / 64
        b = a.clone()
        b[0] = 1.0 + 0.4 * ulp1                      # erased by rounding
        b[1] = 1.0 / 64 - ulp1 / 64                  # one ulp of 1/64, kept
        assert rnd(b)[0] == a[0] and rnd(b)[1] != a[1]
        keys[4 * t, c] = 3.0 * xb                    # strong: far above the pair
        keys[4 * t + 1, c] = 2.5 * xb
        keys[4 * t + 2, c] = a
        keys[4 * t + 3, c] = b
        values[4 * t + 3] = values[4 * t + 2]
    return x, keys, values, rnd


def top_set(x, keys):
    p = x.double() @ keys.double().T
    return p.topk(K, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
def test_topk_membership_under_operand_rounding(kind, tf32_on):
    x, keys, values, rnd = near_tie_bank(kind)
    exact = top_set(x, keys)
    rounded = top_set(rnd(x), rnd(keys))
    # the construction: every token's pair flips between exact and rounded arithmetic,
    # by a gap far above fp32 accumulation error (~1e-6 here) and below the operand rounding
    assert (exact != rounded).any(-1).all(), "the near-ties do not flip; the test would prove nothing"
    p_r = rnd(x).double() @ rnd(keys).double().T
    pair_gap = torch.stack([(p_r[t, 4 * t + 2] - p_r[t, 4 * t + 3]).abs() for t in range(T)])
    assert (pair_gap > 1e-5).all() and (pair_gap < 2 * 2.0 ** -10).all(), pair_gap
    if kind == "tf32":
        xs, ks, vs = x, keys, values                 # fp32 in, TF32 dot (precision "high")
    else:
        xs, ks, vs = x.to(torch.bfloat16), keys, values   # the policy computes in bf16
    y, idx, _, _ = tk.moram_fwd(xs.to(DEV), ks.to(DEV), vs.to(DEV), None, ks[:0].to(DEV), vs[:0].to(DEV),
                                None, K, TAU, 0.0, EPS)
    got = idx.cpu().sort(-1).values
    assert torch.equal(got, rounded), f"selection {got.tolist()} != rounded-operand reference {rounded.tolist()}"
    y64 = oracle(x.double(), keys.double(), values.double(), k=K, tau=TAU, eps=EPS)
    err = max_rel_err(y.float().cpu(), y64)
    assert err <= BOUND[kind], f"y differs from fp64 by {err:.2e} > {BOUND[kind]:.1e} ({kind})"
