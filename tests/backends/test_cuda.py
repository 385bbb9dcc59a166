"""Parity of the ``cuda`` backend (csrc/cuda) with the reference, forward and backward.

Needs a CUDA GPU and the extension built with its CUDA kernels; skips with the reason
otherwise. The checks are written as functions of the backend module and the device
(``check_forward`` / ``check_backward``), so they can be exercised on any backend.

Selection is compared through the selected scores (near-ties may pick either atom),
and the output is compared with the reference formula applied to the atoms this
backend selected. The backward gets the reference forward's ``idx, p_sel, norm``, so
both backward passes see the same selection.
"""

from __future__ import annotations

import pytest
import torch

import moram_kernels as mk
from moram_kernels import backends as _dispatch
from moram_kernels.backends import reference

TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to max |ref|


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    why = _dispatch.why_unavailable("cuda")
    return f"cuda backend unavailable: {why}" if why else None


def make_case(device, dtype, T, d_in, d_out, n0, n1, *, scaled=True, atom_dtype=None, seed=0):
    """Random inputs with segment 0 of n0 atoms and segment 1 of n1 atoms."""
    g = torch.Generator().manual_seed(seed)
    atom_dtype = atom_dtype or dtype

    def rnd(*shape, dt):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    case = dict(
        x=rnd(T, d_in, dt=dtype),
        keys0=rnd(n0, d_in, dt=atom_dtype), values0=rnd(n0, d_out, dt=atom_dtype),
        keys1=rnd(n1, d_in, dt=atom_dtype), values1=rnd(n1, d_out, dt=atom_dtype),
        scale0=None, scale1=None)
    if scaled:
        case["scale0"] = (torch.rand(n0, generator=g) + 0.5).to(device)
        case["scale1"] = torch.full((n1,), 0.25, device=device)
    return case


def _segments(c):
    return (c["keys0"], c["values0"], c["scale0"], c["keys1"], c["values1"], c["scale1"])


def _assert_close(got, want, dtype, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.float().abs().max().item() if want.numel() else 0.0
    atol = TOL[dtype] * max(scale, 1e-6)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=atol, msg=lambda m: f"{what}: {m}")


def check_forward(impl, c, K, tau, delta, eps=1e-12):
    x = c["x"]
    keys0, values0, scale0, keys1, values1, scale1 = _segments(c)
    y, idx, p_sel, norm = impl.moram_fwd(x, *_segments(c), K, tau, delta, eps)
    ry, ridx, rp_sel, rnorm = reference.moram_fwd(x, *_segments(c), K, tau, delta, eps)
    T, n = x.shape[0], keys0.shape[0] + keys1.shape[0]
    assert y.dtype == x.dtype and idx.dtype == torch.int64
    assert p_sel.dtype == torch.float32 and norm.dtype == torch.float32
    assert idx.shape == (T, K) and p_sel.shape == (T, K) and norm.shape == (T,)
    torch.testing.assert_close(norm, rnorm, rtol=1e-4, atol=0)

    # a valid selection: distinct in-range ids whose scores are the K largest
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "an atom was selected twice for one token"
    keys = torch.cat([keys0, keys1]).float()
    p_full = x.float() @ keys.t()
    p_tol = 1e-4 * p_full.abs().max().item()
    torch.testing.assert_close(p_sel, p_full.gather(1, idx), rtol=0, atol=p_tol)
    torch.testing.assert_close(p_sel.sort(-1, descending=True).values,
                               rp_sel.sort(-1, descending=True).values, rtol=0, atol=p_tol)

    # the output is the reference formula on the atoms selected here
    values = torch.cat([values0, values1]).float()
    scale = reference._scales(scale0, keys0.shape[0], scale1, keys1.shape[0], x)
    w, m = reference._gate(p_sel, rnorm, tau, delta)
    want = torch.einsum("tk,tkd->td", w * m * p_sel * scale[idx], values[idx])
    _assert_close(y, want.to(x.dtype), x.dtype, "y")
    _assert_close(y, ry, x.dtype, "y vs reference y")
    return y, idx, p_sel, norm


