"""Determinism settings for the verifier and a record of the environment it ran in."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

import revreg


def make_deterministic(device: str) -> None:
    """The switches that make repeated runs bitwise equal where the platform allows it."""
    if device.startswith("cuda"):
        # Must be set before cuBLAS is first used in this process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=False)


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "revreg": revreg.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    transformers = sys.modules.get("transformers")  # recorded when the base was built with it
    if transformers is not None:
        env["transformers"] = getattr(transformers, "__version__", None)
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        env |= {
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(index),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
            "cudnn": torch.backends.cudnn.version(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
        try:
            import subprocess

            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = None
    return env
