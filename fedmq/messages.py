"""Every message fedmq sends, as frozen dataclasses with explicit encode/decode.

On the wire a message is a msgpack map ``{"schema": 1, "kind": <kind>, ...fields}``. Decoding is
strict: unknown kind, missing or extra fields, and wrong types are :class:`InvalidMessage` with
reason ``"schema"``; bytes that are not msgpack are reason ``"malformed"``. Chunks of a large
message (:class:`Chunk`) are messages too, so one decoder reads every AMQP body.

Flow (see ``fedmq/topology.py`` for the queues):
worker -> control: :class:`WorkerHello`, :class:`Heartbeat`, :class:`WorkerGoodbye`, :class:`KeyframeRequest`
aggregator -> one inbox: :class:`JoinAccepted` (then the current :class:`ModelBroadcast`)
aggregator -> every inbox: :class:`ModelBroadcast`, :class:`EvaluationRequest` (the final model
only), :class:`RunComplete`
worker -> updates: :class:`EvaluationReport` (before its update of the same version), :class:`WeightUpdate`
``fedmq status`` -> control: :class:`StatusRequest`; aggregator -> its reply queue: :class:`StatusReply`
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Union

import msgpack
import torch

from fedmq.codecs import parse_codec
from fedmq.errors import InvalidMessage
from fedmq.task.datasets import DATASETS
from fedmq.task.partitions import SCHEMES
from fedmq.status_messages import StatusReply, StatusRequest
from fedmq.tensor_codec import encode_tensors
from fedmq.wire_fields import FieldReader, plain_fields

SCHEMA_VERSION = 1


#: Local optimizers a worker can build (worker.trainer); the wire contract names them.
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TaskSpec:
    """What a worker needs to build its data and model: chosen by the run, same for all."""

    dataset: str
    model: str
    partition_scheme: str
    num_partitions: int
    dirichlet_alpha: float
    shards_per_partition: int
    seed: int

    def to_wire(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> "TaskSpec":
        r = FieldReader("task", raw, tuple(f.name for f in dataclasses.fields(cls)))
        return cls(
            dataset=r.choice("dataset", tuple(DATASETS)),
            model=r.str("model", nonempty=True),
            partition_scheme=r.choice("partition_scheme", SCHEMES),
            num_partitions=r.int("num_partitions", minimum=1),
            dirichlet_alpha=r.bounded("dirichlet_alpha", low=0.0, low_open=True),
            shards_per_partition=r.int("shards_per_partition", minimum=1),
            seed=r.int("seed"),
        )


#: The aggregator's modes (see :class:`TrainingConfig`).
MODES = ("sync", "async")


@dataclass(frozen=True)
class TrainingConfig:
    """How every worker trains one version: carried in each broadcast so all train alike.

    ``local_steps`` > 0 replaces epochs by a fixed number of optimizer steps (1 step with
    ``batch_size`` 0, the whole partition, is FedSGD). ``batch_size`` 0 means the whole partition.
    """

    local_epochs: int
    local_steps: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    #: FedProx's mu: each worker adds mu/2 * ||w - w_global||^2 to its local loss (0: FedAvg).
    proximal_mu: float = 0.0
    #: How workers encode their updates (a :func:`fedmq.codecs.parse_codec` spec).
    update_codec: str = "fp32"
    #: The aggregator's --mode: in "async" mode a worker finishes the version it is training even
    #: when newer ones arrive (in "sync" mode it abandons it: the version it trains is closed).
    mode: str = "sync"

    def to_wire(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> "TrainingConfig":
        r = FieldReader("training", raw, tuple(f.name for f in dataclasses.fields(cls)))
        config = cls(
            local_epochs=r.int("local_epochs", minimum=0),
            local_steps=r.int("local_steps", minimum=0),
            batch_size=r.int("batch_size", minimum=0),
            learning_rate=r.bounded("learning_rate", low=0.0, low_open=True),
            optimizer=r.choice("optimizer", OPTIMIZERS),
            momentum=r.bounded("momentum", low=0.0, high=1.0, high_open=True),
            weight_decay=r.bounded("weight_decay", low=0.0),
            proximal_mu=r.bounded("proximal_mu", low=0.0),
            update_codec=r.str("update_codec", nonempty=True)[:100],
            mode=r.choice("mode", MODES),
        )
        try:
            parse_codec(config.update_codec)
        except ValueError as exc:
            raise InvalidMessage("codec", f"training.update_codec: {exc}; this worker cannot encode updates that "
                                          "way: upgrade it, or run the aggregator with --update-codec fp32") from None
        if config.local_epochs == 0 and config.local_steps == 0:
            raise InvalidMessage("schema", "training: local_epochs and local_steps are both 0")
        return config


@dataclass(frozen=True)
class WorkerHello:
    """A worker announces itself; ``requested_partition`` is -1 to let the aggregator choose.

    ``sent_at`` is the sender's wall clock (Unix seconds) when it was sent: the aggregator times
    liveness by it, so a hello read late from a backlog does not pass for a fresh one.
    """

    KIND: ClassVar[str] = "hello"
    worker_id: str
    requested_partition: int
    device: str
    sent_at: float

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "WorkerHello":
        return cls(r.ident("worker_id"), r.int("requested_partition", minimum=-1), r.str("device"),
                   r.float("sent_at"))


@dataclass(frozen=True)
class Heartbeat:
    """A worker is alive. ``state`` is joining, ready, training or idle; ``version`` the last
    model version it trained (-1 none). ``partition`` -1 until assigned. Also serves as a hello
    for an aggregator that (re)started after the worker. ``sent_at``: the sender's wall clock
    (Unix seconds) when it was sent; liveness is timed by it, not by when it is read.
    ``progress`` (0 to 1) is how far the local training in hand is (0 when not training);
    ``samples_per_second`` the speed of the worker's last local training (0 before any)."""

    KIND: ClassVar[str] = "heartbeat"
    STATES: ClassVar[tuple[str, ...]] = ("joining", "ready", "training", "idle")
    worker_id: str
    run_id: str
    state: str
    version: int
    partition: int
    device: str
    sent_at: float
    progress: float = 0.0
    samples_per_second: float = 0.0

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "Heartbeat":
        state = r.str("state")
        if state not in cls.STATES:
            raise InvalidMessage("schema", f"heartbeat.state {state!r} not in {cls.STATES}")
        return cls(
            r.ident("worker_id"), r.ident("run_id", nonempty=False), state,
            r.int("version", minimum=-1), r.int("partition", minimum=-1), r.str("device")[:64], r.float("sent_at"),
            r.bounded("progress", low=0.0, high=1.0), r.bounded("samples_per_second", low=0.0, high=1e12),
        )


