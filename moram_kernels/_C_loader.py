"""Loads the optional compiled extension ``moram_kernels._C`` (csrc/), once.

A missing or broken build never fails the import of the package: it gives one
warning and the backends that need it report why they are unavailable.
"""

from __future__ import annotations

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
            from ._dispatch import warn_once
            warn_once("extension", why + "; falling back to the reference path")
    _state["module"], _state["why"] = mod, why
    return mod


def why_unavailable(kind: str) -> str | None:
    """Why the extension cannot serve ``kind`` ("cpu" or "cuda"), or None."""
    mod = load()
    if mod is None:
        return str(_state["why"])
    has = getattr(mod, "has_" + kind, None)
    if has is None or not has():
        return f"the compiled extension was built without {kind} kernels"
    return None
