"""What machine a benchmark ran on: CPU model, cores, platform and library versions.

Timings differ from CPU to CPU (the same product ran 75× apart on two machines here), so
every recorded result says where it was measured."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch

__all__ = ["machine_info"]


def _cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