@dataclass(frozen=True)
class WorkerGoodbye:
    """A worker stops taking part in ``run_id``: the quorum stops counting on it at once.

    ``reason`` says why, and what the aggregator does about it:
    - ``"leaving"``: it shuts down (stop, SIGTERM). A later hello or heartbeat joins it again.
    - ``"refused"``: it will not take part in this run (for example the run's model is not one it
      trusts); ``detail`` says why in words. The aggregator does not join it again on its
      heartbeats; only a new hello (a restarted, reconfigured worker) does.
    - ``"failed"``: it hit an error it cannot go on from and exits (non-zero, so that a restart
      policy restarts it); its restart says hello again.
    """

    KIND: ClassVar[str] = "goodbye"
    REASONS: ClassVar[tuple[str, ...]] = ("leaving", "refused", "failed")
    worker_id: str
    run_id: str
    reason: str = "leaving"
    detail: str = ""

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "WorkerGoodbye":
        reason = r.str("reason")
        if reason not in cls.REASONS:
            raise InvalidMessage("schema", f"goodbye.reason {reason!r} not in {cls.REASONS}")
        return cls(r.ident("worker_id"), r.ident("run_id", nonempty=False), reason, r.str("detail")[:1000])


@dataclass(frozen=True)
class JoinAccepted:
    """The aggregator's answer to a hello: the run, the task and the worker's partition."""

    KIND: ClassVar[str] = "join-accepted"
    run_id: str
    worker_id: str
    partition_index: int
    task: TaskSpec

    def fields(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "worker_id": self.worker_id,
                "partition_index": self.partition_index, "task": self.task.to_wire()}

    @classmethod
    def from_fields(cls, r: FieldReader) -> "JoinAccepted":
        task = TaskSpec.from_wire(r.map("task"))
        index = r.int("partition_index", minimum=0)
        if index >= task.num_partitions:
            raise InvalidMessage("schema", f"partition {index} >= num_partitions {task.num_partitions}")
        return cls(r.ident("run_id"), r.ident("worker_id"), index, task)


