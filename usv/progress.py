"""Progress bars with ETA for long commands, on stderr so stdout stays clean for `--json`.

`--quiet` (or USV_QUIET=1, or a stderr that is not a terminal, e.g. CI logs or a Prefect
worker) turns them off: scripts read the
command's output, not its animation.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def _progress(quiet: bool) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=True,
                    disable=quiet or bool(os.environ.get("USV_QUIET")) or not sys.stderr.isatty())


@contextmanager
def steps(total: int, label: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A bar over named steps: call `step("what now")` before each one."""
    with _progress(quiet) as progress:
        task = progress.add_task(label, total=total)
        started = False

        def step(description: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=f"{label}: {description}")

        yield step
        progress.update(task, completed=total)


def track(items: Iterable[T], label: str, total: int | None = None, quiet: bool = False) -> Iterator[T]:
    """Iterate with a bar and ETA (`total` defaults to len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _progress(quiet) as progress:
        task = progress.add_task(label, total=total)
        for item in items:
            yield item
            progress.advance(task)
