"""The compiled extension ``moram_kernels._C`` (csrc/): its loader, and the Python face of
its ops ``torch.ops.moram_kernels_C.*``, which serve both the ``cpu`` and the ``cuda``
backends (the torch dispatcher picks the CPU or CUDA kernel from the tensors' device).

The extension is loaded once, on first use.

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

from .._warnings import warn_once

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
            loaded = importlib.import_module("moram_kernels._C")
            _check_symbols(loaded)
            mod = loaded
        except Exception as e:  # ImportError, an undefined symbol from a stale build, missing ops
            why = (f"the compiled extension moram_kernels._C is not available ({type(e).__name__}: {e}); "
                   "build it with `pip install --no-build-isolation -e .`")
            if os.environ.get("MORAM_JIT", "0") not in ("", "0"):
                mod, jit_why = _jit_build()
                if mod is None:
                    why += f"; the JIT build (MORAM_JIT=1) failed too ({jit_why})"
                else:
                    why = None
            if mod is None:
                warn_once("extension", why + "; falling back to the reference path")
    _state["module"], _state["why"] = mod, why
    return mod


def _check_symbols(mod) -> None:
    """Raise ImportError unless ``mod`` is a usable build: its ``has_cpu``/``has_cuda`` probes
    and both registered ops. A build that imports but lacks them is broken, not absent."""
    import torch
    missing = [f"_C.{n}" for n in ("has_cpu", "has_cuda") if not callable(getattr(mod, n, None))]
    missing += [f"torch.ops.moram_kernels_C.{n}" for n in ("moram_fwd", "moram_bwd")
                if not hasattr(torch.ops.moram_kernels_C, n)]
    if missing:
        raise ImportError(f"the build lacks {', '.join(missing)} (stale or foreign build)")


def _jit_build():
    """Compile csrc/ops.cpp, csrc/eager.cpp and csrc/cpu/*.cpp now: ``(module, None)`` or
    ``(None, why)``."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    sources = [os.path.join(root, n) for n in ("ops.cpp", "eager.cpp")]
    sources += sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if not all(os.path.exists(s) for s in sources[:2]) or len(sources) < 3:
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


def require(kind: str):
    """The ``(moram_fwd, moram_bwd)`` pair of the compiled ops for ``kind`` ("cpu" or "cuda"),
    or ImportError with the reason (the backend table never imports a backend it knows
    to be unavailable, so this only fires on a direct import)."""
    why = why_unavailable(kind)
    if why is not None:
        label = {"cpu": "CPU", "cuda": "CUDA"}[kind]
        raise ImportError(f"the {kind} backend needs the compiled extension built with {label} kernels: {why}")
    return moram_fwd, moram_bwd


def moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, K, tau, delta, eps):
    """``-> (y [T, d_out] dtype of x, idx [T, K] int64, p_sel [T, K] fp32, norm [T] fp32)``."""
    y, idx, p_sel, norm = _ops().moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1,
                                           int(K), float(tau), float(delta), float(eps))
    return y, idx, p_sel, norm


def moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
              idx, p_sel, norm, tau, delta, eps, need_x, need_seg0, need_seg1):
    """``-> (gx, gkeys0, gvalues0, gkeys1, gvalues1)``; None where not needed (the op
    returns an empty tensor there)."""
    out = _ops().moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
                           idx, p_sel, norm, float(tau), float(delta), float(eps),
                           bool(need_x), bool(need_seg0), bool(need_seg1))
    needed = (need_x, need_seg0, need_seg0, need_seg1, need_seg1)
    return tuple(g if n else None for g, n in zip(out, needed))


def eager():
    """The extension's eager entry point (``csrc/eager.cpp``): ``eager(x, keys0, values0, scale0,
    keys1, values1, scale1, gram0, k, tau, delta, eps) -> (y [..., d_out], idx [T, K])``,
    validation and autograd in C++; None without the extension."""
    if "eager" not in _state:
        mod = load()
        _state["eager"] = getattr(mod, "eager", None) if mod is not None else None
    return _state["eager"]


def _ops():
    import torch
    load()
    return torch.ops.moram_kernels_C
