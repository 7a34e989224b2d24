"""``--log-format``: plain lines for people, or one JSON object per line for log collectors.

A JSON line has ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``; a record that
carries an event (:mod:`fedmq.event_log`) adds ``event`` (its name) and the event's fields;
an exception adds ``exception`` (the formatted traceback).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from datetime import datetime, timezone

from fedmq.events import event_fields, event_name

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record (no newline inside it)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None and dataclasses.is_dataclass(event):
            out["event"] = event_name(event)
            for name, value in event_fields(event).items():
                out.setdefault(name, _json_value(value))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _json_value(value):
    # JSON has no NaN or infinity: a log collector would refuse the line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def configure_logging(level: str, log_format: str) -> None:
    """Log to stderr at ``level`` in ``log_format`` (``plain`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
