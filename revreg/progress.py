"""Progress of long work, reported by the library and shown by whoever installed a display.

The library opens tasks (`with task("push a.safetensors", size) as advance: advance(n)`); nothing
is shown unless a display is installed (`revreg.cli` installs a Rich one when stderr is a
terminal and neither --quiet nor --json was given). Without one every call is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class Display(Protocol):
    def start(self, label: str, total: int | None) -> object: ...
    def advance(self, handle: object, n: int, label: str | None = None) -> None: ...
    def finish(self, handle: object) -> None: ...


_display: ContextVar[Display | None] = ContextVar("revreg_progress_display", default=None)
_current: ContextVar[Callable[[int], None] | None] = ContextVar("revreg_progress_task", default=None)


def _nothing(n: int) -> None:
    return None


@contextmanager
def showing(display: Display | None) -> Iterator[None]:
    token = _display.set(display)
    try:
        yield
    finally:
        _display.reset(token)


def silence() -> None:
    """No display for the rest of this command (machine-readable output was asked for)."""
    _display.set(None)


@contextmanager
def task(label: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A unit of long work; `advance(n)` reports n more units (bytes, blobs) done."""
    display = _display.get()
    if display is None:
        yield _nothing
        return
    handle = display.start(label, total)

    def advance(n: int) -> None:
        display.advance(handle, n)

    token = _current.set(advance)
    try:
        yield advance
    finally:
        _current.reset(token)
        display.finish(handle)


class Phases:
    """Steps of one long computation that is not a loop over bytes (a certification: base runs,
    cycle k of n, each baseline); `step(label)` marks the next one begun."""

    def __init__(self, label: str, total: int) -> None:
        self._display = _display.get()
        self._label = label
        self._handle = self._display.start(label, total) if self._display else None

    def step(self, what: str) -> None:
        if self._display is not None:
            self._display.advance(self._handle, 1, f"{self._label}: {what}")

    def done(self) -> None:
        if self._display is not None:
            self._display.finish(self._handle)
            self._display = None


def advance(n: int) -> None:
    """Report progress on the innermost open task of this thread (no-op if none)."""
    (_current.get() or _nothing)(n)
