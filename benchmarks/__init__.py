"""The package's main job: ``python -m benchmarks``.

Times every available moram backend against the authors' dense layer, ``torch.compile``
of that layer, plain LoRA (rank N and rank r) and the bare scoring GEMM, in eval
(forward) and train (forward + backward) mode, and writes a markdown table (stdout), a
CSV with the hardware, versions and a timestamp, and PNG plots under
``benchmarks/results/``. ``--quick`` is a small grid, ``--smoke`` a tiny one for tests;
``--help`` lists the options and the presets.

Layout: ``run.py`` (the main job), ``competitors.py`` (the one table of what is timed),
``cost_model.py`` (the one FLOP / byte model and its floors), ``baselines.py`` (the
authors' layer, LoRA), ``grid.py`` (shapes), ``timing.py`` (timers, ``Budget``, memory
meters), ``report.py`` (table, CSV, plots), ``hardware.py``; ``presets/``: the focused runs,
``python -m benchmarks --preset NAME``.
"""
