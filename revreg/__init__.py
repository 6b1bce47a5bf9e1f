"""revreg: a registry and verifier for reversible model behaviors.

Behaviors are signed safetensors artifacts bound to a base model's identity hash.
"""

from __future__ import annotations

__version__ = "0.1.0"
