"""The progress bar every long command shows on stderr (stdout stays for JSON and paths)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar", "stderr_console"]


def stderr_console() -> Console:
    return Console(stderr=True)


def progress_bar(console: Console | None = None) -> Progress:
    """A rich Progress (use as a context manager) with description, bar, done/total and time."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console or stderr_console())