@dataclass(frozen=True)
class ModelBroadcast:
    """Global model ``version`` of ``run_id`` and how to train it.

    ``selected`` names the workers that should train this version (empty: every worker).
    ``weights`` is the full state_dict (parameters and buffers), CPU tensors.

    A selected worker that holds out evaluation rows (``--eval-fraction``) first scores the
    version on them and sends an :class:`EvaluationReport`, then trains it.

    A worker trains each version once, except when the aggregator asks again: ``attempt`` is 0
    on a version's first broadcast; a re-broadcast (the deadline passed without enough updates)
    carries a number not used before for that version, and ``awaited`` names the workers whose
    update the aggregator still lacks. A worker in ``awaited`` trains the version again unless it
    already answered this very attempt (the same broadcast can reach it twice: fanout and join).

    Compressed broadcasts (:mod:`fedmq.downlink`): ``base_version`` -1 means ``weights`` is the
    whole model (a keyframe); otherwise ``weights`` is the difference from the model of
    ``base_version`` the worker holds. ``digest`` is the SHA-256 of the model the worker must
    end up with (empty: not checked); a worker that cannot get it sends a
    :class:`KeyframeRequest` and trains nothing.
    """

    KIND: ClassVar[str] = "model"
    run_id: str
    version: int
    training: TrainingConfig
    selected: tuple[str, ...]
    weights: Mapping[str, torch.Tensor]
    attempt: int = 0
    awaited: tuple[str, ...] = ()
    base_version: int = -1
    digest: bytes = b""

    def fields(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "version": self.version, "training": self.training.to_wire(),
                "selected": list(self.selected), "weights": encode_tensors(self.weights),
                "attempt": self.attempt, "awaited": list(self.awaited), "base_version": self.base_version,
                "digest": self.digest}

    @classmethod
    def from_fields(cls, r: FieldReader) -> "ModelBroadcast":
        weights = r.tensors("weights")
        version, base, digest = r.int("version", minimum=0), r.int("base_version", minimum=-1), r.bytes("digest")
        if base >= version:
            raise InvalidMessage("schema", f"model.base_version={base} is not before version {version}")
        if len(digest) not in (0, 32):
            raise InvalidMessage("schema", f"model.digest has {len(digest)} bytes, want 0 or 32 (SHA-256)")
        return cls(r.ident("run_id"), version, TrainingConfig.from_wire(r.map("training")), r.idents("selected"),
                   weights, r.int("attempt", minimum=0), r.idents("awaited"), base, digest)

    def asks_again(self, worker_id: str) -> bool:
        """True if this broadcast asks ``worker_id`` to train its version again."""
        return self.attempt > 0 and worker_id in self.awaited


@dataclass(frozen=True)
class KeyframeRequest:
    """A worker could not rebuild model ``version`` of ``run_id`` from a compressed broadcast
    (``reason`` says why: it lacks the base version, or the digest disagrees) and asks for the
    whole model. Sent to the control queue; the aggregator answers in the worker's inbox."""

    KIND: ClassVar[str] = "keyframe-request"
    worker_id: str
    run_id: str
    version: int
    reason: str

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "KeyframeRequest":
        return cls(r.ident("worker_id"), r.ident("run_id"), r.int("version", minimum=0), r.str("reason")[:1000])


@dataclass(frozen=True)
class RunComplete:
    """The run is over: ``final_version`` is the last model, ``test_accuracy`` its score."""

    KIND: ClassVar[str] = "run-complete"
    run_id: str
    final_version: int
    test_accuracy: float

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "RunComplete":
        return cls(r.ident("run_id"), r.int("final_version", minimum=0), r.float("test_accuracy"))


#: The most samples one update may claim (its FedAvg weight): a billion is above any one worker's
#: data per version, so only a broken or hostile sender hits it. The aggregation pipeline may cap
#: a worker's weight far lower; this bound only keeps absurd values off the wire.
MAX_NUM_SAMPLES = 1_000_000_000


@dataclass(frozen=True)
class UpdateHeader:
    """The small fields of a :class:`WeightUpdate`, read without decoding its tensors."""

    run_id: str
    base_version: int
    worker_id: str
    partition: int
    num_samples: int

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.base_version, self.worker_id)


