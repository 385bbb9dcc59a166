"""The eager road to the compiled kernels (moram_kernels/eager.py, ``_C.eager`` in
csrc/eager.cpp): it must give what the custom-op road gives, forward and backward, and be
taken exactly when :func:`moram_kernels.eager.why_not_eager` says so."""

from __future__ import annotations

import pytest
import torch

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
    monkeypatch.setattr(eager, "_C_eager", [counting])
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


def test_eager_path_taken_only_where_it_should(count_eager):
    x, keys, values = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 5)
    mk.moram(x, keys, values, k=3, tau=0.1, backend="cpu")
    mk.moram(x, keys, values, k=3, tau=0.1, value_scale=torch.ones(6), backend="cpu")
    # validated in Python first (a float scale, an int tau), then the eager path
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
