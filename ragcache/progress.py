"""Progress bars (rich), or nothing at all when they are not wanted."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


@contextmanager
def bar(show: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n)` function; draws a bar on stderr only when `show` is true."""
    if not show:
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
