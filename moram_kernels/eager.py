"""The eager road: a call of the cpu or cuda backend goes straight to the C++ entry of the
compiled extension (``_C.eager``, csrc/eager.cpp), which checks the arguments, runs the
forward op and records one autograd node, for a few µs of overhead instead of the tens
that the Python custom op costs (:mod:`moram_kernels.ops`). Both roads call the same
two dispatcher ops, so they compute the same thing.

Every other call takes the custom op, which alone knows casts, autocast, tensor
subclasses, torch.compile, gradients of the value scales and the other backends.
:func:`why_not_eager` says in words which of those rules sends a call there (None: it
takes this road), and is the test the functional API itself applies, so a test can
assert which road a call took. :func:`off` shuts this road for a ``with`` block. Under
autocast a call whose tensors already carry the autocast dtype takes this road too: the
dtype policy (:func:`moram_kernels._precision.call_dtypes`) asks for no cast, and the C++
entry runs its forward and backward with autocast excluded, as the custom op does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from . import backends as _dispatch
from ._precision import call_dtypes
from .backends.reference import effective_k

__all__ = ["why_not_eager", "off", "ENTRY"]

_EAGER_BACKENDS = ("cpu", "cuda")
_PLAIN = (Tensor, torch.nn.Parameter)
# [the extension's eager function, or None], filled by the first why_not_eager(); call
# ENTRY[0] only after why_not_eager() said None
ENTRY: list = []
_off: list = []              # one entry per open off() block


def _load():
    if not ENTRY:
        from .backends import compiled
        fn = compiled.eager()
        if fn is not None and all(_dispatch.why_unavailable(n) is not None for n in _EAGER_BACKENDS):
            fn = None
        ENTRY.append(fn)
    return ENTRY[0]


def _no_entry() -> str:
    if _off:
        return "the eager road is switched off (moram_kernels.eager.off())"
    from .backends import compiled
    why = compiled.why_unavailable("cpu")
    return ("the compiled extension offers no eager entry"
            + (f" ({why})" if why else " (neither its cpu nor its cuda kernels can run here)"))


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Send every call of the ``with`` block down the custom-op road."""
    saved = list(ENTRY) if ENTRY else [_load()]
    _off.append(True)
    ENTRY[:] = [None]
    try:
        yield
    finally:
        _off.pop()
        ENTRY[:] = saved


def _not_plain(name: str, t) -> str:
    return f"{name} is a {type(t).__name__}, not a plain torch.Tensor"


def why_not_eager(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps,
                  backend) -> str | None:
    """Why this call cannot take the eager road to the C++ entry, in words; None when it
    can, and then ``ENTRY[0](x, keys0, ..., eps)`` (the same arguments but ``backend``) is
    ``(y [..., d_out], idx [T, K])``. ``keys1``/``values1`` None: no second segment; ``k``
    as given (the entry makes it effective). Cheap on purpose: the functional API asks it
    on every call, and an accepted call pays every test below."""
    fn = ENTRY[0] if ENTRY else _load()
    if fn is None:
        return _no_entry()
    # exact types: a subclass or a duck-typed argument may carry its own dispatch
    if type(x) is not Tensor:
        return _not_plain("x", x)
    if type(keys0) not in _PLAIN:
        return _not_plain("keys", keys0)
    if type(values0) not in _PLAIN:
        return _not_plain("values", values0)
    if type(k) is not int or type(tau) is not float or type(delta) is not float or type(eps) is not float:
        return "k is not an int, or tau, delta or eps not a float (the custom-op road converts them)"
    if backend is not None and type(backend) is not str:
        return "backend is neither None nor a str"
    if x.dim() < 1 or keys0.dim() != 2 or values0.dim() != 2:
        return "x has no dimension, or keys or values are not 2-D (the custom-op road says which)"
    n = keys0.shape[0]
    if keys1 is None:
        atoms = (keys0.dtype, values0.dtype)
    else:
        if type(keys1) not in _PLAIN:
            return _not_plain("keys1", keys1)
        if type(values1) not in _PLAIN:
            return _not_plain("values1", values1)
        if keys1.dim() != 2:
            return "keys1 is not 2-D"
        n += keys1.shape[0]
        atoms = (keys0.dtype, keys1.dtype, values0.dtype, values1.dtype)
    # the C++ entry takes single-dtype calls: every tensor already in the dtype the policy
    # computes in, and the output in it too (so no cast; it excludes autocast itself)
    dt = x.dtype
    cd, out = call_dtypes(x, atoms)
    if cd is not dt or out is not dt or keys0.dtype is not dt or values0.dtype is not dt or (
            keys1 is not None and (keys1.dtype is not dt or values1.dtype is not dt)):
        return (f"x is {dt} and the atoms {', '.join(map(str, atoms))}, but the dtype policy "
                f"computes in {cd} and outputs {out}: the casts go through the custom op")
    for name, s in (("scale0", scale0), ("scale1", scale1), ("gram0", gram0)):
        if s is not None:
            if type(s) is not Tensor:
                return _not_plain(name, s)
            if s.requires_grad:
                return f"{name} requires grad (only the custom op computes the scales' gradient)"
    if n == 0:
        return "the bank is empty (the custom op returns zeros that take part in autograd)"
    if x.numel() == 0:
        return "x holds no token (the custom op returns zeros that take part in autograd)"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (it sees the custom op as one opaque node)"
    if torch._C._is_torch_function_mode_enabled():
        return "a torch function mode is active"
    if torch._C._len_torch_dispatch_stack():
        return "a torch dispatch mode is active"
    try:
        b = _dispatch.select_cached(backend, x.device, dt, dt, dt, x.shape[-1], values0.shape[1], n,
                                    k if 2 <= k <= n else effective_k(k, n))
    except (TypeError, ValueError, RuntimeError) as e:
        return f"no backend takes this call ({e}); the custom-op road raises it after its checks"
    if b.name not in _EAGER_BACKENDS:
        return f"the {b.name!r} backend serves this call; the C++ entry serves cpu and cuda only"
    return None
