"""Pure-PyTorch MoRAM: readable first, fast never.

Three things live here (docs/op.md, "Forward" and "Backward"):

* :func:`moram_dense`: the authors' dense formulation, step by step (score,
  normalise, top-k, scatter to -inf, softmax/tau, threshold, dense matmul). It is
  plain autograd-differentiable PyTorch and is the baseline every benchmark
  compares against.
* :func:`moram_fwd` / :func:`moram_bwd`: the same math in sparse form, gathering
  only the K selected value rows, with the exact hand-derived backward. This pair is
  the ``"reference"`` backend and the contract every other backend implements.
* :func:`effective_k`: the authors' rule for K.

Backend contract (every backend module exposes the same two functions):

``moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, K, tau, delta, eps)``
    x ``[T, d_in]`` (any strides), two atom segments ``keys{0,1} [N_s, d_in]``,
    ``values{0,1} [N_s, d_out]``, ``scale{0,1}`` fp32 ``[N_s]`` or None (= 1).
    Atoms are numbered globally: segment 0 is ``[0, N0)``, segment 1 is
    ``[N0, N0 + N1)``. ``K`` is already the effective K (``1 <= K <= N``).
    Returns ``y [T, d_out]`` (dtype of x), ``idx [T, K]`` int64 (global atom ids),
    ``p_sel [T, K]`` fp32 raw scores of the selected atoms and ``norm [T]`` fp32,
    the clamped L2 norm. The order of the K selected atoms is unspecified.
    The public entry points cast x and the atoms to one compute dtype first
    (:mod:`moram_kernels._precision`); a backend still accepts mixed dtypes.

``moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0, idx, p_sel,
norm, tau, delta, eps, need_x, need_seg0, need_seg1)``
    ``gram0`` is ``keys0^T keys0`` ``[d_in, d_in]`` (accumulated in fp32, stored in fp32
    or in x's dtype) or None. Returns
    ``(gx, gkeys0, gvalues0, gkeys1, gvalues1)``; an entry is None when not needed.

Two segments exist so that :class:`~moram_kernels.MoRAMLinear` can pass its frozen
bank and its trainable atoms without concatenating them on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import acc_dtype

__all__ = ["effective_k", "moram_dense", "moram_fwd", "moram_bwd", "gram", "gate_backward",
           "gram_apply", "segment_grads"]


def effective_k(k: int, n: int) -> int:
    """K = min(max(k, 2), N): the authors force k >= 2 (N = 1 gives K = 1)."""
    return min(max(k, 2), n)


def moram_dense(
    x: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    k: int,
    tau: float,
    delta: float = 0.0,
    eps: float = 1e-12,
    value_scale: Tensor | float | None = None,
) -> Tensor:
    """The authors' dense adapter delta, ``[..., d_in] -> [..., d_out]``.

    Materialises the ``[T, N]`` scores, the ``[T, N]`` masked logits, the ``[T, N]``
    gate and a dense ``[T, N] x [N, d_out]`` matmul, exactly as their layer does;
    differentiable by autograd. Accumulates in fp32 like every backend.
    """
    n_atoms = keys.shape[0]
    lead = x.shape[:-1]
    if n_atoms == 0:
        return x.new_zeros(*lead, values.shape[1])
    acc = acc_dtype(x.dtype)   # fp64 for fp64 inputs, so gradcheck can run
    xf = x.reshape(-1, x.shape[-1]).to(acc)
    p = xf @ keys.to(acc).t()                                   # [T, N] raw scores
    s = p / p.norm(dim=-1, keepdim=True).clamp_min(eps)          # [T, N] normalised
    kk = effective_k(k, n_atoms)
    top_s, top_i = s.topk(kk, dim=-1)
    logits = torch.full_like(s, float("-inf")).scatter(-1, top_i, top_s / tau)  # [T, N]
    w = torch.softmax(logits, dim=-1)                            # [T, N], zero off top-k
    if delta > 0:
        w = w * (s >= delta).to(w.dtype)
    c = w * p                                                    # raw p carries the value
    b = values.to(acc)
    if isinstance(value_scale, Tensor):
        b = b * value_scale.to(acc)[:, None]
    elif value_scale is not None:
        b = b * float(value_scale)
    y = c @ b                                                    # [T, N] x [N, d_out]
    return y.to(x.dtype).reshape(*lead, values.shape[1])


def _cat_segments(t0: Tensor, t1: Tensor) -> Tensor:
    if t1.shape[0] == 0:
        return t0
    if t0.shape[0] == 0:
        return t1
    return torch.cat([t0, t1])


def _scales(scale0: Tensor | None, n0: int, scale1: Tensor | None, n1: int, x: Tensor) -> Tensor:
    acc = acc_dtype(x.dtype)   # fp64 for fp64 inputs, so gradcheck can run
    s0 = scale0.to(acc) if scale0 is not None else torch.ones(n0, device=x.device, dtype=acc)
    s1 = scale1.to(acc) if scale1 is not None else torch.ones(n1, device=x.device, dtype=acc)
    return _cat_segments(s0, s1)


def _gate(p_sel: Tensor, norm: Tensor, tau: float, delta: float) -> tuple[Tensor, Tensor]:
    """Softmax weights ``w [T, K]`` and the threshold mask ``m [T, K]`` (all ones if delta <= 0)."""
    s = p_sel / norm[:, None]
    w = torch.softmax(s / tau, dim=-1)
    m = (s >= delta).to(w.dtype) if delta > 0 else torch.ones_like(w)
    return w, m


def gram(keys: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``G = A^T A``, ``[d_in, d_in]`` (fp32 unless asked): ``||p||^2 = x^T G x``."""
    a = keys.to(dtype)
    return a.t() @ a


