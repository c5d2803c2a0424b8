"""Precision of the calibration passes (scoring, reconstruction targets, the refit's forward passes).

The weights and the saved model keep their dtype; only the matmuls of these statistics passes may
run in bfloat16 autocast. On a CPU with AMX or AVX512-BF16 a bfloat16 matmul is several times
as fast as float32 and these passes are most of a pruning run; the statistics need far less than
float32's precision (per-unit importance sums, least-squares targets whose pruning error is orders
of magnitude above bfloat16's rounding). What is summed or solved stays wide: gradients reach the
float32 weights' hooks in float32, each micro-batch's Gram product is accumulated in float32 inside
the matmul and rounded once to bfloat16 before the float64 sum, and the ridge solve is float64
(autocast leaves float64 alone).

Autocast's weight cache is off: reconstruction rewrites weights in place between forward passes,
so a cached bfloat16 copy made before the rewrite would be stale; the cache would also hold a
second copy of every weight that requires grad.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent means no
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve(model: nn.Module, precision: str) -> torch.dtype | None:
    """The autocast dtype of the calibration passes for `precision` ("auto", "fp32", "bf16"), or
    None for none. "auto" is bfloat16 for a float32 model on hardware with native bfloat16."""
    param = next(model.parameters())
    if precision == "fp32" or param.dtype != torch.float32:
        return None  # a half-precision model already runs its matmuls in its own dtype
    if precision == "bf16" or native_bf16(param.device):
        return torch.bfloat16
    return None


def matmul_dtype_name(model: nn.Module, precision: str) -> str:
    """What the calibration passes multiply in, for the plan's record: "bfloat16", "float32", ..."""
    return str(resolve(model, precision) or next(model.parameters()).dtype).removeprefix("torch.")


def calibration_autocast(model: nn.Module, precision: str) -> ContextManager:
    dtype = resolve(model, precision)
    if dtype is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
