"""What a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["machine_info"]


def machine_info() -> dict:
    return {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "python": platform.python_version()}