@dataclass(frozen=True)
class WeightUpdate:
    """One worker's result for model ``base_version``: ``delta`` = local weights - global weights.

    Identified by ``(run_id, base_version, worker_id)``. ``num_samples`` is its FedAvg weight
    (1 to :data:`MAX_NUM_SAMPLES`); ``partition`` the index it trained (-1: its own data);
    ``train_loss`` the mean training loss of its last local epoch; ``train_seconds`` wall time.
    """

    KIND: ClassVar[str] = "update"
    run_id: str
    base_version: int
    worker_id: str
    partition: int
    num_samples: int
    train_loss: float
    train_seconds: float
    steps: int
    delta: Mapping[str, torch.Tensor]

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.base_version, self.worker_id)

    def fields(self) -> dict[str, Any]:
        out = plain_fields(self)
        out["delta"] = encode_tensors(self.delta)
        return out

    @property
    def header(self) -> UpdateHeader:
        return UpdateHeader(self.run_id, self.base_version, self.worker_id, self.partition, self.num_samples)

    @classmethod
    def header_from(cls, r: FieldReader) -> UpdateHeader:
        samples = r.int("num_samples", minimum=1)
        if samples > MAX_NUM_SAMPLES:
            raise InvalidMessage("bounds", f"update.num_samples={samples} is above {MAX_NUM_SAMPLES}")
        return UpdateHeader(r.ident("run_id"), r.int("base_version", minimum=0),
                            r.ident("worker_id"), r.int("partition", minimum=-1), samples)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "WeightUpdate":
        head = cls.header_from(r)
        train_loss, train_seconds, steps = r.float("train_loss"), r.float("train_seconds"), r.int("steps", minimum=0)
        if train_seconds < 0:
            raise InvalidMessage("bounds", f"update.train_seconds={train_seconds} is negative")
        delta = r.tensors("delta")
        return cls(head.run_id, head.base_version, head.worker_id, head.partition, head.num_samples,
                   train_loss, train_seconds, steps, delta)


@dataclass(frozen=True)
class EvaluationRequest:
    """Score model ``version`` on your held-out rows, do not train it: sent once, for the final
    model of a run (every other version's broadcast is scored on receipt). ``selected`` names
    the workers asked (empty: every worker)."""

    KIND: ClassVar[str] = "evaluate"
    run_id: str
    version: int
    selected: tuple[str, ...]
    weights: Mapping[str, torch.Tensor]

    def fields(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "version": self.version, "selected": list(self.selected),
                "weights": encode_tensors(self.weights)}

    @classmethod
    def from_fields(cls, r: FieldReader) -> "EvaluationRequest":
        weights = r.tensors("weights")
        return cls(r.ident("run_id"), r.int("version", minimum=0), r.idents("selected"), weights)


@dataclass(frozen=True)
class EvaluationReport:
    """A worker's score of model ``version`` on the ``num_samples`` rows it holds out (1 to
    :data:`MAX_NUM_SAMPLES`): ``loss`` the mean cross-entropy, ``accuracy`` the fraction right.
    Identified, like an update, by ``(run_id, version, worker_id)``; sent on the update queue
    just before the worker's update of the same version, so it is read first."""

    KIND: ClassVar[str] = "evaluation"
    run_id: str
    version: int
    worker_id: str
    num_samples: int
    loss: float
    accuracy: float

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.version, self.worker_id)

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "EvaluationReport":
        samples = r.int("num_samples", minimum=1)
        if samples > MAX_NUM_SAMPLES:
            raise InvalidMessage("bounds", f"evaluation.num_samples={samples} is above {MAX_NUM_SAMPLES}")
        return cls(r.ident("run_id"), r.int("version", minimum=0), r.ident("worker_id"), samples,
                   r.bounded("loss", low=0.0), r.bounded("accuracy", low=0.0, high=1.0))


