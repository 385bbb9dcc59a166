import os

# The Triton interpreter must be chosen before triton is first imported; with it the
# "triton" backend runs on CPU tensors when forced (never automatically).
os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS raises under torch.use_deterministic_algorithms(True) unless this is set before
# its first handle (the deterministic tests run GEMMs; on a GPU they would fail without it)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker gets its share of the cores: with torch's default (every
# core in every worker) the OpenMP teams of the workers oversubscribe the machine. Tests
# that are about threading set their own counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _CORES // _WORKERS))

import moram_kernels as mk  # noqa: E402

# Backends that run interpreted here: parity cases for them stay small.
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()


def pytest_report_header(config):
    return [f"moram_kernels backends here: {mk.available_backends()}",
            f"torch {torch.__version__}, threads {torch.get_num_threads()}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tf32_on():
    """fp32 matmuls as TF32 (``torch.set_float32_matmul_precision("high")``) for one test."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(prev)
