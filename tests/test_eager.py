"""The eager road to the compiled kernels (moram_kernels/eager.py, ``_C.eager`` in
csrc/eager.cpp): it must give what the custom-op road gives, forward and backward, and be
taken exactly when :func:`moram_kernels.eager.why_not_eager` says so."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_close, make_inputs, max_rel_err, oracle

import moram_kernels as mk
from moram_kernels import eager
from moram_kernels.functional import moram_segments

pytestmark = pytest.mark.skipif("cpu" not in mk.available_backends(),
                                reason="needs the compiled cpu backend")


@pytest.fixture
def count_eager(monkeypatch):
    """Counts the calls that reach the C++ entry point."""
    fn = eager._load()
    calls = []

    def counting(*a):
        calls.append(a[0].shape)
        return fn(*a)
    monkeypatch.setattr(eager, "ENTRY", [counting])
    return calls


def _segments(dtype, lead, strided, scale1, gram):
    d_in, d_out, n0, n1 = 24, 20, 30, 6
    x = torch.randn(*lead, 2 * d_in if strided else d_in, dtype=dtype)
    if strided:
        x = x[..., ::2]
    k0, v0 = torch.randn(n0, d_in, dtype=dtype), torch.randn(n0, d_out, dtype=dtype)
    k1 = torch.randn(n1, d_in, dtype=dtype, requires_grad=True)
    v1 = torch.randn(n1, d_out, dtype=dtype, requires_grad=True)
    s1 = torch.full((n1,), 0.5) if scale1 else None
    g0 = (k0.float().t() @ k0.float()) if gram else None
    return x.requires_grad_(), k0.requires_grad_(), v0.requires_grad_(), k1, v1, s1, g0


def _run(args, k=5, tau=0.1, delta=0.0):
    x, k0, v0, k1, v1, s1, g0 = args
    for t in (x, k0, v0, k1, v1):
        t.grad = None
    y, idx = moram_segments(x, k0, v0, None, k1, v1, s1, k=k, tau=tau, delta=delta, eps=1e-12,
                                gram0=g0, backend="cpu")
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), idx, [t.grad for t in (x, k0, v0, k1, v1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,strided,scale1,gram", [
    ((7,), False, False, False), ((2, 3), True, True, False), ((1, 1), False, True, True),
    ((5,), False, False, True)])
def test_eager_path_matches_the_custom_op(monkeypatch, count_eager, dtype, lead, strided, scale1, gram):
    torch.manual_seed(0)
    args = _segments(dtype, lead, strided, scale1, gram)
    y, idx, grads = _run(args)
    assert len(count_eager) == 1                      # the eager path ran ...
    with eager.off():
        y_ref, idx_ref, grads_ref = _run(args)        # ... and this is the custom op
    assert len(count_eager) == 1
    assert y.shape == y_ref.shape == (*lead, 20) and y.dtype == dtype
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref, name in zip(grads, grads_ref, ("x", "keys0", "values0", "keys1", "values1")):
        assert g is not None and g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6, msg=name)


def test_eager_path_only_grads_that_are_asked_for(count_eager):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    keys = torch.randn(6, 8, requires_grad=True)
    values = torch.randn(6, 5)
    y = mk.moram(x, keys, values, k=3, tau=0.1, backend="cpu")
    y.sum().backward()
    assert len(count_eager) == 1
    assert keys.grad is not None and keys.grad.abs().sum() > 0
    assert x.grad is None and values.grad is None


def test_eager_output_can_be_modified_in_place(count_eager):
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = mk.moram(x, torch.randn(6, 8), torch.randn(6, 5), k=3, tau=0.1, backend="cpu")
    y.mul_(2.0)                                       # a view made inside the node would refuse this
    y.sum().backward()
    assert len(count_eager) == 1 and x.grad.shape == x.shape


@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_eager_x_gradient_is_no_view(count_eager, lead):
    """The node's gradient of x is a tensor of its own, not a view: autograd adds the base
    layer's gradient of x into such a tensor in place, but into a view out of place (a fresh
    [T, d_in] every step)."""
    x = torch.randn(*lead, 8, requires_grad=True)
    y = mk.moram(x, torch.randn(6, 8), torch.randn(6, 5), k=3, tau=0.1, backend="cpu")
    node = y.grad_fn                                  # with leading dims, a view of the node's output
    while "MoramFunction" not in node.name():
        node = node.next_functions[0][0]
    seen = []
    node.register_hook(lambda grad_in, grad_out: seen.append(grad_in[0]))
    y.sum().backward()
    assert len(count_eager) == 1 and len(seen) == 1
    assert seen[0].shape == x.shape and not seen[0]._is_view()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_eager_call_without_a_graph_gives_the_graphs_forward(count_eager, mode):
    """A call with nothing to record runs the forward op alone: the same output and ids
    as the call that records a node (two segments, scales, a leading dimension), with no
    grad_fn, and inference tensors under inference mode."""
    torch.manual_seed(0)
    args = _segments(torch.float32, (2, 3), True, True, False)
    x, k0, v0, k1, v1, s1, _ = args
    s0 = torch.rand(k0.shape[0]) + 0.5
    call = lambda *t: moram_segments(*t, k=5, tau=0.1, delta=0.1, eps=1e-12, backend="cpu")  # noqa: E731
    y_ref, idx_ref = call(x, k0, v0, s0, k1, v1, s1)
    assert y_ref.grad_fn is not None
    plain = [t.detach() for t in (x, k0, v0, k1, v1)]
    if mode == "no_grad":
        with torch.no_grad():
            y, idx = call(x, k0, v0, s0, k1, v1, s1)
    elif mode == "inference_mode":
        with torch.inference_mode():
            y, idx = call(plain[0], plain[1], plain[2], s0, plain[3], plain[4], s1)
        assert y.is_inference()
    else:
        y, idx = call(plain[0], plain[1], plain[2], s0, plain[3], plain[4], s1)
    assert len(count_eager) == 2
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=0)


def test_eager_path_taken_only_where_it_should(count_eager):
    x, keys, values = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 5)
    mk.moram(x, keys, values, k=3, tau=0.1, backend="cpu")
    mk.moram(x, keys, values, k=3, tau=0.1, value_scale=torch.ones(6), backend="cpu")
    # a float scale: made an [N] vector (cached) and straight to the eager path; an int tau:
    # validated in Python first, then the eager path
    mk.moram(x, keys, values, k=3, tau=0.1, value_scale=2.0, backend="cpu")
    mk.moram(x, keys, values, k=3, tau=1, backend="cpu")
    assert len(count_eager) == 4
    mk.moram(x, keys, values, k=3, tau=0.1, backend="reference")        # another backend
    mk.moram(x.double(), keys.double(), values.double(), k=3, tau=0.1)   # float64: reference
    mk.moram(x, keys.bfloat16(), values, k=3, tau=0.1, backend="cpu")    # mixed dtypes
    mk.moram(x[:0], keys, values, k=3, tau=0.1, backend="cpu")           # T = 0
    mk.moram(x, keys[:0], values[:0], k=3, tau=0.1, backend="cpu")       # N = 0
    moram_segments(x, keys, values, torch.ones(6, requires_grad=True), keys[:0], values[:0], None,
                       k=3, tau=0.1, delta=0.0, eps=1e-12, backend="cpu")  # a scale that needs grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mk.moram(x, keys, values, k=3, tau=0.1, backend="cpu")
    assert len(count_eager) == 4


def test_eager_errors_name_the_argument(count_eager):
    x, keys, values = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 5)
    with pytest.raises(ValueError, match="tau must be finite and > 0, got -1.0"):
        mk.moram(x, keys, values, k=3, tau=-1.0, backend="cpu")
    with pytest.raises(ValueError, match=r"value_scale must have shape \[N\] = \[6\], got \(5,\)"):
        mk.moram(x, keys, values, k=3, tau=0.1, value_scale=torch.ones(5), backend="cpu")
    with pytest.raises(ValueError, match="x has d_in = 7"):
        mk.moram(torch.randn(3, 7), keys, values, k=3, tau=0.1, backend="cpu")
    assert len(count_eager) == 3                      # raised by the C++ checks


# ---- which road, in words ---------------------------------------------------------------------

def test_why_not_eager_says_which_road():
    x, keys, values = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 5)
    args = lambda **kw: {**dict(x=x, keys0=keys, values0=values, scale0=None, keys1=None,  # noqa: E731
                                values1=None, scale1=None, gram0=None, k=3, tau=0.1, delta=0.0,
                                eps=1e-12, backend="cpu"), **kw}
    assert eager.why_not_eager(**args()) is None
    assert "reference" in eager.why_not_eager(**args(backend="reference"))
    assert "dtype policy computes in torch.bfloat16" in eager.why_not_eager(**args(keys0=keys.bfloat16()))
    assert "bank is empty" in eager.why_not_eager(**args(keys0=keys[:0], values0=values[:0]))
    assert "scale1 requires grad" in eager.why_not_eager(
        **args(keys1=keys[:2], values1=values[:2], scale1=torch.ones(2, requires_grad=True)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "computes in torch.bfloat16" in eager.why_not_eager(**args())
        # already in the autocast dtype: no cast, so the eager road (it excludes autocast itself)
        assert eager.why_not_eager(**args(x=x.bfloat16(), keys0=keys.bfloat16(),
                                          values0=values.bfloat16())) is None
    with eager.off():
        assert "switched off" in eager.why_not_eager(**args())
    assert eager.why_not_eager(**args()) is None


def test_eager_under_autocast_in_the_autocast_dtype_matches_the_custom_op(count_eager):
    """Everything already bf16 inside a bf16 autocast region: the eager road, with the custom
    op's output and gradients."""
    torch.manual_seed(0)
    leaves = [torch.randn(5, 8).bfloat16().requires_grad_(), torch.randn(6, 8).bfloat16().requires_grad_(),
              torch.randn(6, 4).bfloat16().requires_grad_()]
    outs = []
    for road in ("eager", "op"):
        with contextlib.ExitStack() as stack:
            if road == "op":
                stack.enter_context(eager.off())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = mk.moram(*leaves, k=3, tau=0.1, backend="cpu")
                outs.append((y.detach(), *torch.autograd.grad(y.float().sum(), leaves)))
    assert len(count_eager) == 1
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- effective K and the threshold on the eager road --------------------------------------------