@dataclass(frozen=True)
class Chunk:
    """Part ``index`` of ``count`` of a message too large for one AMQP message.

    ``sha256`` is the digest of the whole reassembled payload, checked on reassembly.
    """

    KIND: ClassVar[str] = "chunk"
    message_id: str
    index: int
    count: int
    total_bytes: int
    sha256: bytes
    data: bytes

    def fields(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_fields(cls, r: FieldReader) -> "Chunk":
        chunk = cls(r.ident("message_id"), r.int("index", minimum=0), r.int("count", minimum=1),
                    r.int("total_bytes", minimum=0), r.bytes("sha256"), r.bytes("data"))
        if chunk.index >= chunk.count:
            raise InvalidMessage("schema", f"chunk index {chunk.index} >= count {chunk.count}")
        if len(chunk.sha256) != 32:
            raise InvalidMessage("schema", "chunk sha256 must be 32 bytes")
        return chunk


Message = Union[WorkerHello, Heartbeat, WorkerGoodbye, JoinAccepted, ModelBroadcast, RunComplete, WeightUpdate,
                EvaluationRequest, EvaluationReport, Chunk, KeyframeRequest, StatusRequest, StatusReply]
_KINDS: dict[str, Any] = {cls.KIND: cls for cls in Message.__args__}  # type: ignore[attr-defined]


def encode(message: Message) -> bytes:
    """A message as msgpack bytes (not chunked; see :mod:`fedmq.chunking`)."""
    body = {"schema": SCHEMA_VERSION, "kind": message.KIND}
    body.update(message.fields())
    return msgpack.packb(body, use_bin_type=True)


_HEADER_FIELDS = tuple(f.name for f in dataclasses.fields(UpdateHeader))
_PEEKED = frozenset(("schema", "kind", *_HEADER_FIELDS))
_PEEK_READ_BYTES = 64 * 1024


def _leading_fields(data: bytes, wanted: frozenset[str]) -> dict[str, Any] | None:
    """The ``wanted`` fields of an encoded message map, read from its start without reading
    (or copying) what follows them. None if they are not all there before any large field."""
    unpacker = msgpack.Unpacker(io.BytesIO(data), raw=False, strict_map_key=True, read_size=_PEEK_READ_BYTES,
                                max_bin_len=_PEEK_READ_BYTES, max_str_len=_PEEK_READ_BYTES,
                                max_array_len=_PEEK_READ_BYTES, max_map_len=_PEEK_READ_BYTES)
    found: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if not isinstance(key, str) or key in ("delta", "weights", "data"):
                return None
            found[key] = unpacker.unpack()
            if wanted <= found.keys():
                return found
    except Exception:  # not msgpack, not a map, a huge leading field: a full decode says what
        return None
    return None


def peek_update(data: bytes) -> UpdateHeader | None:
    """The header of an encoded :class:`WeightUpdate`, read without touching its tensors.

    Reads the map's leading fields only (an encoder writes them before ``delta``). Returns None
    when ``data`` does not look like an update laid out that way: decode it whole then, which
    also gives the exact error. Raises :class:`InvalidMessage` for a header field that is wrong.
    """
    found = _leading_fields(data, _PEEKED)
    if found is None or found["schema"] != SCHEMA_VERSION or found["kind"] != WeightUpdate.KIND:
        return None
    return WeightUpdate.header_from(FieldReader(WeightUpdate.KIND, {k: found[k] for k in _HEADER_FIELDS}, _HEADER_FIELDS))


def peek_kind(data: bytes) -> str | None:
    """The ``kind`` of an encoded message, read from its leading fields; None if it is not laid
    out as fedmq writes messages (decode it whole then: that says what is wrong)."""
    found = _leading_fields(data, frozenset(("kind",)))
    kind = found.get("kind") if found is not None else None
    return kind if isinstance(kind, str) else None


def peek_worker_id(data: bytes) -> str | None:
    """The ``worker_id`` of an encoded message from a worker (hello, heartbeat, goodbye, update,
    evaluation report), read from its leading fields; None if it has none there (decode it
    whole then: that says what is wrong)."""
    found = _leading_fields(data, frozenset(("worker_id",)))
    worker_id = found.get("worker_id") if found is not None else None
    return worker_id if isinstance(worker_id, str) else None


def decode_chunk(data: bytes) -> Chunk | None:
    """The :class:`Chunk` in ``data``, or None if ``data`` is some other (or no) message; only
    a chunk is decoded here, anything else is left for :func:`decode`."""
    found = _leading_fields(data, frozenset(("kind",)))
    if found is not None and found["kind"] != Chunk.KIND:
        return None
    message = decode(data) if found is not None else _decode_or_none(data)
    return message if isinstance(message, Chunk) else None


def _decode_or_none(data: bytes) -> Message | None:
    try:
        return decode(data)
    except InvalidMessage:
        return None


def decode(data: bytes, *, max_elements: int | None = None) -> Message:
    """Bytes back to a message; :class:`InvalidMessage` for anything that is not one.

    ``max_elements`` bounds the elements a message's compressed tensors may declare (the
    receiver's model size), so a few bytes can never make the decoder allocate more than that."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise InvalidMessage("malformed", f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage("malformed", f"top level is {type(raw).__name__}, want a map")
    schema, kind = raw.get("schema"), raw.get("kind")
    if schema != SCHEMA_VERSION:
        raise InvalidMessage("schema", f"schema version {schema!r}, this build reads {SCHEMA_VERSION}")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidMessage("schema", f"unknown message kind {kind!r}")
    field_names = tuple(f.name for f in dataclasses.fields(cls))
    return cls.from_fields(FieldReader(kind, raw, field_names, max_elements=max_elements))
