"""Fuzz the HTTP API from its own OpenAPI document (schemathesis): no request gets a 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from revreg.artifacts.keys import Keyring
from revreg.registry.service import Registry
from revreg.registry.tokens import Tokens
from revreg.server.app import asgi
from tests.conftest import make_artifact

_root = Path(tempfile.mkdtemp(prefix="revreg-fuzz-"))
_registry = Registry.init(str(_root / "reg"), actor="fuzz")
_ring = Keyring(_root / "keys")
_ring.generate("alice")
_registry.trust_key(_ring.public_pem("alice"), "alice", "publisher")
_registry.push(make_artifact(_root / "a.safetensors", _root / "keys"))
TOKEN = Tokens(_registry).create("fuzz", ["admin:*"])[0]

# Through the Guard, as `revreg serve` runs it: the front door is part of what must never 5xx.
schema = schemathesis.openapi.from_asgi("/openapi.json", asgi(_registry))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case):
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
