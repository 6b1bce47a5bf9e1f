"""make_deterministic: the kernels' switch set without importing the compiler stack, and a
compiler loaded later still configured deterministic."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_deterministic_switches_without_importing_the_compiler():
    out = _run(
        "import sys, torch\n"
        "from revreg.verifier.environment import make_deterministic\n"
        "make_deterministic('cpu')\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
        " 'torch._dynamo' in sys.modules, 'torch._inductor.config' in sys.modules)\n"
        "import torch._inductor.config as c\n"
        "print(c.deterministic)\n"
    )
    assert out.split() == ["True", "False", "False", "False", "True"]


def test_an_already_loaded_compiler_is_switched_too():
    out = _run(
        "import torch, torch._inductor.config as c\n"
        "from revreg.verifier.environment import make_deterministic\n"
        "make_deterministic('cpu')\n"
        "print(torch.are_deterministic_algorithms_enabled(), c.deterministic)\n"
    )
    assert out.split() == ["True", "True"]
