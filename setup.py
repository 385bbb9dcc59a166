"""Build of moram_kernels: pure Python, plus the optional compiled extension ``moram_kernels._C``.

Switches (environment variables, no hardware probing):

* ``MORAM_BUILD_EXT=0``: skip the compiled extension entirely (the package still works,
  on the reference and Triton paths).
* ``MORAM_FORCE_EXT=1``: a failed extension build fails the install instead of warning.
* ``MORAM_WITH_CUDA=auto|0|1``: build the CUDA kernels; ``auto`` (default) builds them
  only when torch has CUDA (``torch.version.cuda``) and a CUDA toolkit is found.
* ``MORAM_CUDA_ARCHS``: compute capabilities for the CUDA kernels, ``;`` or ``,`` separated,
  default ``"80;90"`` (one ``-gencode arch=compute_XY,code=sm_XY`` each; torch's
  ``TORCH_CUDA_ARCH_LIST`` is then not used).
* ``MORAM_ASAN=1``: build with AddressSanitizer. Run with
  ``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
  ASAN_OPTIONS=detect_leaks=0`` (libstdc++ preloaded too, or ASan's ``__cxa_throw``
  interceptor aborts on the first C++ exception, e.g. a TORCH_CHECK).
* ``MAX_JOBS``: parallel compile jobs (read by torch's BuildExtension; the CUDA sources
  take about 1.5 GB of memory and ~50 s of CPU to compile for two archs).
"""

import glob
import os
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="0"):
    return os.environ.get(name, default).strip().lower()


def _ext_modules_and_cmdclass():
    if _flag("MORAM_BUILD_EXT", "1") in ("0", "false", "no"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # no torch at build time: pure-Python install
        warnings.warn(f"moram_kernels: torch not importable at build time ({e}); skipping the extension")
        return [], {}

    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731
    cpu_sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))))
    cuda_sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
    sources = ["csrc/ops.cpp", "csrc/eager.cpp"] + cpu_sources

    want_cuda = _flag("MORAM_WITH_CUDA", "auto")
    with_cuda = bool(cuda_sources) and (
        want_cuda in ("1", "true", "yes")
        or (want_cuda == "auto" and torch.version.cuda is not None and CUDA_HOME is not None))

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    ldflags = ["-fopenmp"]
    macros = [("MORAM_WITH_CPU", None)] if cpu_sources else []
    if _flag("MORAM_ASAN") in ("1", "true", "yes"):
        cxx = ["-O1", "-g", "-std=c++17", "-fopenmp", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    if with_cuda:
        archs = os.environ.get("MORAM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        # No --use_fast_math: the kernels are bound by memory and cuBLAS, and IEEE expf and
        # division keep them within rounding of the reference. Keep in sync with
        # .ci/cuda_compile_check.py, which compiles with the same flags.
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        for a in filter(None, (x.strip() for x in archs)):
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = CUDAExtension("moram_kernels._C", sources + cuda_sources,
                            define_macros=macros + [("MORAM_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=ldflags)
    else:
        ext = CppExtension("moram_kernels._C", sources, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)

    class OptionalBuildExt(BuildExtension):
        """A failed build warns and leaves a working pure-Python install (unless forced)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                if _flag("MORAM_FORCE_EXT") in ("1", "true", "yes"):
                    raise
                print(f"WARNING: moram_kernels: building {ext.name} failed ({e}); "
                      "the package will use its reference path", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
