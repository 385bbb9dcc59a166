"""The package version, defined here and nowhere else (pyproject.toml reads it; a leaf
module, so that any module of the package may import it)."""

__version__ = "0.1.0"
