"""Follow a running FedAvg job's rounds by reading the server log FLARE writes."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["RoundWatcher", "rounds_finished"]

_ROUND_STARTED = re.compile(r"Round (\d+) started\.")
_FINISHED = "Finished FedAvg."


def rounds_finished(log_text: str) -> int:
    """Rounds completed so far according to a FedAvg server log."""
    started = [int(m) for m in _ROUND_STARTED.findall(log_text)]
    if _FINISHED in log_text:
        return max(started) + 1 if started else 0
    return max(started) if started else 0


class RoundWatcher:
    """Background thread: calls ``on_round(k)`` whenever the k-th round has finished.

    Args:
        log_glob_root: folder under which the server's log.txt will appear.
        on_round: callback with the number of finished rounds.
    """

    def __init__(self, log_glob_root: Path, on_round: Callable[[int], None], poll_s: float = 0.5):
        self._root, self._on_round, self._poll = Path(log_glob_root), on_round, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="round-watcher", daemon=True)
        self._seen = 0

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self._check()
        self._check()

    def _check(self) -> None:
        logs = list(self._root.glob("**/log.txt")) if self._root.exists() else []
        done = max((rounds_finished(p.read_text(errors="replace")) for p in logs), default=0)
        if done > self._seen:
            self._seen = done
            self._on_round(done)

    def __enter__(self) -> "RoundWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