def _leaves(t, d_in, d_out, n, *, k, seed=0):
    x, keys, values = make_inputs(t, d_in, d_out, n, k=k, seed=seed)
    return [x.requires_grad_(), keys.requires_grad_(), values.requires_grad_()]


def _fwd_bwd(leaves, **kw):
    y = mk.moram(*leaves, backend="cpu", **kw)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    return (y.detach(), *torch.autograd.grad(y, leaves, gy))


def _oracle_fwd_bwd(leaves, **kw):
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    y = oracle(*l64, **kw)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    return (y.detach(), *torch.autograd.grad(y, l64, gy))


@pytest.mark.parametrize("k,n", [(1, 7), (12, 7), (1, 1), (3, 2)], ids=["k1-N7", "k12-N7", "k1-N1", "k3-N2"])
def test_eager_effective_k_matches_the_oracle(count_eager, k, n):
    """K = min(max(k, 2), N) (1 when N = 1) in the C++ entry: k = 1 keeps two atoms, k > N all."""
    leaves = _leaves(6, 8, 5, n, k=k)
    got = _fwd_bwd(leaves, k=k, tau=0.2)
    assert len(count_eager) == 1
    want = _oracle_fwd_bwd(leaves, k=k, tau=0.2)
    for g, w, name in zip(got, want, ("y", "x", "keys", "values")):
        assert_close(g, w, dtype=torch.float32, what=name)


