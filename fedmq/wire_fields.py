"""Reading one decoded message map strictly: every field typed, bounded and named in its error.

Every message kind (:mod:`fedmq.messages`, :mod:`fedmq.status_messages`) decodes its fields
through :class:`FieldReader`; a defect is :class:`~fedmq.errors.InvalidMessage` with reason
``"schema"`` (or the tensor codec's reason) and the field's name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from fedmq.errors import InvalidMessage
from fedmq.tensor_codec import check_finite, decode_tensors



class FieldReader:
    """Strict, typed access to one decoded map; every defect is an InvalidMessage."""

    def __init__(self, kind: str, raw: Mapping[str, Any], fields: tuple[str, ...], *,
                 max_elements: int | None = None) -> None:
        extra = set(raw) - set(fields) - {"schema", "kind"}
        missing = set(fields) - set(raw)
        if extra or missing:
            raise InvalidMessage(
                "schema", f"{kind}: missing fields {sorted(missing)}, unexpected {sorted(map(str, extra))}"
            )
        self.kind, self.raw = kind, raw
        self.max_elements = max_elements  # what compressed tensors may declare (see decode)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A tensor list field, decoded (see :func:`fedmq.tensor_codec.decode_tensors`) and finite."""
        tensors = decode_tensors(self.raw[name], max_elements=self.max_elements)
        check_finite(tensors)
        return tensors

    def _bad(self, name: str, want: str) -> InvalidMessage:
        return InvalidMessage("schema", f"{self.kind}.{name}: want {want}, got {type(self.raw[name]).__name__}")

    def str(self, name: str, *, nonempty: bool = False) -> str:
        value = self.raw[name]
        if not isinstance(value, str) or (nonempty and not value):
            raise self._bad(name, "a non-empty string" if nonempty else "a string")
        return value

    def ident(self, name: str, *, nonempty: bool = True) -> str:
        """A worker, run or message id: see :func:`check_identifier`."""
        value = self.str(name, nonempty=nonempty)
        check_identifier(f"{self.kind}.{name}", value, allow_empty=not nonempty)
        return value

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.str(name, nonempty=True)
        if value not in allowed:
            raise InvalidMessage("schema", f"{self.kind}.{name}={value[:40]!r}: choose from {', '.join(allowed)}")
        return value

    def bounded(self, name: str, *, low: float, high: float = math.inf, low_open: bool = False,
                high_open: bool = False) -> float:
        """A finite number within [low, high] (an open end excludes its bound)."""
        value = self.float(name)
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise InvalidMessage("schema", f"{self.kind}.{name}={value} is outside {interval}")
        return value

    def int(self, name: str, *, minimum: int | None = None) -> int:
        value = self.raw[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(name, "an integer")
        if minimum is not None and value < minimum:
            raise InvalidMessage("schema", f"{self.kind}.{name}={value} is below {minimum}")
        return value

    def float(self, name: str, *, finite: bool = True) -> float:
        value = self.raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(name, "a number")
        if finite and not math.isfinite(value):
            raise InvalidMessage("non-finite", f"{self.kind}.{name} is {value}")
        return float(value)

    def bool(self, name: str) -> bool:
        value = self.raw[name]
        if not isinstance(value, bool):
            raise self._bad(name, "a boolean")
        return value

    def strs(self, name: str) -> tuple[str, ...]:
        value = self.raw[name]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(name, "a list of strings")
        return tuple(value)

    def idents(self, name: str) -> tuple[str, ...]:
        """A list of worker ids, each checked by :func:`check_identifier`."""
        values = self.strs(name)
        for value in values:
            check_identifier(f"{self.kind}.{name}[]", value)
        return values

    def map(self, name: str) -> Mapping[str, Any]:
        value = self.raw[name]
        if not isinstance(value, dict):
            raise self._bad(name, "a map")
        return value

    def optional_bounded(self, name: str, *, low: float, high: float = math.inf) -> float | None:
        """None (nil on the wire) or a finite number within [low, high]."""
        return None if self.raw[name] is None else self.bounded(name, low=low, high=high)

    def maps(self, name: str, *, most: int) -> list[Mapping[str, Any]]:
        value = self.raw[name]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self._bad(name, "a list of maps")
        if len(value) > most:
            raise InvalidMessage("bounds", f"{self.kind}.{name} has {len(value)} entries, at most {most}")
        return value

    def bytes(self, name: str) -> bytes:
        value = self.raw[name]
        if not isinstance(value, bytes):
            raise self._bad(name, "bytes")
        return value


#: The longest worker, run or message id: an inbox queue name (``fedmq.inbox.<worker id>``) and
#: every routing key built from an id stay far inside AMQP's 255-byte short strings.
MAX_IDENTIFIER_CHARS = 128


def check_identifier(what: str, value: str, *, allow_empty: bool = False) -> None:
    """InvalidMessage unless ``value`` is 1-128 letters, digits, ``-``, ``_`` or ``.``."""
    if (not value and not allow_empty) or len(value) > MAX_IDENTIFIER_CHARS or not all(
            (c.isascii() and c.isalnum()) or c in "-_." for c in value):
        raise InvalidMessage("schema", f"{what}={value[:40]!r}: want 1-{MAX_IDENTIFIER_CHARS} letters, digits, - _ .")


def plain_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
