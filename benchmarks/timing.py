"""Timers, peak memory and saved-for-backward bytes.

CPU timing is ``time.perf_counter`` around each call after warm-up; GPU timing is
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls), or CUDA events
directly when Triton is missing. Callers rotate their inputs inside ``fn``.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    """Per-call times in milliseconds."""

    times_ms: list[float]
    first_call_s: float      # the first warm-up call: includes a compile, if any

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times_ms)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Budget:
    """The time a run may spend, the one budget of every benchmark.

    Per measurement (:func:`time_cpu`, :func:`time_cuda`): ``warmup`` calls, then
    ``min_reps`` to ``max_reps`` timed calls, stopping after ``seconds`` of timed work once
    ``min_reps`` are done. For the whole run (the ``gpu-check`` preset shares it out between
    its phases): ``total_s`` wall-clock seconds from the budget's creation, with
    :meth:`left` and :meth:`elapsed`; unlimited by default.
    """

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    seconds: float = 0.5
    total_s: float = float("inf")
    t0: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def elapsed(self) -> float:
        """Seconds since the budget was created."""
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left of ``total_s``."""
        return self.total_s - self.elapsed()


class TooSlow(Exception):
    """The first call took longer than the caller's limit."""


def time_cpu(fn: Callable[[], object], budget: Budget, max_call_s: float) -> Timing:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > max_call_s:
        raise TooSlow(f"one call took {first:.1f} s (> --max-call-s {max_call_s:g})")
    # a slow shape gets one warm-up call (the one above) instead of several
    for _ in range(budget.warmup - 1 if first < budget.seconds / 4 else 0):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < budget.max_reps and (len(times) < budget.min_reps or spent < budget.seconds):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    return Timing(times, first)


def time_cuda(fn: Callable[[], object], budget: Budget, max_call_s: float) -> Timing:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first > max_call_s:
        raise TooSlow(f"one call took {first:.1f} s (> --max-call-s {max_call_s:g})")
    rep_ms = max(budget.seconds * 1e3, 1.0)
    try:
        from triton.testing import do_bench
        times = do_bench(fn, warmup=max(rep_ms / 4, 1.0), rep=rep_ms, return_mode="all")
        return Timing([float(t) for t in times], first)
    except ImportError:
        pass
    for _ in range(budget.warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < budget.max_reps and (len(times) < budget.min_reps or spent < budget.seconds * 1e3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1]
    return Timing(times, first)


# ---- peak memory ---------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory growth of one call, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
    CPU (Linux): peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) above the
    RSS before the call. :meth:`prepare_cpu` first makes glibc map every block of 64 KiB
    or more on its own and unmap it on free, so freed tensors leave RSS and a call's peak
    is its own; that slows allocation, so it is switched on only after all timing is done.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.why_not: str | None = None
        if device.type == "cpu":
            self.why_not = self._cpu_unsupported()

    @staticmethod
    def _cpu_unsupported() -> str | None:
        if not sys.platform.startswith("linux"):
            return "peak RSS needs Linux /proc"
        try:
            _status_kb("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except (OSError, KeyError) as e:
            return f"cannot reset the peak RSS ({e})"
        return None

    def prepare_cpu(self) -> None:
        if self.device.type != "cpu" or self.why_not:
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            self._trim = libc.malloc_trim
        except (OSError, AttributeError) as e:
            self.why_not = f"not glibc, cannot make freed memory leave RSS ({e})"

    def measure(self, fn: Callable[[], object]) -> int:
        gc.collect()      # cheap once the caller has gc.freeze()-d the long-lived objects
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device) - before
        self._trim(0)
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return max(_status_kb("VmHWM") - before, 0) * 1024


# ---- bytes saved for backward --------------------------------------------------------------

def saved_for_backward(run_forward: Callable[[], torch.Tensor],
                       exclude: Callable[[], list[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """Run the forward under ``saved_tensors_hooks``; return its output and the bytes of
    the distinct storages autograd keeps for backward, not counting storages of the
    tensors ``exclude()`` lists after the forward (inputs, parameters, buffers, caches:
    they stay alive whether or not a backward is pending)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run_forward()
    skip = {t.untyped_storage().data_ptr() for t in exclude() if t is not None and t.numel()}
    return y, sum(n for ptr, n in seen.items() if ptr not in skip)
