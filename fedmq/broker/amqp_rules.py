"""What AMQP 0.9.1 (and so RabbitMQ) accepts in names and headers, checked before publishing.

Both brokers apply these rules, so the in-memory broker refuses what RabbitMQ would refuse and
no error surfaces first on the wire. Names (exchanges, queues, routing keys, header keys) are
"short strings": at most 255 bytes of UTF-8. Header values must be what pika can encode into a
field table. :func:`dead_letter_headers` turns any received header table into one that can be
published again, for the dead-letter copy of a message a foreign client sent.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any, Mapping

from fedmq.errors import BrokerError, InvalidName

#: AMQP short strings carry at most this many bytes (UTF-8).
SHORT_STRING_MAX = 255

#: Header value types pika can encode into an AMQP field table (float is not one of them).
HEADER_TYPES = (str, bytes, bool, int, Decimal, datetime, dict, list, type(None))

#: AMQP's widest integer field is a signed 64-bit "long-long".
_INT64 = (-(2 ** 63), 2 ** 63 - 1)

#: A sanitised string header value is cut to this many characters (a reason, not a payload).
_MAX_TEXT = 4096


def check_name(what: str, name: str) -> None:
    """InvalidName if ``name`` (an exchange, queue or routing key) is not an AMQP short string."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > SHORT_STRING_MAX:
        raise InvalidName(f"{what} of {size} bytes is longer than AMQP's {SHORT_STRING_MAX}-byte limit: "
                          f"{name[:40]!r}...")


def check_headers(headers: Mapping[str, Any]) -> None:
    """BrokerError (InvalidName for keys) for a header table pika could not encode."""

    def check(value: Any, path: str) -> None:
        if not isinstance(value, HEADER_TYPES):
            raise BrokerError(
                f"header {path} has type {type(value).__name__}, which an AMQP 0.9.1 field "
                "table cannot carry (use str, bytes, bool, int, Decimal, datetime, dict, list)")
        if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise BrokerError(f"header {path} = {value} does not fit a signed 64-bit field")
        if isinstance(value, dict):
            for key, item in value.items():
                check_key(key)
                check(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                check(item, f"{path}[{index}]")

    def check_key(key: Any) -> None:
        if not isinstance(key, str):
            raise InvalidName(f"header name {key!r} is not a str")
        check_name("a header name", key)

    for key, value in headers.items():
        check_key(key)
        check(value, repr(key))


def dead_letter_headers(headers: Mapping[Any, Any]) -> dict[str, Any]:
    """A copy of a received header table that :func:`check_headers` accepts.

    Keys that are bytes are decoded (invalid UTF-8 replaced) and cut to 255 bytes; floats,
    out-of-range integers and unknown types become their ``repr``; long strings are cut. Nothing
    is dropped, so the dead-letter copy still says what the sender sent.
    """
    return {_safe_key(key): _safe_value(value, 0) for key, value in headers.items()}


def _safe_key(key: Any) -> str:
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    encoded = text.encode("utf-8", "replace")[:SHORT_STRING_MAX]
    return encoded.decode("utf-8", "ignore")


def _safe_value(value: Any, depth: int) -> Any:
    if depth > 8:
        return repr(value)[:_MAX_TEXT]
    if value is None or isinstance(value, (bool, bytes, datetime)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if isinstance(value, Decimal):
        return value if value.is_finite() and abs(value.as_tuple().exponent) < 256 else str(value)
    if isinstance(value, float):
        return repr(value) if not math.isnan(value) else "nan"
    if isinstance(value, dict):
        return {_safe_key(k): _safe_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_value(v, depth + 1) for v in value]
    return repr(value)[:_MAX_TEXT]
