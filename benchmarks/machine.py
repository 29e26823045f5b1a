"""The line every benchmark prints above its figures: what it ran on (a figure without its
machine does not travel: machines of one kind differ in CPU, and so in every figure)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_build() -> str:
    try:
        import torch
    except ImportError:
        return "no torch"
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__} ({cuda}, {device})"


def machine_line(with_torch: bool = True) -> str:
    parts = [cpu_model(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}"]
    if with_torch:
        parts.append(torch_build())
    return "machine: " + ", ".join(parts)
