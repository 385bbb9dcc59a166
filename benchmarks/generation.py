"""``from benchmarks import generation``: the ``generation`` preset
(``benchmarks/presets/generation.py``), under the name the integration tests import."""

from .presets.generation import build, main, measure, ms_per_token, row  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m benchmarks.generation"))
