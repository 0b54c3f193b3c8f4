"""The one device and precision policy of every stage (features, head tuning, fine-tuning, submission, evaluation).

Device: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
Precision (autocast dtype): ``auto`` uses bf16 where the hardware runs it natively (CUDA GPUs with bf16,
CPUs with AVX512-BF16/AMX), fp16 on older CUDA GPUs, and float32 elsewhere; ``fp32``, ``bf16`` and ``fp16`` force
one (``fp16`` only on CUDA). Training with fp16 needs a gradient scaler (`needs_grad_scaler`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Literal

import torch

from arena.errors import OptionError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")


def check_device_name(name: str) -> str:
    """``name`` when it has the form auto|cpu|cuda|cuda:N (it may still be unavailable here), else `OptionError`."""
    m = _DEVICE_RE.match(str(name))
    if not m or (m.group(2) and m.group(1) != "cuda"):
        raise OptionError(f"Invalid device ({name}). Supported values are {DEVICE_HELP}.")
    return str(name)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a torch device, refusing what this machine cannot do.

    Raises:
        OptionError: unknown name, ``cuda`` on a machine without a CUDA GPU, or ``cuda:N`` beyond the GPUs present.
    """
    if isinstance(name, torch.device):
        return name
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OptionError(f"Device {name} was asked for but no CUDA GPU is visible; use --device cpu or --device auto.")
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"Device {name} does not exist: {torch.cuda.device_count()} CUDA GPU(s) are visible "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    return dev


@functools.cache
def _cpu_has_native_bf16() -> bool:
    # oneDNN reports bf16 support only with native AVX512-BF16/AMX instructions; emulated bf16 would be slower.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32.

    Raises:
        OptionError: an unknown precision, or fp16 on a CPU.
    """
    if precision == "off":  # the spelling of train-full's --amp off
        precision = "fp32"
    if precision not in PRECISIONS:
        raise OptionError(f"Invalid precision ({precision}). Supported values are {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise OptionError("fp16 needs a CUDA device; on a CPU use bf16 or fp32.")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device`` (a no-op for float32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and float32 do not need it."""
    return dtype == torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``/``fp16``/``fp32``: how a resolved precision is written in summaries and checkpoints."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
