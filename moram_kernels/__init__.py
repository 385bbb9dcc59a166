"""moram_kernels: fused kernels for MoRAM layers (Mixture of Rank-1 Associative Memory).

The public API (``docs/api.md``) and nothing else.
"""

from ._version import __version__

from .backends import available_backends, use_backend
from . import distributed, integrations
from .integrations import (MoRAMConfig, add_task, inject, load_moram, remove, save_moram,
                           trainable_parameters)
from .nn import MoRAMLinear
from .functional import moram

__all__ = [
    "moram", "available_backends", "use_backend", "MoRAMLinear", "MoRAMConfig", "inject",
    "remove", "add_task", "distributed", "save_moram", "load_moram", "trainable_parameters", "__version__",
]

from . import backends as _backends

_backends.probe()
del _backends
