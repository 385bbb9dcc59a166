"""The package's warn-once helper, a leaf module: the backend table and the compiled
loader both import it, and it imports neither."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, msg: str, *, stacklevel: int = 3) -> None:
    """Warn with ``msg`` (a ``RuntimeWarning``) the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
