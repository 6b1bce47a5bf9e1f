"""revreg: a registry and verifier for reversible model behaviors.

Behaviors are signed safetensors artifacts bound to a base model's identity hash. The public
Python API (docs/api.md) is what this package exports; importing it does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BaseMismatch",
    "Behavior",
    "Handle",
    "InputError",
    "IntegrityError",
    "Registry",
    "RevregError",
    "RollbackError",
    "SignatureError",
    "Snapshot",
    "StackError",
    "Unreachable",
    "VerificationResult",
    "__version__",
    "attach",
    "identity",
    "load_base",
    "load_behavior",
    "load_probes",
    "open_registry",
    "snapshot",
    "verify",
]

if TYPE_CHECKING:
    from revreg.errors import (
        BaseMismatch,
        InputError,
        IntegrityError,
        RevregError,
        RollbackError,
        SignatureError,
        StackError,
        Unreachable,
    )
    from revreg.library import (
        Registry,
        attach,
        identity,
        load_base,
        load_behavior,
        load_probes,
        open_registry,
        snapshot,
        verify,
    )
    from revreg.verifier.engine import Behavior
    from revreg.verifier.handles import Handle, Snapshot
    from revreg.verifier.protocol import VerificationResult


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `revreg ls` imports this package and must not import torch.
    if name not in __all__:
        raise AttributeError(f"module 'revreg' has no attribute {name!r}")
    from revreg import library

    return library.exported(name)


def __dir__() -> list[str]:
    return sorted(__all__)
