"""The package's main job: ``python -m benchmarks``.

Times every available moram backend against the authors' dense layer, ``torch.compile``
of that layer, plain LoRA (rank N and rank r) and the bare scoring GEMM, in eval
(forward) and train (forward + backward) mode, and writes a markdown table (stdout), a
CSV with the hardware, versions and a timestamp, and PNG plots under
``benchmarks/results/``. ``--quick`` is a small grid, ``--smoke`` a tiny one for tests;
``--help`` lists the options.
"""
