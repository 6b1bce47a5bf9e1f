"""The terminal's progress display (Rich), installed for one command when stderr is a terminal
and neither --quiet nor --json was given. Pipes and CI logs get nothing from it."""

from __future__ import annotations

from typing import Any


class RichDisplay:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._running = False

    def start(self, label: str, total: int | None) -> Any:
        if not self._running:
            self._progress.start()
            self._running = True
        return self._progress.add_task(label, total=total)

    def advance(self, handle: Any, n: int, label: str | None = None) -> None:
        if label:
            self._progress.update(handle, advance=n, description=label)
        else:
            self._progress.update(handle, advance=n)

    def finish(self, handle: Any) -> None:
        self._progress.remove_task(handle)

    def close(self) -> None:
        if self._running:
            self._progress.stop()
            self._running = False
