"""The dtype policy every backend follows (a leaf module: nn, functional, eager, ops and
the Triton launchers import it, it imports nothing of the package). :func:`call_dtypes`
is the one place that decides a call's compute and output dtypes.

* **Compute dtype.** Under ``torch.autocast`` for the tensors' device type: the autocast
  dtype, as ``nn.Linear`` does. Otherwise the lowest precision among x and the atoms
  (fp64 > fp32 > fp16 = bf16; between fp16 and bf16 the first in the order x, keys,
  values wins). So bf16 activations with fp32 atoms (autocast-free mixed training) run
  both GEMMs on bf16 tensor cores instead of fp32 CUDA cores.
* **Accumulation** is fp32 in every backend (fp64 for fp64 inputs, for gradcheck):
  scores, the norm, the softmax, the value gather and every gradient reduction.
* **fp32 inputs** follow ``torch.get_float32_matmul_precision()``: "highest" keeps IEEE
  fp32 products, "high"/"medium" let the GPU backends use TF32 tensor cores (cuBLAS
  does the same through ``torch.backends.cuda.matmul``; Triton gets
  ``input_precision="tf32"``).
* **Gradients** come back in each input's own dtype (x, keys, values): the casts to the
  compute dtype happen before the custom op, under autograd.
* **Output**: x's dtype outside autocast, the autocast dtype inside it.
* **Frozen atoms** are cast once per (task, dtype) by ``MoRAMLinear``, not per call.
"""

from __future__ import annotations

import contextlib

import torch

_RANK = {torch.float64: 3, torch.float32: 2, torch.float16: 1, torch.bfloat16: 1}
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def lowest(*dtypes: torch.dtype) -> torch.dtype:
    """The lowest-precision dtype of ``dtypes`` (the first one on ties)."""
    best = dtypes[0]
    for d in dtypes[1:]:
        if _RANK.get(d, 9) < _RANK.get(best, 9):
            best = d
    return best


def call_dtypes(x: torch.Tensor, atom_dtypes) -> tuple[torch.dtype, torch.dtype]:
    """``(compute dtype, output dtype)`` of one MoRAM call on ``x`` with atoms of
    ``atom_dtypes`` (see the module docstring): the autocast dtype for both inside an
    autocast region for x's device (autocast, like PyTorch's own, leaves fp64 alone), else
    the lowest of x's and the atoms' dtypes, and x's dtype. It takes x itself, not its
    device type, because ``Tensor.device`` costs about half a µs and is read only under
    autocast; a call whose tensors all carry x's dtype, outside autocast, costs two tests."""
    x_dtype = x.dtype
    if torch._C._is_any_autocast_enabled():
        auto = autocast_dtype(x.device.type)
        if auto is not None and x_dtype != torch.float64:
            return auto, auto
    for d in atom_dtypes:
        if d is not x_dtype:
            return lowest(x_dtype, *atom_dtypes), x_dtype
    return x_dtype, x_dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a call computing in ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device_type: str):
    """Autocast disabled for ``device_type`` when it is on (a no-op context otherwise): the
    tensors a call hands its kernels already carry the compute dtype, and must not be
    re-cast by an autocast region around the forward or the backward."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def fp32_uses_tf32() -> bool:
    """Whether fp32 products may run in TF32 (``torch.set_float32_matmul_precision``)."""
    return torch.get_float32_matmul_precision() != "highest"
