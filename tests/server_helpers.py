"""A real `revreg serve` on loopback for tests: uvicorn in a thread, over a real registry."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from revreg.registry.service import Registry
from revreg.server.app import asgi


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    registry: Registry,
    anonymous_read: bool = False,
    max_upload: int = 64 << 20,
    read_timeout: float = 60.0,
    min_rate: float = 16 << 10,
    min_rate_after: float = 30.0,
    wrap: Callable[[Any], Any] | None = None,
) -> Iterator[str]:
    """`wrap`, if given, puts an ASGI middleware in front of the app (a misbehaving proxy)."""
    port = free_port()
    app = asgi(registry, anonymous_read, max_upload, read_timeout, min_rate, min_rate_after)
    config = uvicorn.Config(
        wrap(app) if wrap is not None else app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        h11_max_incomplete_event_size=16 * 1024,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