def _delta_dropping_some(leaves, k):
    """A threshold between two of the selected normalised scores: it drops some of each
    token's top-K atoms, not all, and sits far from every score (no flip in fp32)."""
    x, keys = leaves[0].detach().double(), leaves[1].detach().double()
    p = x @ keys.T
    s = (p / p.norm(dim=-1, keepdim=True)).topk(k, dim=-1).values       # [T, K], descending
    cuts = torch.linspace(s.min().item(), s.max().item(), 200)[1:-1]
    dist = (s.reshape(-1, 1) - cuts).abs().min(0).values
    kept = (s[..., None] >= cuts).sum(1)                                  # [T, cuts]
    ok = (kept > 0).all(0) & (kept < k).any(0)
    best = int(torch.where(ok, dist, torch.zeros_like(dist)).argmax())
    assert ok[best] and dist[best] > 1e-3
    return float(cuts[best])


def test_eager_backward_applies_the_threshold():
    """delta > 0 (the eval-time rule) drops some of the top-K atoms; the eager road's
    backward must mask them as the custom op and the oracle do, for x, keys and values."""
    k = 4
    leaves = _leaves(9, 8, 5, 12, k=k, seed=3)
    delta = _delta_dropping_some(leaves, k)
    assert eager.why_not_eager(*leaves, None, None, None, None, None, k, 1.0, delta, 1e-12, "cpu") is None
    got = _fwd_bwd(leaves, k=k, tau=1.0, delta=delta)
    with eager.off():
        op = _fwd_bwd(leaves, k=k, tau=1.0, delta=delta)
    want = _oracle_fwd_bwd(leaves, k=k, tau=1.0, delta=delta)
    no_delta = _oracle_fwd_bwd(leaves, k=k, tau=1.0)
    for i, name in enumerate(("y", "x", "keys", "values")):
        assert max_rel_err(no_delta[i], want[i]) > 1e-2, f"{name}: delta must change it"
        assert_close(got[i], want[i], dtype=torch.float32, what=f"eager {name}")
        assert_close(op[i], want[i], dtype=torch.float32, what=f"custom op {name}")
        torch.testing.assert_close(got[i], op[i], rtol=1e-6, atol=1e-6)