@torch.no_grad()
def moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, K, tau, delta, eps):
    """Sparse reference forward (see the module docstring for the contract)."""
    acc = acc_dtype(x.dtype)   # fp64 for fp64 inputs, so gradcheck can run
    keys = _cat_segments(keys0, keys1).to(acc)
    values = _cat_segments(values0, values1).to(acc)
    scale = _scales(scale0, keys0.shape[0], scale1, keys1.shape[0], x)
    p = x.to(acc) @ keys.t()                                     # [T, N]
    norm = p.norm(dim=-1).clamp_min(eps)                         # [T]
    p_sel, idx = p.topk(K, dim=-1)                               # [T, K]
    w, m = _gate(p_sel, norm, tau, delta)
    c = w * m * p_sel * scale[idx]                               # [T, K]
    y = torch.einsum("tk,tkd->td", c, values[idx])               # gather K rows per token
    return y.to(x.dtype), idx, p_sel, norm


def gate_backward(gc: Tensor, p_sel: Tensor, norm: Tensor, tau: float, delta: float,
                  eps: float) -> tuple[Tensor, Tensor]:
    """From ``gc [T, K]`` (``scale_i * (b_i . gy)`` of the selected atoms) to the score
    gradient: its sparse part ``g_sel [T, K]`` on the selected atoms and ``alpha [T]``,
    the coefficient of the dense part ``-alpha * p_j`` that every atom receives."""
    w, m = _gate(p_sel, norm, tau, delta)
    gw = m * p_sel * gc
    gs = (w / tau) * (gw - (w * gw).sum(-1, keepdim=True))
    g_sel = w * m * gc + gs / norm[:, None]                      # sparse part of gp, [T, K]
    # n = max(||p||, eps) is constant where it was clamped, so no norm gradient there.
    alpha = (gs * p_sel).sum(-1) / norm**3
    alpha = torch.where(norm > eps, alpha, torch.zeros_like(alpha))   # [T]
    return g_sel, alpha


