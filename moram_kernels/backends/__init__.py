"""Every backend, and the one table that chooses among them.

=============  =================================================================
module         backend
=============  =================================================================
``reference``  pure PyTorch: the authors' dense layer (the baseline) and the sparse
               reference backend whose two functions define the contract
``cpu``        the C++/OpenMP kernels (``csrc/cpu``)
``cuda``       the C++/CUDA kernels (``csrc/cuda``)
``compiled``   the loader of the optional extension ``moram_kernels._C`` behind
               ``cpu`` and ``cuda``
``triton``     the Triton kernels (a package: forward, backward, variants)
=============  =================================================================

This module says which backends exist, whether each can run here, why one would
refuse given inputs, and picks one per call. Adding a backend takes one module exposing
``moram_fwd``/``moram_bwd`` (the contract in :mod:`moram_kernels.backends.reference`)
and one row in ``_TABLE``. Backend modules are imported lazily, and none imports this
one, so there is no import cycle.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .._warnings import warn_once  # noqa: F401  (re-exported for the callers of the table)

_ENV = "MORAM_BACKEND"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Inputs:
    """What a backend needs to know to accept or refuse a call."""

    device: torch.device
    x_dtype: torch.dtype
    keys_dtype: torch.dtype
    values_dtype: torch.dtype
    d_in: int
    d_out: int
    n_atoms: int
    k: int                      # effective K


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                                  # imported lazily, exposes moram_fwd / moram_bwd
    unavailable: Callable[[], str | None]        # None when usable on this machine, else why not
    refuses: Callable[[Inputs, bool], list[str]] # reasons it cannot take these inputs (bool: forced)

    def impl(self):
        return importlib.import_module(self.module)


def _floats_only(inp: Inputs, allowed=_FLOATS) -> list[str]:
    out = []
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    for what, dt in (("x", inp.x_dtype), ("keys", inp.keys_dtype), ("values", inp.values_dtype)):
        if dt not in allowed:
            out.append(f"{what} has dtype {dt}; supported: {names}")
    return out


# ---- reference --------------------------------------------------------------------------

def _reference_refuses(inp: Inputs, forced: bool) -> list[str]:
    return _floats_only(inp, _FLOATS + (torch.float64,))


# ---- cpu (C++ extension) ----------------------------------------------------------------

def _cpu_unavailable() -> str | None:
    from . import compiled
    return compiled.why_unavailable("cpu")


def _cpu_refuses(inp: Inputs, forced: bool) -> list[str]:
    out = _floats_only(inp)
    if inp.device.type != "cpu":
        out.append(f"the cpu backend takes CPU tensors, got {inp.device}")
    return out


# ---- cuda (C++/CUDA extension) ----------------------------------------------------------

def _cuda_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    from . import compiled
    return compiled.why_unavailable("cuda")


def _cuda_refuses(inp: Inputs, forced: bool) -> list[str]:
    out = _floats_only(inp)
    if inp.device.type != "cuda":
        out.append(f"the cuda backend takes CUDA tensors, got {inp.device}")
    if inp.k > 64:
        out.append(f"the cuda backend keeps at most 64 atoms per token, asked for K = {inp.k}")
    return out


# ---- triton -----------------------------------------------------------------------------

def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_unavailable() -> str | None:
    # the device test comes first: without a GPU, Triton is not even imported
    if not (torch.cuda.is_available() or _triton_interpreting()):
        return "no CUDA device for Triton (set TRITON_INTERPRET=1 to run its interpreter on CPU)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    try:
        importlib.import_module("moram_kernels.backends.triton")
    except Exception as e:
        return f"the Triton kernels failed to load ({type(e).__name__}: {e})"
    return None


def _triton_refuses(inp: Inputs, forced: bool) -> list[str]:
    out = _floats_only(inp)
    if inp.device.type == "cpu":
        if not _triton_interpreting():
            out.append("CPU tensors need TRITON_INTERPRET=1 for the triton backend")
        elif not forced:
            out.append("the Triton interpreter is never chosen automatically for CPU tensors")
    elif inp.device.type != "cuda":
        out.append(f"the triton backend takes CUDA tensors, got {inp.device}")
    if inp.k > 64:
        out.append(f"the triton backend keeps at most 64 atoms per token, asked for K = {inp.k}")
    return out


# ---- the table, best first; "reference" is last and always available ---------------------

_TABLE: tuple[Backend, ...] = (
    Backend("triton", "moram_kernels.backends.triton", _triton_unavailable, _triton_refuses),
    Backend("cuda", "moram_kernels.backends.cuda", _cuda_unavailable, _cuda_refuses),
    Backend("cpu", "moram_kernels.backends.cpu", _cpu_unavailable, _cpu_refuses),
    Backend("reference", "moram_kernels.backends.reference", lambda: None, _reference_refuses),
)
_BY_NAME = {b.name: b for b in _TABLE}
NAMES = tuple(_BY_NAME)

_forced: list[str] = []          # stack of use_backend() names
_unavailable_cache: dict[str, str | None] = {}


def why_unavailable(name: str) -> str | None:
    if name not in _unavailable_cache:
        _unavailable_cache[name] = _BY_NAME[name].unavailable()
    return _unavailable_cache[name]


def probe() -> None:
    """Fill the availability cache eagerly (at import), so that ``torch.compile`` never
    has to trace an import while it traces :func:`select`."""
    for b in _TABLE:
        why_unavailable(b.name)


def available_backends() -> list[str]:
    """Backends usable on this machine, best first; always ends with ``"reference"``."""
    return [b.name for b in _TABLE if why_unavailable(b.name) is None]


def _check_name(name: str, what: str) -> str:
    if name not in _BY_NAME:
        raise ValueError(f"{what}: unknown backend {name!r}; known backends: {', '.join(NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend inside a ``with`` block (overrides ``MORAM_BACKEND``)."""
    _forced.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.pop()


