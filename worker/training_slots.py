"""A cap on how many co-located workers train at once.

Workers scaled on one machine (``docker compose --scale worker=10`` on a 2-core host, or several
workers sharing one GPU) slow each other down when they all train at the same time: the cores
time-slice between processes and their caches thrash (measured on W1: 10 concurrent single-thread
workers need about 15 % more CPU time for the same steps than 2). With ``--training-slots N``,
workers that share ``--training-slots-dir`` train at most N at a time and queue for the rest.

Slots are ``flock`` locks on files ``slot-<i>.lock``: the kernel releases a lock when its holder
exits, even by SIGKILL, so a dead worker never keeps a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

#: How often a waiting worker tries the slots again, in seconds: small next to a local epoch.
POLL_S = 0.02


class TrainingSlots:
    """``count`` slots shared through lock files in ``directory``; ``count`` 0 means no cap."""

    def __init__(self, directory: Path | str, count: int) -> None:
        self.count = count
        self.directory = Path(directory)
        if count > 0:
            self.directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def hold(self, *, give_up: Callable[[], bool] = lambda: False) -> Iterator[bool]:
        """Hold one slot for the ``with`` block; yields False if ``give_up`` said so first."""
        if self.count <= 0:
            yield True
            return
        started = time.monotonic()
        handle = None
        while handle is None:
            for index in range(self.count):
                candidate = os.open(self.directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(candidate)
                    continue
                handle = candidate
                break
            if handle is None:
                if give_up():
                    yield False
                    return
                time.sleep(POLL_S)
        waited = time.monotonic() - started
        if waited > 1.0:
            log.info("waited %.1f s for one of %d training slots", waited, self.count)
        try:
            yield True
        finally:
            os.close(handle)  # closing the descriptor releases the lock