def gram_apply(xf: Tensor, segments) -> Tensor:
    """``sum_j p_j a_j = G x`` over the atoms of ``segments`` (pairs ``(keys [N_s, d_in],
    gram [d_in, d_in] or None)``), ``[T, d_in]`` in the dtype of ``xf``: the cached gram when
    given, else whichever of ``(x A^T) A`` and ``x (A^T A)`` is cheaper."""
    dense = torch.zeros_like(xf)
    for kseg, g in segments:
        if kseg.shape[0] == 0:
            continue
        a = kseg.to(xf.dtype)
        t, n_s, d = xf.shape[0], a.shape[0], a.shape[1]
        if g is not None:
            dense += xf @ g.to(xf.dtype)
        elif 2 * t * n_s <= n_s * d + t * d:                     # recompute P A: 2TNd < Nd^2 + Td^2
            dense += (xf @ a.t()) @ a
        else:
            dense += xf @ (a.t() @ a)
    return dense


def segment_grads(xf: Tensor, gyf: Tensor, kseg: Tensor, vseg: Tensor, lo: int, idx: Tensor,
                  g_sel: Tensor, alpha: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of one segment's keys and values, atoms ``[lo, lo + N_s)`` of the numbering
    of ``idx [T, K]`` (ids outside it are other atoms'). Keys get the dense ``-alpha * p_j``
    term plus ``g_sel`` where selected; values get ``coef [T, K] * gy`` (``coef = c_i *
    scale_i``) scattered over tokens."""
    if kseg.shape[0] == 0:
        return torch.zeros_like(kseg), torch.zeros_like(vseg)
    inside = (idx >= lo) & (idx < lo + kseg.shape[0])
    local = torch.where(inside, idx - lo, torch.zeros_like(idx))
    # dense over the segment's atoms: every atom receives -alpha * p_j
    gp = -alpha[:, None] * (xf @ kseg.to(xf.dtype).t())          # [T, N_seg]
    gp.scatter_add_(1, local, torch.where(inside, g_sel, torch.zeros_like(g_sel)))
    gk = gp.t() @ xf
    coef = torch.where(inside, coef, torch.zeros_like(coef))     # [T, K]
    gv = torch.zeros(kseg.shape[0], gyf.shape[1], device=xf.device, dtype=xf.dtype)
    gv.index_add_(0, local.reshape(-1), (coef[:, :, None] * gyf[:, None, :]).reshape(-1, gyf.shape[1]))
    return gk.to(kseg.dtype), gv.to(vseg.dtype)


@torch.no_grad()
def moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
              idx, p_sel, norm, tau, delta, eps, need_x, need_seg0, need_seg1):
    """Exact sparse backward, docs/op.md, "Backward", with the threshold mask if delta > 0."""
    n0, n1 = keys0.shape[0], keys1.shape[0]
    acc = acc_dtype(x.dtype)   # fp64 for fp64 inputs, so gradcheck can run
    keys = _cat_segments(keys0, keys1).to(acc)
    values = _cat_segments(values0, values1).to(acc)
    scale = _scales(scale0, n0, scale1, n1, x)
    xf, gyf = x.to(acc), gy.to(acc)
    w, m = _gate(p_sel, norm, tau, delta)
    sc = scale[idx]                                              # [T, K]
    gc = sc * torch.einsum("tkd,td->tk", values[idx], gyf)       # gather-dot
    g_sel, alpha = gate_backward(gc, p_sel, norm, tau, delta, eps)

    gx = None
    if need_x:
        dense = gram_apply(xf, ((keys0, gram0), (keys1, None)))  # G x~, G = A^T A over all atoms
        sparse = torch.einsum("tk,tkd->td", g_sel, keys[idx])
        gx = (sparse - alpha[:, None] * dense).to(x.dtype)      # dense term: -alpha G x
    seg_grads: list[Tensor | None] = [None, None, None, None]   # gk0, gv0, gk1, gv1
    coef = w * m * p_sel * sc                                    # c_i * scale_i, [T, K]
    for seg, lo, kseg, vseg, need in ((0, 0, keys0, values0, need_seg0),
                                      (1, n0, keys1, values1, need_seg1)):
        if need:
            seg_grads[2 * seg:2 * seg + 2] = segment_grads(xf, gyf, kseg, vseg, lo, idx,
                                                           g_sel, alpha, coef)
    return (gx, *seg_grads)
