"""The messages of ``fedmq status``: a request on the control queue, the aggregator's reply on
the asker's own queue (:data:`fedmq.topology.STATUS_REPLY_PREFIX` + an id)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from fedmq.errors import InvalidMessage
from fedmq.topology import STATUS_REPLY_PREFIX
from fedmq.wire_fields import FieldReader, plain_fields


#: The most workers one status reply lists.
MAX_STATUS_WORKERS = 10_000


@dataclass(frozen=True)
class StatusRequest:
    """``fedmq status`` asks the aggregator (on the control queue) to answer on ``reply_to``,
    a queue named :data:`STATUS_REPLY_PREFIX` + an id; ``sent_at`` is the asker's wall clock."""

    KIND: ClassVar[str] = "status-request"
    request_id: str
    reply_to: str
    sent_at: float

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "StatusRequest":
        reply_to = r.ident("reply_to")
        if not reply_to.startswith(STATUS_REPLY_PREFIX) or len(reply_to) == len(STATUS_REPLY_PREFIX):
            raise InvalidMessage("schema", f"status-request.reply_to={reply_to[:40]!r}: want {STATUS_REPLY_PREFIX}<id>")
        return cls(r.ident("request_id"), reply_to, r.float("sent_at"))


@dataclass(frozen=True)
class WorkerStatus:
    """One live worker in a :class:`StatusReply`, and in the aggregator's own view of the federation
    (:class:`fedmq.federation_state.FederationSnapshot`): ``version`` the last it trained (-1 none),
    ``progress`` (0-1) of the training in hand, ``samples_per_second`` of its last training,
    ``silent_s`` the seconds since it spoke."""

    worker_id: str
    state: str
    device: str
    partition: int
    version: int
    progress: float
    samples_per_second: float
    silent_s: float

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> "WorkerStatus":
        r = FieldReader("status.worker", raw, tuple(f.name for f in dataclasses.fields(cls)))
        return cls(r.ident("worker_id"), r.str("state")[:32], r.str("device")[:64], r.int("partition", minimum=-1),
                   r.int("version", minimum=-1), r.bounded("progress", low=0.0, high=1.0),
                   r.bounded("samples_per_second", low=0.0), r.bounded("silent_s", low=0.0))


@dataclass(frozen=True)
class StatusReply:
    """The aggregator's answer to :class:`StatusRequest` ``request_id``: run ``run_id`` has made
    ``version`` of ``versions``; ``open_version`` (-1: none) has ``folded`` of ``expected``
    updates after ``elapsed_s`` seconds, about ``estimate_s`` more (-1: unknown); the newest
    version's ``test_accuracy`` / ``test_loss`` / ``federated_accuracy`` (None: not measured);
    ``dead_letters`` so far; the live ``workers``."""

    KIND: ClassVar[str] = "status-reply"
    request_id: str
    run_id: str
    version: int
    versions: int
    open_version: int
    expected: int
    folded: int
    elapsed_s: float
    estimate_s: float
    test_accuracy: float | None
    test_loss: float | None
    federated_accuracy: float | None
    dead_letters: int
    finished: bool
    workers: tuple[WorkerStatus, ...]

    def fields(self) -> dict[str, Any]:
        out = plain_fields(self)
        out["workers"] = [plain_fields(w) for w in self.workers]
        return out

    @classmethod
    def from_fields(cls, r: FieldReader) -> "StatusReply":
        workers = tuple(WorkerStatus.from_wire(w) for w in r.maps("workers", most=MAX_STATUS_WORKERS))
        if len({w.worker_id for w in workers}) != len(workers):
            raise InvalidMessage("schema", "status-reply.workers lists a worker twice")
        return cls(r.ident("request_id"), r.ident("run_id"), r.int("version", minimum=0), r.int("versions", minimum=0),
                   r.int("open_version", minimum=-1), r.int("expected", minimum=0), r.int("folded", minimum=0),
                   r.bounded("elapsed_s", low=0.0), r.bounded("estimate_s", low=-1.0),
                   r.optional_bounded("test_accuracy", low=0.0, high=1.0), r.optional_bounded("test_loss", low=0.0),
                   r.optional_bounded("federated_accuracy", low=0.0, high=1.0), r.int("dead_letters", minimum=0),
                   r.bool("finished"), workers)
