"""The event stream as log records: one DEBUG record per event on the ``fedmq.events`` logger.

The services' INFO lines stay where they are written (they say in words what happened); this
sink adds the typed stream underneath, each record carrying its event (``record.event``), so
``--log-level DEBUG --log-format json`` gives one JSON object per event with every field
(:mod:`fedmq.log_format`).
"""

from __future__ import annotations

import logging

from fedmq.events import Event, event_fields, event_name

log = logging.getLogger("fedmq.events")


def log_event(event: Event) -> None:
    """The event as one DEBUG line: its name and fields."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    fields = " ".join(f"{name}={value!r}" for name, value in event_fields(event).items())
    log.debug("%s %s", event_name(event), fields, extra={"event": event})
