"""The exceptions fedmq raises; pika's and msgpack's never cross a module boundary."""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of every error fedmq raises on purpose."""


class InvalidMessage(FedmqError):
    """Received bytes that are not a valid message: the reason says why, in a few words.

    `reason` is a short machine-friendly tag (``"malformed"``, ``"schema"``, ``"shape"``,
    ``"non-finite"``, ``"oversize"``, ``"wrong-run"``, ``"digest"`` ...) used for dead-letter
    headers and counters; the message text is for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BrokerError(FedmqError):
    """Something went wrong talking to the message broker."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or dropped the connection; retrying later may succeed."""


class BrokerConfigError(BrokerError):
    """The broker refused an operation for a reason retrying will not fix (403/404/406)."""


class AccessRefused(BrokerConfigError):
    """403: the broker user may not do this (its permissions, or a refused login)."""


class InvalidName(BrokerError):
    """A name or header AMQP cannot carry (over 255 bytes, not a string); never retried."""


class Unroutable(BrokerError):
    """A mandatory publish reached no queue (for example a worker inbox that no longer exists)."""


class DataUnavailable(FedmqError):
    """A data set's files are missing and could not be downloaded; the message names them."""


class AggregationError(FedmqError):
    """Aggregation cannot produce a model (for example a total weight of zero)."""


class MessageTooLarge(BrokerError):
    """A single AMQP message above the configured limit; chunk it (see fedmq.chunking)."""
