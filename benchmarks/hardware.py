"""What the numbers were measured on: hardware, versions, a timestamp."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The ISA extensions that decide which CPU roads are fast: /proc/cpuinfo's flag -> our name.
# avx512_bf16 / amx_bf16 multiply bf16 natively, avx512_fp16 / amx_fp16 fp16 (docs/backends.md).
ISA_FLAGS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512", "avx512_bf16": "avx512_bf16",
             "avx512_fp16": "avx512_fp16", "amx_tile": "amx", "amx_bf16": "amx_bf16", "amx_fp16": "amx_fp16"}
# torch's own probes, where /proc/cpuinfo is not there (not Linux)
_TORCH_PROBES = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
                 "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported",
                 "amx_fp16": "_is_amx_fp16_supported"}


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The ISA extensions of :data:`ISA_FLAGS` this CPU has, space separated in that order
    ("none" when it has none of them). ``cpuinfo``: /proc/cpuinfo's text (read when None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if flags:
        have = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    else:
        have = [name for name, probe in _TORCH_PROBES.items() if getattr(torch.cpu, probe, lambda: False)()]
    return " ".join(have) or "none"


def _cpu_lowp_road() -> str:
    """The cpu backend's road for bf16/fp16 GEMMs on this machine (docs/backends.md)."""
    try:
        from moram_kernels import _C
        return f"bf16:{_C.cpu_lowp_road('bfloat16')} fp16:{_C.cpu_lowp_road('float16')}"
    except (ImportError, AttributeError, RuntimeError):
        return "n/a"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def detect(device: torch.device) -> dict[str, str]:
    """One flat dict of strings, written on every CSV row and printed above the tables."""
    import moram_kernels as mk

    info = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_isa": cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_lowp_road": _cpu_lowp_road(),
        "cpu_cores": str(_usable_cores()),
        "torch_threads": str(torch.get_num_threads()),
        "load_avg_1min": f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown",
        "gpu": "none",
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "moram_kernels": mk.__version__,
        "git_commit": _git_commit(),
        "backends": ",".join(mk.available_backends()),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    elif torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0) + " (not used)"
    return info
