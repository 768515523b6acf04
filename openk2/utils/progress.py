"""One progress bar for every long job: rich, on stderr, with ETA; or nothing when disabled."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class _Bar:
    """What `progress_bar` yields: `advance(n)`, `update(completed=..., info=...)`."""

    def __init__(self, prog=None, task=None):
        self._prog, self._task = prog, task

    def __call__(self, n: float = 1) -> None:  # bar(n) == bar.advance(n)
        self.advance(n)

    def advance(self, n: float = 1, info: str | None = None) -> None:
        if self._prog is not None:
            self._prog.update(self._task, advance=n, **({"info": info} if info is not None else {}))

    def update(self, completed: float | None = None, info: str | None = None, total: float | None = None) -> None:
        if self._prog is not None:
            kw = {k: v for k, v in (("completed", completed), ("total", total)) if v is not None}
            if info is not None:
                kw["info"] = info
            self._prog.update(self._task, **kw)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, enabled: bool = True, unit: str = "",
                 completed: float = 0, info: bool = False) -> Iterator[_Bar]:
    """Yield a bar: call it (or `.advance(n)`) to advance, `.update(completed=, info=)` to set.

    Shows the description, bar, percent, done/total (with `unit`), an optional
    free-text `info` field (loss, tokens/s...), elapsed time and ETA.
    """
    if not enabled:
        yield _Bar()
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
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, completed=completed, info="")
        yield _Bar(prog, task)
