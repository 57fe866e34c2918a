"""Device choice and seeding shared by all training stages."""

from __future__ import annotations

import os
import random

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
