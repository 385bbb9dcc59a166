"""The custom ops pass torch.library.opcheck, and torch.compile(fullgraph=True) runs a
model that uses MoRAMLinear, forward and backward, with no graph break."""

import pytest
import torch
from helpers import assert_close, make_inputs, oracle
from torch import nn

import moram_kernels as mk
from moram_kernels import eager
from moram_kernels.backends import reference as ref
from moram_kernels.ops import moram_bwd_op, moram_fwd_op

BACKENDS = [b for b in mk.available_backends() if b != "triton"]   # the interpreter is too slow here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", ["one", "two"])
def test_opcheck(backend, segments):
    x = torch.randn(6, 8, requires_grad=True)
    keys, values = torch.randn(10, 8), torch.randn(10, 5)
    if segments == "one":
        k0, v0 = keys.requires_grad_(), values.requires_grad_()
        k1, v1, s1, g0 = keys.new_empty(0, 8), values.new_empty(0, 5), None, None
    else:
        k0, v0, g0 = keys[:6], values[:6], ref.gram(keys[:6])
        k1, v1 = keys[6:].clone().requires_grad_(), values[6:].clone().requires_grad_()
        s1 = torch.full((4,), 2.0)
    args = (x, k0, v0, None, k1, v1, s1, g0, 3, 0.2, 0.0, 1e-12, backend)
    torch.library.opcheck(moram_fwd_op, args)
    _, idx, p_sel, norm = moram_fwd_op(*args)
    gy = torch.randn(6, 5)
    torch.library.opcheck(moram_bwd_op, (gy, x.detach(), k0.detach(), v0.detach(), None,
                                         k1.detach(), v1.detach(), s1, g0, idx, p_sel, norm,
                                         0.2, 0.0, 1e-12, True, True, True, backend))


class Tiny(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.proj = mk.MoRAMLinear(nn.Linear(16, 16), r=4, k=3, tau=0.1, alpha=8.0, **kw)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def test_compiled_model_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = Tiny()
    for _ in range(3):
        model.proj.add_task()
    with torch.no_grad():
        model.proj.values.normal_()
    x = torch.randn(2, 9, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    g_compiled = (model.proj.keys.grad.clone(), model.proj.values.grad.clone())
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(g_compiled[0], model.proj.keys.grad)
    torch.testing.assert_close(g_compiled[1], model.proj.values.grad)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))


def _trained_tiny(tasks=3, **kw):
    torch.manual_seed(0)
    model = Tiny(**kw)
    for _ in range(tasks):
        model.proj.add_task()
        with torch.no_grad():
            model.proj.values.normal_()
    return model


def _grads(model, x):
    """Output, and the gradients of x and of the trainable atoms, of one backward."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, model.proj.keys.grad.clone(), model.proj.values.grad.clone()


@pytest.mark.slow
def test_compiled_model_with_inductor():
    """Inductor (generated code around the opaque op): output and every gradient equal eager."""
    import torch._inductor.config  # noqa: F401
    torch._dynamo.reset()
    model = _trained_tiny(tasks=2)
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True)
    # caches off: a graph cached by an earlier run would hide a change of the op's backward
    with torch._inductor.config.patch(force_disable_caches=True):
        got = _grads(compiled, x)
    want = _grads(model, x)
    for nm, a, b in zip(("y", "x", "keys", "values"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{nm}: {m}")
    assert model.proj.base_layer.weight.grad is None


def test_compiled_with_a_varying_number_of_tokens_compiles_once():
    """dynamic=True: one graph serves every T (no recompile per T), forward and backward right."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = _trained_tiny()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    frames = []
    for t in (3, 7, 12, 30):
        x = torch.randn(2, t, 16)
        for a, b in zip(_grads(compiled, x), _grads(model, x)):
            torch.testing.assert_close(a, b)
        frames.append(cnt.frame_count)
    # (the first compile may count a restarted trace; no new frame after it)
    assert frames[0] >= 1 and frames[1:] == frames[:1] * 3, f"frames compiled after each T: {frames}"


def test_compiled_dropout_and_usage_counting():
    """Adapter dropout and atom-usage counting inside a fullgraph compiled model: the same
    random mask as eager for the same seed, and the same counts."""
    torch._dynamo.reset()
    model = _trained_tiny(dropout=0.3)
    model.train()
    x = torch.randn(4, 6, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.proj.start_usage()
    torch.manual_seed(5)
    got = _grads(compiled, x)
    counts_compiled = model.proj.usage_counts.clone()
    model.proj.start_usage()
    torch.manual_seed(5)
    want = _grads(model, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert counts_compiled.sum() == 24 * 3 and torch.equal(counts_compiled, model.proj.usage_counts)
    torch.manual_seed(6)
    other = compiled(x)                              # another seed, another mask
    assert not torch.allclose(other, got[0])
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))   # no dropout in eval


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,n", [(1, 7), (12, 7), (1, 1), (3, 2)], ids=["k1-N7", "k12-N7", "k1-N1", "k3-N2"])
def test_custom_op_effective_k_matches_the_oracle(backend, k, n):
    """K = min(max(k, 2), N) (1 when N = 1) on the custom-op road: k = 1 keeps two atoms,
    k > N all of them; output and gradients against the float64 oracle."""
    x, keys, values = make_inputs(6, 8, 5, n, k=k)
    leaves = [x.requires_grad_(), keys.requires_grad_(), values.requires_grad_()]
    with eager.off():
        assert eager.why_not_eager(*leaves, None, None, None, None, None, k, 0.2, 0.0, 1e-12, backend)
        y = mk.moram(*leaves, k=k, tau=0.2, backend=backend)
        got = (y.detach(), *torch.autograd.grad(y, leaves, torch.linspace(-1, 1, 30).reshape(6, 5)))
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = oracle(*l64, k=k, tau=0.2)
    want = (y64.detach(), *torch.autograd.grad(y64, l64, torch.linspace(-1, 1, 30).reshape(6, 5).double()))
    for g, w, name in zip(got, want, ("y", "x", "keys", "values")):
        assert_close(g, w, dtype=torch.float32, what=name)
