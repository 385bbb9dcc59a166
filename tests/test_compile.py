"""The custom ops pass torch.library.opcheck, and torch.compile(fullgraph=True) runs a
model that uses MoRAMLinear, forward and backward, with no graph break."""

import pytest
import torch
from torch import nn

import moram_kernels as mk
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
    def __init__(self):
        super().__init__()
        self.proj = mk.MoRAMLinear(nn.Linear(16, 16), r=4, k=3, tau=0.1, alpha=8.0)
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


@pytest.mark.slow
def test_compiled_model_with_inductor():
    torch._dynamo.reset()
    model = Tiny()
    model.proj.add_task()
    model.proj.add_task()
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model.proj.keys.grad is not None
    assert model.proj.base_layer.weight.grad is None
