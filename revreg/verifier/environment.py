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
    deterministic_algorithms()


def deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True)` without its start-up cost.

    The public call does two things: it sets the flag the kernels read (`torch._C`), and it
    imports the compiler's configuration (`torch._inductor.config`, which pulls in
    torch._dynamo: about 0.8 s, most of a small model's certification) to set its
    `deterministic` option. When the compiler is not loaded yet, revreg sets the kernels' flag
    directly and leaves the compiler's option to its environment variable, which the
    configuration reads when it is first imported, so a model compiled later in this process is
    deterministic too. When it is loaded already, the public call costs nothing extra."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=False)
        return
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    torch._C._set_deterministic_algorithms(True, warn_only=False)


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