def requested(explicit: str | None) -> str | None:
    """The backend forced by the call, a ``use_backend`` block or ``MORAM_BACKEND``, if any."""
    if explicit is not None:
        return _check_name(explicit, "backend")
    if _forced:
        return _forced[-1]
    env = os.environ.get(_ENV, "").strip()
    if env and env != "auto":
        return _check_name(env, f"environment variable {_ENV}")
    return None


# select() per (forced name, device, dtypes, K > 64): every refusal in the table depends on
# those fields of Inputs only (and on TRITON_INTERPRET, which is fixed before Triton is
# imported). A backend whose refusal comes to depend on another field must add that field
# to the key below.
_select_cache: dict[tuple, Backend] = {}


def select_cached(explicit: str | None, device, x_dtype, keys_dtype, values_dtype,
                  d_in: int, d_out: int, n_atoms: int, k: int) -> Backend:
    """:func:`select`, remembered (errors are raised again on every call, never cached);
    ``Inputs`` is built only on a miss."""
    name = requested(explicit)
    key = (name, device, x_dtype, keys_dtype, values_dtype, k > 64)
    b = _select_cache.get(key)
    if b is None:
        b = select(name, Inputs(device, x_dtype, keys_dtype, values_dtype, d_in, d_out, n_atoms, k))
        _select_cache[key] = b
    return b


def select(explicit: str | None, inp: Inputs) -> Backend:
    """Pick the backend for one call: the forced one, or the first that can run."""
    name = requested(explicit)
    if name is not None:
        reasons = []
        why = why_unavailable(name)
        if why is not None:
            reasons.append(why)
        reasons += _BY_NAME[name].refuses(inp, True)
        if reasons:
            raise RuntimeError(f"moram backend {name!r} cannot run these inputs: " + "; ".join(reasons))
        return _BY_NAME[name]
    for b in _TABLE:
        if why_unavailable(b.name) is None and not b.refuses(inp, False):
            return b
    reasons = _BY_NAME["reference"].refuses(inp, False)
    raise TypeError("no moram backend can run these inputs: " + "; ".join(reasons))
