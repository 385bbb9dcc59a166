#!/usr/bin/env bash
# Compile-only check of the CUDA kernels for sm_80 and sm_90 (no GPU needed): nvcc -c
# against the installed torch's headers, -Xptxas -v, fails on a compile error or a
# register spill. Skips (exit 0, with a message) when nvcc is absent, unless
# MORAM_REQUIRE_NVCC=1. About 50 s of CPU on 2 cores, ~1.5 GB of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
set +e
python tools/cuda_compile_check.py --archs "${MORAM_CUDA_ARCHS:-80;90}"
rc=$?
set -e
if [ "$rc" -eq 2 ] && [ "${MORAM_REQUIRE_NVCC:-0}" = "0" ]; then
  echo "check_cuda_compile: skipped, nvcc not found"
  exit 0
fi
exit "$rc"
