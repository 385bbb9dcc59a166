"""Values derived from tensors (a cast copy of the frozen bank, its Gram matrix, a scale
vector), kept until a source tensor or a setting they depend on changes.

A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, Sequence

from torch import Tensor


def tensor_key(t: Tensor) -> tuple:
    """What a value derived from ``t`` is keyed on: its storage, version (in-place edits),
    shape, dtype and device. :class:`DerivedCache` also keeps a weak reference to ``t``
    itself, since a replaced tensor (e.g. after ``.to()``) may reuse the old memory address."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def _is_referent(ref: weakref.ref, t: Tensor) -> bool:
    return ref() is t


class DerivedCache:
    """One value computed from ``sources`` (tensors) and ``setting`` (plain hashable values
    the result depends on: a dtype, a scale), recomputed when either changes.

    A source counts as changed when it is another object (checked by weak reference, so
    the cache keeps no source alive) or when its :func:`tensor_key` differs. Copies
    (``copy.deepcopy``, pickling) start empty: the value is derived, never state.
    """

    __slots__ = ("_key", "_refs", "value")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._key = None
        self._refs: list = []
        self.value = None

    def get(self, sources: Sequence[Tensor], setting: Hashable, build: Callable, *args):
        """The cached value, or ``build(*args)`` (stored) when a source or the setting
        changed. Written for speed (the scale cache is read on every forward call)."""
        if sources:
            key = (*map(tensor_key, sources), setting)
            hit = key == self._key and all(map(_is_referent, self._refs, sources))
        else:
            key = setting
            hit = key == self._key and self._key is not None
        if hit:
            return self.value
        self.clear()                    # free the old value before building the new one
        value = build(*args)
        self._key, self._refs, self.value = key, [weakref.ref(t) for t in sources], value
        return value

    def __reduce__(self):
        return (type(self), ())

    def __repr__(self) -> str:
        return f"DerivedCache({'empty' if self._key is None else 'filled'})"


class DerivedCaches:
    """A few named :class:`DerivedCache` (attributes), with one :meth:`clear` for all."""

    def __init__(self, *names: str):
        self._names = names
        for n in names:
            setattr(self, n, DerivedCache())

    def clear(self) -> None:
        for n in self._names:
            getattr(self, n).clear()

    def __repr__(self) -> str:
        return f"DerivedCaches({', '.join(self._names)})"