def check_backward(impl, c, K, tau, delta, *, need=(True, True, True), with_gram=True,
                   eps=1e-12, seed=1):
    x = c["x"]
    keys0 = c["keys0"]
    _, idx, p_sel, norm = reference.moram_fwd(x, *_segments(c), K, tau, delta, eps)
    gy = torch.randn(x.shape[0], c["values0"].shape[1],
                     generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    gram0 = reference.gram(keys0) if with_gram else None
    args = (gy, x, *_segments(c), gram0, idx, p_sel, norm, tau, delta, eps, *need)
    got = impl.moram_bwd(*args)
    want = reference.moram_bwd(*args)
    names = ("gx", "gkeys0", "gvalues0", "gkeys1", "gvalues1")
    needed = (need[0], need[1], need[1], need[2], need[2])
    for name, g, r, n in zip(names, got, want, needed):
        if not n:
            assert g is None, f"{name} was not asked for"
            continue
        assert g is not None and g.dtype == r.dtype, f"{name}: dtype {None if g is None else g.dtype}"
        _assert_close(g, r, r.dtype, name)
    return got


# ---- without the backend: clear refusals (these run everywhere) -------------------------------

def test_forced_cuda_backend_on_cpu_tensors_says_why():
    x, keys, values = torch.randn(3, 8), torch.randn(10, 8), torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        mk.moram(x, keys, values, k=2, tau=0.1, backend="cuda")


def test_cuda_module_refuses_to_import_without_cuda_kernels():
    from moram_kernels.backends import compiled as _C_loader
    why = _C_loader.why_unavailable("cuda")
    if why is None:
        pytest.skip("the extension here carries the CUDA kernels")
    with pytest.raises(ImportError, match="(?i)cuda kernels"):
        import moram_kernels.backends.cuda  # noqa: F401


# ---- the tests (GPU only) --------------------------------------------------------------------

_why = _unavailable()


def needs_gpu(test):
    """A GPU test: skipped, with the reason, where the cuda backend cannot run."""
    return pytest.mark.gpu(pytest.mark.skipif(_why is not None, reason=_why or "")(test))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#        T,  d_in, d_out, n0,   n1,  K
SHAPES = [(37, 33, 19, 50, 7, 5),          # odd widths: scalar (non-vector) row access
          (64, 64, 128, 160, 0, 16),       # the paper's size, one segment
          (9, 96, 40, 0, 24, 24),          # only trainable atoms, K = N1
          (3, 16, 8, 1, 0, 1),             # N = 1
          (21, 64, 72, 3000, 16, 16),      # many atoms: every warp scans, then a merge
          (11, 40, 24, 700, 13, 64)]       # K = 64: both slots of every lane


def _ids(shape):
    return "T{}_din{}_dout{}_n{}+{}_K{}".format(*shape)


@pytest.fixture(scope="module")
def impl():
    return _dispatch._BY_NAME["cuda"].impl()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("delta", [0.0, 0.2])
def test_forward_parity(impl, dtype, shape, delta):
    T, d_in, d_out, n0, n1, K = shape
    c = make_case("cuda", dtype, T, d_in, d_out, n0, n1)
    check_forward(impl, c, K, tau=0.05, delta=delta)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("delta", [0.0, 0.2])
def test_backward_parity(impl, dtype, shape, delta):
    T, d_in, d_out, n0, n1, K = shape
    c = make_case("cuda", dtype, T, d_in, d_out, n0, n1)
    # an empty segment has no gradient to compare (its gradients are [0, d] tensors)
    check_backward(impl, c, K, tau=0.05, delta=delta, need=(True, n0 > 0, n1 > 0),
                   with_gram=(n0 % 2 == 0))


@needs_gpu
@pytest.mark.parametrize("need", [(True, False, False), (False, False, True), (False, True, False)])
def test_backward_only_what_is_needed(impl, need):
    c = make_case("cuda", torch.float32, 13, 24, 16, 40, 8)
    check_backward(impl, c, 6, tau=0.1, delta=0.0, need=need, with_gram=False)


@needs_gpu
@pytest.mark.parametrize("x_dtype,atom_dtype", [(torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float16),
                                                (torch.float16, torch.bfloat16)], ids=str)
def test_mixed_dtypes(impl, x_dtype, atom_dtype):
    """The dtype policy: mixed inputs compute in the lower dtype (x's on an fp16/bf16 tie),
    so they give what the same call on inputs cast to that dtype gives; the output keeps
    x's dtype and every gradient its own input's dtype."""
    from moram_kernels._precision import lowest
    c = make_case("cuda", x_dtype, 19, 32, 24, 64, 8, atom_dtype=atom_dtype)
    low = lowest(x_dtype, atom_dtype)
    cast = {k: (v.to(low) if torch.is_tensor(v) and not k.startswith("scale") else v) for k, v in c.items()}
    check_forward(impl, cast, 8, tau=0.03, delta=0.0)
    check_backward(impl, cast, 8, tau=0.03, delta=0.0)
    y, idx, p_sel, norm = impl.moram_fwd(c["x"], *_segments(c), 8, 0.03, 0.0, 1e-12)
    yc, idxc, p_selc, normc = impl.moram_fwd(cast["x"], *_segments(cast), 8, 0.03, 0.0, 1e-12)
    assert y.dtype == x_dtype and torch.equal(idx, idxc)
    _assert_close(y, yc.to(x_dtype), low, "mixed y vs the policy's")
    gy = torch.randn_like(y)
    got = impl.moram_bwd(gy, c["x"], *_segments(c), None, idx, p_sel, norm, 0.03, 0.0, 1e-12, True, True, True)
    for g, like in zip(got, (c["x"], c["keys0"], c["values0"], c["keys1"], c["values1"])):
        assert g.dtype == like.dtype and g.shape == like.shape


@needs_gpu
def test_non_contiguous_x(impl):
    c = make_case("cuda", torch.float32, 17, 48, 24, 90, 6)
    c["x"] = torch.randn(48, 17 * 2, device="cuda").t()[::2]     # [17, 48], strided
    assert not c["x"].is_contiguous()
    check_forward(impl, c, 7, tau=0.05, delta=0.0)
    check_backward(impl, c, 7, tau=0.05, delta=0.0)


@needs_gpu
def test_zero_and_nan_tokens_stay_local(impl):
    c = make_case("cuda", torch.float32, 6, 32, 16, 50, 0)
    c["x"][1] = 0.0
    c["x"][3, 5] = float("nan")
    y, idx, _, norm = impl.moram_fwd(c["x"], *_segments(c), 4, 0.05, 0.0, 1e-12)
    assert torch.equal(y[1], torch.zeros_like(y[1])), "a zero token must add exactly zero"
    assert norm[1].item() == torch.tensor(1e-12, dtype=torch.float32).item()   # clamped to eps
    assert torch.isnan(y[3]).all()
    keep = [0, 1, 2, 4, 5]
    assert torch.isfinite(y[keep]).all()
    assert int(idx.min()) >= 0 and int(idx.max()) < 50


@needs_gpu
def test_dvalues_is_deterministic(impl):
    # many tokens on few atoms: every atom row sums hundreds of contributions
    c = make_case("cuda", torch.float32, 4096, 32, 64, 8, 8)
    a = check_backward(impl, c, 4, tau=0.05, delta=0.0, with_gram=False)
    b = check_backward(impl, c, 4, tau=0.05, delta=0.0, with_gram=False)
    for ga, gb in zip(a, b):
        assert torch.equal(ga, gb)


@needs_gpu
def test_autograd_through_moram_matches_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 32, generator=g).cuda().requires_grad_()
    keys = torch.randn(70, 32, generator=g).cuda().requires_grad_()
    values = torch.randn(70, 24, generator=g).cuda().requires_grad_()
    grads = {}
    for name in ("cuda", "reference"):
        for t in (x, keys, values):
            t.grad = None
        y = mk.moram(x, keys, values, k=8, tau=0.05, value_scale=0.5, backend=name)
        (y * torch.linspace(-1, 1, 24, device="cuda")).sum().backward()
        grads[name] = (y.detach(), x.grad.clone(), keys.grad.clone(), values.grad.clone())
    for got, want in zip(grads["cuda"], grads["reference"]):
        _assert_close(got, want, torch.float32, "autograd")


@needs_gpu
def test_k_above_64_is_refused(impl):
    c = make_case("cuda", torch.float32, 4, 16, 8, 100, 0)
    with pytest.raises(RuntimeError, match="k must be in"):
        impl.moram_fwd(c["x"], *_segments(c), 65, 0.05, 0.0, 1e-12)
    with pytest.raises(RuntimeError, match="at most 64"):
        mk.moram(c["x"], c["keys0"], c["values0"], k=65, tau=0.05, backend="cuda")


@needs_gpu
def test_bad_input_names_the_argument(impl):
    c = make_case("cuda", torch.float32, 4, 16, 8, 10, 0)
    with pytest.raises(RuntimeError, match="keys1"):
        impl.moram_fwd(c["x"], c["keys0"], c["values0"], None, torch.zeros(0, 15, device="cuda"),
                       c["values1"], None, 2, 0.05, 0.0, 1e-12)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        impl.moram_fwd(c["x"].cpu(), *_segments(c), 2, 0.05, 0.0, 1e-12)
