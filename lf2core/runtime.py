"""Device choice, the device/precision policy and seeding shared by all stages."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Optional

import numpy as np
import torch

from .errors import Lf2Error


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` -> first CUDA device if present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Lf2Error(f"config key 'device': {spec!r} requested but CUDA is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


# ------------------------------------------------------------------------------------------ precision
#: PyTorch's own TF32 settings when lf2 was imported (``tf32 = default`` restores them)
TORCH_TF32 = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def apply_tf32(mode: str) -> dict[str, bool]:
    """Config key ``tf32``: ``never`` = float32 matmuls and convolutions computed in full float32 on CUDA
    (the released code ran before TF32 existed: exact fp32), ``allow`` = both may use TF32, ``default`` =
    PyTorch's own settings (``TORCH_TF32``: cuDNN convolutions may use TF32, matmuls not). Sets the
    process-wide flags ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.backends.cudnn.allow_tf32`` and
    returns them ``{"matmul": .., "cudnn": ..}``."""
    if mode == "never":
        flags = {"matmul": False, "cudnn": False}
    elif mode == "allow":
        flags = {"matmul": True, "cudnn": True}
    elif mode == "default":
        flags = dict(TORCH_TF32)
    else:
        raise ValueError(f"tf32 must be default, never or allow, got {mode!r}")
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn"]
    return flags


class DevicePolicy:
    """Where a stage computes and in which precision: the one place that looks at the device type.

    From ``cfg.device``, ``cfg.amp`` and ``cfg.tf32``. On CPU everything runs in float32, contiguous. On
    CUDA the TF32 flags are set from ``tf32`` (``apply_tf32``; None leaves them as they are), and:
    channels_last memory format for models and image batches, and with ``amp``:

    - ``autocast()``: float16 autocast (feature extraction, evaluation, source pretraining, whose loss is
      scaled by ``grad_scaler()``);
    - ``step_autocast_dtype()`` / ``step_scaler()``: the fine-tuning step's autocast, bfloat16 where the
      GPU supports it (no scaler), else float16 with a ``GradScaler``.
    """

    def __init__(self, device: torch.device | str, amp: bool = True, tf32: Optional[str] = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.amp = bool(amp) and self.cuda  # mixed precision only on CUDA
        self.channels_last = self.cuda
        self.tf32 = tf32
        if tf32 is not None and self.cuda:
            apply_tf32(tf32)

    @classmethod
    def from_config(cls, cfg: Any) -> "DevicePolicy":
        return cls(select_device(cfg.device), cfg.amp, getattr(cfg, "tf32", None))

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on the device (channels_last on CUDA)."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch [B,3,H,W] on the device (channels_last on CUDA)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.amp)

    def grad_scaler(self) -> Any:
        return torch.amp.GradScaler("cuda", enabled=self.amp)

    def step_autocast_dtype(self) -> Optional[torch.dtype]:
        if not self.amp:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def step_scaler(self) -> Any:
        return torch.amp.GradScaler("cuda") if self.step_autocast_dtype() == torch.float16 else None


def autocast_context(device: torch.device | str, amp: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU runs in float32)."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
