"""Loads the optional compiled extension ``moram_kernels._C`` (csrc/), once.

A missing or broken build never fails the import of the package: it gives one
warning and the backends that need it report why they are unavailable.

With ``MORAM_JIT=1`` a missing build is compiled on first use instead (CPU kernels only,
``torch.utils.cpp_extension.load`` with ninja, cached in torch's extension directory). It
is opt-in because the first compile takes a minute or two; a failed compile warns and
falls back like a missing build.
"""

from __future__ import annotations

import glob
import importlib
import os

_state: dict[str, object] = {}


def load():
    """The extension module, or None (after one warning) when it cannot be loaded."""
    if "module" in _state:
        return _state["module"]
    mod, why = None, None
    if os.environ.get("MORAM_NO_EXTENSION", "0") not in ("", "0"):
        why = "disabled by MORAM_NO_EXTENSION"
    else:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)
            mod = importlib.import_module("moram_kernels._C")
        except Exception as e:  # ImportError, or an undefined symbol from a stale build
            why = (f"the compiled extension moram_kernels._C is not available ({type(e).__name__}: {e}); "
                   "build it with `pip install --no-build-isolation -e .`")
            if os.environ.get("MORAM_JIT", "0") not in ("", "0"):
                mod, jit_why = _jit_build()
                if mod is None:
                    why += f"; the JIT build (MORAM_JIT=1) failed too ({jit_why})"
                else:
                    why = None
            if mod is None:
                from ._dispatch import warn_once
                warn_once("extension", why + "; falling back to the reference path")
    _state["module"], _state["why"] = mod, why
    return mod


def _jit_build():
    """Compile csrc/ops.cpp + csrc/cpu/*.cpp now: ``(module, None)`` or ``(None, why)``."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    sources = [os.path.join(root, "ops.cpp")] + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if not os.path.exists(sources[0]) or len(sources) < 2:
        return None, f"no C++ sources under {root} (an installed wheel does not ship them)"
    try:
        from torch.utils.cpp_extension import load
        mod = load(name="moram_kernels_C_jit", sources=sources,
                   extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-DMORAM_WITH_CPU"],
                   extra_ldflags=["-fopenmp"], verbose=False)
        return mod, None
    except Exception as e:  # no compiler, no ninja, a compile error
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def why_unavailable(kind: str) -> str | None:
    """Why the extension cannot serve ``kind`` ("cpu" or "cuda"), or None."""
    mod = load()
    if mod is None:
        return str(_state["why"])
    has = getattr(mod, "has_" + kind, None)
    if has is None or not has():
        return f"the compiled extension was built without {kind} kernels"
    return None