# ---- saved tensors, autocast in the backward, argument checks: both roads ------------------------

ROADS = ["eager", "custom-op"]


def _road(road):
    return contextlib.nullcontext() if road == "eager" else eager.off()


def _saved_kind(t, T=5, K=3):
    """Which of the forward's own outputs a saved tensor is (x is [5, 8], the bank [7, ...])."""
    if t.dtype == torch.int64 and tuple(t.shape) == (T, K):
        return "idx"
    if t.dtype == torch.float32 and tuple(t.shape) == (T, K):
        return "p_sel"
    if t.dtype == torch.float32 and tuple(t.shape) == (T,):
        return "norm"
    return None


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("changed", ["idx", "p_sel", "norm"])
def test_saved_tensor_hooks_see_and_feed_the_backward(road, changed):
    """Every tensor the backward reads goes through torch.autograd.graph.saved_tensors_hooks
    (save_on_cpu and checkpointing rely on it): idx, p_sel and norm are packed on both roads,
    unpacked in the backward, and what unpack returns is what the backward uses."""
    torch.manual_seed(0)
    leaves = [torch.randn(5, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True),
              torch.randn(7, 6, requires_grad=True)]
    packed, unpacked = [], []

    def pack(t):
        packed.append(_saved_kind(t))
        return t

    def unpack(t):
        kind = _saved_kind(t)
        unpacked.append(kind)
        if kind == changed:   # another atom id, or a scaled score or norm
            return (t + 1) % 7 if kind == "idx" else t * 1.5
        return t

    with _road(road):
        assert (eager.why_not_eager(*leaves, None, None, None, None, None, 3, 0.5, 0.0, 1e-12, "cpu")
                is None) == (road == "eager")
        plain = torch.autograd.grad(mk.moram(*leaves, k=3, tau=0.5, backend="cpu").sum(), leaves)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = mk.moram(*leaves, k=3, tau=0.5, backend="cpu")
        hooked = torch.autograd.grad(y.sum(), leaves)
    for kind in ("idx", "p_sel", "norm"):
        assert kind in packed, f"{kind} was not packed on the {road} road (packed: {packed})"
        assert kind in unpacked, f"{kind} was not unpacked in the backward of the {road} road"
    assert any(not torch.allclose(a, b) for a, b in zip(plain, hooked)), \
        f"the backward ignored the unpacked {changed}"


