"""Which workers train a version, and how many updates close it (pure functions)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def select_participants(live: Iterable[str], fraction: float, *, seed: int, version: int) -> tuple[str, ...]:
    """A seeded random ``fraction`` of the live workers (at least one), sorted.

    The same (live set, seed, version) always selects the same workers, so a restarted
    aggregator repeats its choice. ``fraction`` 1.0 selects everyone.
    """
    pool = sorted(set(live))
    if fraction >= 1.0 or len(pool) <= 1:
        return tuple(pool)
    k = max(1, math.ceil(fraction * len(pool) - 1e-9))
    rng = np.random.default_rng([seed, version])
    chosen = rng.choice(len(pool), size=k, replace=False)
    return tuple(sorted(pool[i] for i in chosen))


def quorum_size(expected: int, *, min_updates: int, quorum_fraction: float) -> int:
    """Updates that close a version at once: ``quorum_fraction`` of the expected workers,
    never fewer than ``min_updates``."""
    return max(min_updates, math.ceil(quorum_fraction * expected - 1e-9))
