"""Old import path of :mod:`moram_kernels.backends.reference`, kept for users who import
``moram_kernels.reference.moram_dense`` (the authors' dense layer)."""

from .backends.reference import effective_k, gram, moram_bwd, moram_dense, moram_fwd  # noqa: F401

__all__ = ["effective_k", "moram_dense", "moram_fwd", "moram_bwd", "gram"]