@pytest.mark.parametrize("road", ROADS)
def test_backward_inside_autocast_gives_the_same_gradients(road):
    """Forward outside autocast, backward inside a bf16 CPU autocast region: the gradients
    are those of a backward without autocast (the kernels' GEMMs must not be re-cast)."""
    torch.manual_seed(0)
    leaves = [torch.randn(6, 32, requires_grad=True), torch.randn(40, 32, requires_grad=True),
              torch.randn(40, 24, requires_grad=True)]
    gy = torch.randn(6, 24)
    with _road(road):
        want = torch.autograd.grad(mk.moram(*leaves, k=5, tau=0.1, backend="cpu"), leaves, gy)
        y = mk.moram(*leaves, k=5, tau=0.1, backend="cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = torch.autograd.grad(y, leaves, gy)
    for g, w, name in zip(got, want, ("x", "keys", "values")):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("what,bad,err,msg", [
    ("gram0", torch.zeros(3, 3), ValueError, r"gram0 must have shape \[d_in, d_in\] = \[8, 8\], got \(3, 3\)"),
    ("gram0", torch.zeros(8, 8, device="meta"), ValueError, "gram0 is on meta but x is on cpu"),
    ("gram0", torch.zeros(8, 8, dtype=torch.int64), TypeError, "gram0 must be a floating-point tensor"),
    ("scale1", torch.ones(3), ValueError, r"scale1 must have shape \[N\] = \[2\], got \(3,\)"),
    ("scale1", torch.ones(2, device="meta"), ValueError, "scale1 is on meta but x is on cpu"),
    ("scale1", torch.ones(2, dtype=torch.int64), TypeError, "scale1 must be a floating-point tensor"),
    ("scale0", torch.ones(6, dtype=torch.int32), TypeError, "value_scale must be a floating-point tensor"),
], ids=["gram0-shape", "gram0-device", "gram0-dtype", "scale1-shape", "scale1-device", "scale1-dtype",
        "scale0-dtype"])
def test_gram_and_scales_are_checked_up_front(road, what, bad, err, msg):
    """A wrong Gram matrix or value scale fails at the call, naming the argument, on both roads
    (not in the backward, nor with a kernel's message)."""
    x, k0, v0 = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 5)
    k1, v1 = torch.randn(2, 8, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    kw = dict(scale0=None, scale1=None, gram0=None)
    kw[what] = bad
    with _road(road), pytest.raises(err, match=msg):
        moram_segments(x, k0, v0, kw["scale0"], k1, v1, kw["scale1"], k=3, tau=0.1, delta=0.0,
                       eps=1e-12, gram0=kw["gram0"], backend="cpu")


def test_a_float_scale_is_the_vector_of_it_and_survives_inference_mode(count_eager):
    """``value_scale=2.5`` gives what ``torch.full((N,), 2.5)`` gives, forward and backward,
    on the eager road; its cached vector, first made under torch.inference_mode(), serves a
    later call that saves it for backward; NaN and bool still raise."""
    x, keys, values = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 5)
    with torch.inference_mode():
        mk.moram(x, keys, values, k=3, tau=0.1, value_scale=2.5, backend="cpu")
    outs = []
    for scale in (2.5, torch.full((6,), 2.5)):
        xi, ki = x.clone().requires_grad_(True), keys.clone().requires_grad_(True)
        y = mk.moram(xi, ki, values, k=3, tau=0.1, value_scale=scale, backend="cpu")
        y.square().sum().backward()
        outs.append((y, xi.grad, ki.grad))
    assert len(count_eager) == 3
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="value_scale"):
        mk.moram(x, keys, values, k=3, tau=0.1, value_scale=float("nan"), backend="cpu")
    with pytest.raises(TypeError, match="value_scale"):
        mk.moram(x, keys, values, k=3, tau=0.1, value_scale=True, backend="cpu")
