"""Shared test tools: an independent float64 oracle of the authors' layer, input makers
that keep the K-th/(K+1)-th scores apart, and the tolerance rule of docs/testing.md."""

from __future__ import annotations

import math
import os

import pytest
import torch

import moram_kernels as mk

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Second line of the tolerance rule: error relative to max |reference|, per dtype.
REL_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def oracle(x, keys, values, *, k, tau, delta=0.0, eps=1e-12, value_scale=None, dtype=torch.float64):
    """The authors' layer restated independently (sort instead of topk, explicit loops of
    masks), computed entirely in ``dtype``; differentiable by autograd."""
    n = keys.shape[0]
    lead = x.shape[:-1]
    if n == 0:
        return torch.zeros(*lead, values.shape[1], dtype=dtype)
    xx = x.reshape(-1, x.shape[-1]).to(dtype)
    p = xx @ keys.to(dtype).T
    n_ = torch.sqrt((p * p).sum(-1, keepdim=True)).clamp(min=eps)
    s = p / n_
    kk = 1 if n == 1 else min(max(k, 2), n)
    order = torch.sort(s, dim=-1, descending=True).indices[:, :kk]
    keep = torch.zeros_like(s, dtype=torch.bool).scatter(1, order, True)
    z = torch.where(keep, s / tau, torch.full_like(s, -torch.inf))
    w = torch.exp(z - z.max(-1, keepdim=True).values)
    w = w / w.sum(-1, keepdim=True)
    if delta > 0:
        w = torch.where(s >= delta, w, torch.zeros_like(w))
    vals = values.to(dtype)
    if value_scale is not None:
        vs = value_scale.to(dtype)[:, None] if torch.is_tensor(value_scale) else value_scale
        vals = vals * vs
    return ((w * p) @ vals).reshape(*lead, values.shape[1])


def effective_k(k, n):
    return 1 if n == 1 else min(max(k, 2), n)


def score_gap(x, keys, k):
    """Per token: (K-th - (K+1)-th) largest raw score over the score spread, in float64.
    Tokens with a small gap may legitimately select different atoms in low precision."""
    p = x.reshape(-1, x.shape[-1]).double() @ keys.double().T
    kk = effective_k(k, keys.shape[0])
    if kk >= keys.shape[0]:
        return torch.full((p.shape[0],), float("inf"))
    top = p.topk(kk + 1, dim=-1).values
    spread = p.abs().amax(-1).clamp_min(1e-30)
    return (top[:, kk - 1] - top[:, kk]) / spread


def make_inputs(t, d_in, d_out, n, *, k, dtype=torch.float32, keys_dtype=None, seed=0,
                min_gap=0.02, lead=None, max_tries=200):
    """Random x, keys, values whose every token has a clear top-K gap (resampled per token)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=g) / d_in**0.5
    values = torch.randn(n, d_out, generator=g)
    x = torch.randn(t, d_in, generator=g)
    if n > 0 and t > 0:
        for _ in range(max_tries):
            bad = score_gap(x, keys, k) < min_gap
            if not bad.any():
                break
            x[bad] = torch.randn(int(bad.sum()), d_in, generator=g)
        else:
            raise AssertionError("could not draw well-separated scores; lower min_gap")
    kd = keys_dtype or dtype
    x = x.to(dtype)
    if lead is not None:
        x = x.reshape(*lead, d_in)
    return x, keys.to(kd), values.to(kd)


def max_rel_err(out, ref):
    ref = ref.double()
    scale = ref.abs().max().clamp_min(1e-12)
    return ((out.double() - ref).abs().max() / scale).item()


def assert_close(out, ref64, *, dtype, pytorch_lowp=None, what="output"):
    """docs/testing.md, "Tolerances": error against the float64 reference at most 2x PyTorch's own error
    in the same precision (``pytorch_lowp``), with the per-dtype table as a second line."""
    err = max_rel_err(out, ref64)
    bound = REL_ATOL[dtype]
    if pytorch_lowp is not None:
        lowp_err = max_rel_err(pytorch_lowp, ref64)
        # an overflowed (inf) or NaN PyTorch result would make any output pass
        assert math.isfinite(lowp_err), f"{what}: PyTorch's own {dtype} result is not finite: no bound to widen"
        bound = max(bound, 2 * lowp_err)
    assert err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.3e} ({dtype})"


def is_valid_topk(idx, x, keys, k, *, tol):
    """Each token's selected set is a top-K up to ``tol`` (ties at the K-th place allowed)."""
    p = x.double() @ keys.double().T
    kk = idx.shape[1]
    kth = p.topk(kk, dim=-1).values[:, -1:]
    chosen = p.gather(1, idx)
    distinct = all(len(set(r.tolist())) == kk for r in idx)
    return distinct and bool((chosen >= kth - tol * p.abs().amax(-1, keepdim=True)).all())


def triton_test_device() -> torch.device:
    """Where a Triton test module runs: CPU tensors under ``TRITON_INTERPRET=1`` (set by
    tests/conftest.py), CUDA otherwise. Skips the calling module when the triton backend is
    unavailable."""
    if "triton" not in mk.available_backends():
        pytest.skip(f"triton backend unavailable here: {mk.backends.why_unavailable('triton')}",
                    allow_module_level=True)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.device("cpu" if interp else "cuda")
