"""httpx for the registry client, imported without the command-line client its package loads on
import (`httpx._main`: rich and pygments, about 90 ms of every remote command here). revreg never
runs that client; `httpx.main` still does, importing it when called. While httpx itself is being
imported, a stub stands in sys.modules for `httpx._main` (its `main` imports the real one)."""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any


def _cli_main(*args: Any, **kwargs: Any) -> Any:
    try:
        from httpx._main import main  # the real one, imported once (the stub left sys.modules)
    except ImportError as exc:
        raise SystemExit(f"httpx's command-line client needs its extras: pip install 'httpx[cli]' ({exc})") from exc
    return main(*args, **kwargs)


def _import() -> types.ModuleType:
    if "httpx" not in sys.modules:
        stub = types.ModuleType("httpx._main")
        stub.main = _cli_main  # type: ignore[attr-defined]
        sys.modules.setdefault("httpx._main", stub)
        try:
            import httpx
        finally:
            if sys.modules.get("httpx._main") is stub:
                del sys.modules["httpx._main"]
    import httpx

    return httpx


if TYPE_CHECKING:
    import httpx
else:
    httpx = _import()
