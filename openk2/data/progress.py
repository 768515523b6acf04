"""A rich progress bar with ETA on stderr, or nothing when disabled."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, enabled: bool = True, unit: str = "") -> Iterator[Callable[[float], None]]:
    """Yield `advance(n)`; shows description, bar, percent, done/total and ETA."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if unit:
        columns.append(TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit))
    else:
        columns.append(MofNCompleteColumn())
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
