"""Updates a worker has trained but the broker has not yet confirmed, sent with retries.

A trained update is worth minutes of computation and cannot be recomputed once the model has
moved on, so a failed publish is not the end of it: the encoded body is kept and sent again
with exponential backoff until the broker confirms it. Only then does the worker count the
version as trained. One update is pending at a time (a worker trains one version at a time).
Used on the connection thread only, like the broker it sends through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from fedmq.errors import BrokerError

log = logging.getLogger(__name__)

#: (run id, model version, broadcast attempt) of the update.
UpdateKey = tuple[str, int, int]


@dataclass
class PendingUpdate:
    key: UpdateKey
    body: bytes
    failures: int = 0
    retry_at: float = 0.0  # clock seconds


class UpdateOutbox:
    """Holds at most one encoded update until ``send(body)`` returns without raising.

    ``send`` publishes with confirms and returns the bytes sent; a :class:`BrokerError` means
    not confirmed. Retries wait ``first_retry_s`` doubling up to ``max_retry_s``.
    """

    def __init__(self, send: Callable[[bytes], int], *, first_retry_s: float = 1.0, max_retry_s: float = 30.0) -> None:
        self._send = send
        self.first_retry_s = first_retry_s
        self.max_retry_s = max_retry_s
        self.pending: PendingUpdate | None = None
        self.failures = 0  # failed attempts, all updates together

    def put(self, key: UpdateKey, body: bytes) -> None:
        if self.pending is not None:
            log.warning("update %s replaced before it was confirmed", self.pending.key)
        self.pending = PendingUpdate(key, body)

    def drop(self, why: str) -> None:
        if self.pending is not None:
            log.warning("update for version %d of run %s dropped unsent: %s", self.pending.key[1],
                        self.pending.key[0], why)
            self.pending = None

    def flush(self, now: float) -> tuple[UpdateKey, int] | None:
        """Try to send the pending update if its retry time has come; ``(key, bytes)`` once sent."""
        pending = self.pending
        if pending is None or now < pending.retry_at:
            return None
        try:
            size = self._send(pending.body)
        except BrokerError as exc:
            pending.failures += 1
            self.failures += 1
            delay = min(self.max_retry_s, self.first_retry_s * 2 ** (pending.failures - 1))
            pending.retry_at = now + delay
            log.warning("update for version %d not confirmed (%s, attempt %d); trying again in %.0f s",
                        pending.key[1], exc, pending.failures, delay)
            return None
        self.pending = None
        return pending.key, size
