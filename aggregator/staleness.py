"""How much a stale update counts: a factor s(tau) in (0, 1] of its staleness tau.

``tau`` is the number of versions made since the version the update was trained on (0: it was
trained on the current model). An update's weight in async mode is ``num_samples * s(tau)``.

- ``constant``: s = 1 (every update counts by its samples alone);
- ``polynomial``: s = (1 + tau) ** -a; FedBuff (Nguyen et al. 2022) uses a = 0.5, 1/sqrt(1+tau);
- ``hinge``: s = 1 for tau <= b, else 1 / (a * (tau - b) + 1) (FedAsync, Xie et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")

Staleness = Callable[[int], float]


def constant(tau: int) -> float:
    """Every update counts alike, however stale."""
    _check(tau)
    return 1.0


@dataclass(frozen=True)
class Polynomial:
    """``(1 + tau) ** -exponent``."""

    exponent: float = 0.5

    def __call__(self, tau: int) -> float:
        _check(tau)
        return float((1.0 + tau) ** -self.exponent)


@dataclass(frozen=True)
class Hinge:
    """1 up to ``start`` versions of staleness, then ``1 / (slope * (tau - start) + 1)``."""

    slope: float = 10.0
    start: int = 4

    def __call__(self, tau: int) -> float:
        _check(tau)
        return 1.0 if tau <= self.start else 1.0 / (self.slope * (tau - self.start) + 1.0)


def _check(tau: int) -> None:
    if tau < 0:
        raise ValueError(f"staleness must be >= 0 versions, got {tau}")


def build_staleness(name: str, *, exponent: float = 0.5, hinge_slope: float = 10.0,
                    hinge_start: int = 4) -> Staleness:
    """The staleness function ``name`` (one of :data:`STALENESS_FUNCTIONS`)."""
    if name == "constant":
        return constant
    if name == "polynomial":
        if not exponent >= 0:
            raise ValueError(f"the polynomial staleness exponent must be >= 0, got {exponent}")
        return Polynomial(exponent)
    if name == "hinge":
        if not hinge_slope >= 0 or hinge_start < 0:
            raise ValueError(f"hinge staleness: slope and start must be >= 0, got {hinge_slope}, {hinge_start}")
        return Hinge(hinge_slope, hinge_start)
    raise ValueError(f"unknown staleness function {name!r}: choose from {', '.join(STALENESS_FUNCTIONS)}")
