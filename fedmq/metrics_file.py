"""The ``metrics.jsonl`` sink: one JSON line per :class:`~fedmq.events.VersionClosed` event.

Each line is written, flushed and synced before the event goes on to the next sink, so a line
in the file is a version that was made (the checkpoint was written before the event).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedmq.events import Event, VersionClosed


class MetricsFile:
    """Appends each version's line to ``path`` (keys sorted, one object per line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, event: Event) -> None:
        if not isinstance(event, VersionClosed):
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event.line(), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` file (blank lines skipped; a torn last line too: the
    process died while writing it)."""
    lines = []
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines
