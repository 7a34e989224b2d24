"""Every setting of fedmq: one frozen object built from flags and ``FEDMQ_*`` variables.

A setting is a dataclass field with its help text. Its flag is ``--field-name`` and its
environment variable ``FEDMQ_FIELD_NAME``; a flag beats the environment, which beats the
default. :func:`build_parser` and :func:`settings_from_args` are used by the command line
(``fedmq_cli``), which builds the object once and passes it down; nothing reads the
environment anywhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedmq.codecs import parse_codec

ENV_PREFIX = "FEDMQ_"

#: The run id of ``fedmq aggregator`` when none is given. Fixed, not generated: a restarted
#: aggregator (a container brought back by its restart policy, a crashed process started again)
#: must find its checkpoint and resume the same run, not start another one from scratch. A new
#: run is a deliberate act: name it with ``--run-id``. (``fedmq run``, a one-off process, uses a
#: timestamp instead.)
DEFAULT_RUN_ID = "default"

#: ``--num-partitions 0`` splits the training set in ``max(--start-workers, this)`` partitions, so
#: that workers added with ``docker compose --scale worker=N`` (N up to this) train distinct data
#: with the default settings; set ``--num-partitions`` to the number of workers to use all of it.
AUTO_MIN_PARTITIONS = 10


class SettingsError(ValueError):
    """A setting has a value fedmq cannot use; the message names the flag and variable."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass(frozen=True)
class BrokerSettings:
    broker_url: str = setting("amqp://guest:guest@127.0.0.1:5672/%2F", "RabbitMQ URL, amqp://user:password@host:port/vhost")
    broker_heartbeat_s: int = setting(30, "AMQP heartbeat in seconds (the broker drops a silent connection after two)")
    max_frame_bytes: int = setting(8 * 1024 * 1024, "largest AMQP message in bytes; larger payloads travel as chunks")
    broker_ca_file: str = setting("", "PEM file of the CA that signed the broker's TLS certificate (amqps:// URLs; "
                                      "empty: the system's CAs)")
    broker_cert_file: str = setting("", "PEM file of this client's TLS certificate, for brokers that ask for one")
    broker_key_file: str = setting("", "PEM file of the key of --broker-cert-file (empty: it is in that file)")


@dataclass(frozen=True)
class DataSettings:
    data_root: str = setting(str(Path.home() / ".cache" / "fedmq" / "data"), "data set cache directory (torchvision layout)")
    data_mirror: str = setting("", "directory holding the original data files (torchvision layout) to copy from when offline")
    download: bool = setting(True, "download missing data sets with torchvision")


@dataclass(frozen=True)
class RunSettings:
    run_id: str = setting("", "name of the federation; messages, checkpoints and metrics carry it; an aggregator "
                              f"restarted with the same run id resumes it (default: {DEFAULT_RUN_ID!r} for the "
                              "aggregator, a timestamp for fedmq run)")
    dataset: str = setting("mnist", "data set", choices=("mnist", "fashion-mnist", "cifar10"))
    model: str = setting("fedavg-cnn", "fedavg-cnn, fedavg-2nn, cifar-cnn, or package.module:factory")
    partition_scheme: str = setting("iid", "how the training set is split among workers", choices=("iid", "dirichlet", "shards"))
    num_partitions: int = setting(0, "partitions of the training set, one per worker (0: the larger of --start-workers "
                                     f"and {AUTO_MIN_PARTITIONS}, so up to {AUTO_MIN_PARTITIONS} scaled workers train "
                                     "distinct data)")
    dirichlet_alpha: float = setting(0.5, "concentration of the Dirichlet split (smaller: more skewed)")
    shards_per_partition: int = setting(2, "label shards per worker for the shards split")
    seed: int = setting(0, "seed of the initial model, the partitions and the client selection")
    versions: int = setting(5, "stop after this many model versions (rounds)")
    target_accuracy: float = setting(0.0, "stop early once a version's accuracy reaches this: on the test set, or "
                                          "federated with --eval-data none (0: never)")
    local_epochs: int = setting(1, "local epochs per version (E)")
    local_steps: int = setting(0, "fixed local optimizer steps per version instead of epochs (0: use epochs; 1 with batch 0: FedSGD)")
    batch_size: int = setting(32, "local batch size (B); 0 means the whole partition")
    learning_rate: float = setting(0.05, "local learning rate")
    optimizer: str = setting("sgd", "local optimizer", choices=("sgd", "adam"))
    momentum: float = setting(0.0, "SGD momentum")
    weight_decay: float = setting(0.0, "weight decay")
    proximal_mu: float = setting(0.0, "FedProx: workers add MU/2 times the squared L2 distance to the global model to their local loss (0: plain FedAvg)")
    aggregation: str = setting("fedavg", "how a version's updates combine: fedavg streams a sample-weighted mean "
                                         "(memory O(P)); trimmed-mean, median and krum keep all N updates of a version "
                                         "at once (memory O(N*P): 4*N*P bytes, 665 MB for 100 updates of the CNN) and "
                                         "ignore sample counts (and, in async mode, staleness weights: they combine "
                                         "each version's --buffer-size updates)", choices=("fedavg", "trimmed-mean", "median", "krum"))
    trim_fraction: float = setting(0.1, "trimmed-mean: fraction of the values cut at each end of every coordinate "
                                        "(floor(N * fraction) each side: with 10 updates, 0.1 cuts one; with fewer, none)")
    krum_attackers: int = setting(0, "krum: the number of attackers f it assumes (a version needs at least f+3 "
                                     "updates: --min-updates, or --buffer-size in async mode)")
    clip_norm: float = setting(0.0, "clip each update's L2 norm to this before it is combined (0: no clipping)")
    max_samples_per_update: int = setting(0, "cap on the sample count an update may claim, its FedAvg weight (0: no "
                                             "cap); updates of a built-in partition are also capped at its size")
    dp_noise_multiplier: float = setting(0.0, "DP-FedAvg: Gaussian noise of standard deviation Z*C/m on the mean of "
                                              "the m updates clipped to --clip-norm C, every update weighing 1 "
                                              "(0: no differential privacy)")
    dp_delta: float = setting(1e-5, "delta at which the privacy accountant reports epsilon")
    dp_epsilon_budget: float = setting(0.0, "stop the run before a version would bring epsilon above this "
                                            "(0: no budget)")
    update_codec: str = setting("fp32", "how workers encode their updates: fp32, fp16, bf16, int8, or topk:FRACTION "
                                        "(values as int8; topk:FRACTION:fp16 for fp16), with error feedback for the "
                                        "lossy ones; travels in each broadcast")
    broadcast_codec: str = setting("fp32", "how the aggregator encodes the model it broadcasts: fp32, fp16, bf16 or int8 "
                                           "(lossy ones send the difference from what the workers hold, in a closed "
                                           "loop, and full models to joiners)")
    min_updates: int = setting(1, "fewest updates that may close a version (at the deadline)")
    quorum_fraction: float = setting(1.0, "a version closes at once when this fraction of its selected live workers has reported")
    client_fraction: float = setting(1.0, "fraction of live workers selected for each version (FedAvg's C)")
    start_workers: int = setting(1, "ready workers to wait for before the first version is broadcast")
    round_timeout_s: float = setting(300.0, "round deadline in seconds: close with at least min-updates, else re-broadcast")
    worker_timeout_s: float = setting(20.0, "a worker silent for this many seconds is considered dead")
    mode: str = setting("sync", "sync: a version waits for its quorum (FedAvg); async: every --buffer-size updates "
                                "make a version, stale ones weighted by --staleness (FedBuff)", choices=("sync", "async"))
    buffer_size: int = setting(5, "async mode: updates folded into each version (FedBuff's K; at most the live workers)")
    max_staleness: int = setting(10, "async mode: an update trained on a version more than this many versions old "
                                     "is acknowledged, counted and not folded")
    staleness: str = setting("polynomial", "async mode: how a stale update is weighted: constant 1, polynomial "
                                           "(1+tau)^-EXPONENT, or hinge 1/(SLOPE*(tau-START)+1) beyond START versions",
                             choices=("constant", "polynomial", "hinge"))
    staleness_exponent: float = setting(0.5, "exponent of the polynomial staleness weight (0.5: FedBuff's 1/sqrt(1+tau))")
    staleness_hinge_slope: float = setting(10.0, "slope of the hinge staleness weight")
    staleness_hinge_start: int = setting(4, "staleness (versions) up to which the hinge weight is 1")
    server_optimizer: str = setting("fedavg", "how the server moves the model by a version's mean delta (Reddi et al. "
                                              "2021): fedavg, fedavgm (momentum), fedadam, fedyogi",
                                    choices=("fedavg", "fedavgm", "fedadam", "fedyogi"))
    server_learning_rate: float = setting(0.0, "server learning rate (0: 1.0 for fedavg and fedavgm, 0.01 for fedadam "
                                               "and fedyogi)")
    server_momentum: float = setting(0.9, "fedavgm: server momentum")
    server_beta1: float = setting(0.9, "fedadam, fedyogi: first-moment decay")
    server_beta2: float = setting(0.99, "fedadam, fedyogi: second-moment decay")
    server_epsilon: float = setting(0.001, "fedadam, fedyogi: adaptivity (tau in Reddi et al.)")
    output_dir: str = setting("runs", "directory for the metrics, checkpoint and final model (a folder per run id)")
    eval_batch_size: int = setting(1000, "batch size of the test-set evaluation")
    eval_device: str = setting("auto", "device for evaluation", choices=("auto", "cpu", "cuda"))
    eval_threads: int = setting(0, "torch threads for evaluation (0: torch's default)")
    eval_data: str = setting("test", "what the aggregator scores each version on besides the workers' held-out rows "
                                     "(--eval-fraction): the data set's test split, or none (it holds no data)",
                             choices=("test", "none"))
    require_worker_identity: bool = setting(False, "refuse (dead-letter) worker messages whose worker id does not "
                                                   "start with the sending broker user and a dot (the AMQP user_id, "
                                                   "which RabbitMQ checks)")

    @property
    def partition_count(self) -> int:
        """The number of partitions the training set is split into (see ``num_partitions``)."""
        return self.num_partitions or max(self.start_workers, AUTO_MIN_PARTITIONS)


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str = setting("", "this worker's identity (default: the broker user, a dot, host name, process id and a random suffix)")
    partition: int = setting(-1, "train on this partition index instead of the one the aggregator assigns")
    device: str = setting("auto", "training device; auto picks CUDA when available", choices=("auto", "cpu", "cuda"))
    heartbeat_interval_s: float = setting(5.0, "seconds between heartbeats to the aggregator")
    threads: int = setting(0, "torch threads for local training (0: torch's default)")
    exit_when_done: bool = setting(True, "exit when the run completes instead of waiting for the next run")
    training_slots: int = setting(0, "at most this many workers sharing --training-slots-dir train at once "
                                     "(0: no cap); use the core or GPU count when workers share a machine")
    training_slots_dir: str = setting("/tmp/fedmq-training-slots", "directory of the lock files of the training slots "
                                      "(a volume shared by the co-located workers)")
    trusted_models: str = setting("", "comma-separated package.module:factory models this worker may build when a "
                                      "run asks for them (built-in models are always allowed)")
    data: str = setting("", "this worker's own training data: a folder of images, one sub-folder per class "
                            "(ImageFolder), or a package.module:factory returning a torch Dataset "
                            "(empty: its partition of the run's built-in data set)")
    trusted_data_factories: str = setting("", "comma-separated package.module:factory data sets --data may name "
                                              "(nothing else is imported)")
    eval_fraction: float = setting(0.0, "fraction of this worker's data held out to score each model version on "
                                        "(federated evaluation; 0: none, train on everything)")
    slowdown: float = setting(1.0, "experiment knob: local training takes this many times as long (the worker waits "
                                   "after training), to simulate a straggler in tests and benchmarks")


@dataclass(frozen=True)
class OpsSettings:
    metrics_port: int = setting(0, "serve Prometheus metrics at http://0.0.0.0:PORT/metrics (0: not served)")
    log_format: str = setting("plain", "log lines as plain text, or one JSON object per line",
                              choices=("plain", "json"))
    live_view: str = setting("auto", "a live view of the run (rich) in the terminal: auto shows it when stdout "
                                     "is a terminal, else prints plain lines", choices=("auto", "on", "off"))


@dataclass(frozen=True)
class StatusSettings:
    status_timeout_s: float = setting(5.0, "fedmq status: seconds to wait for the aggregator's answer")


@dataclass(frozen=True)
class EmbeddedSettings:
    workers: int = setting(4, "workers in the embedded federation")


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    log_level: str = "INFO"


GROUPS: dict[str, type] = {"broker": BrokerSettings, "data": DataSettings, "run": RunSettings,
                           "worker": WorkerSettings, "embedded": EmbeddedSettings, "ops": OpsSettings,
                           "status": StatusSettings}


def add_group(parser: argparse.ArgumentParser, group: str) -> None:
    """Add one flag per setting of ``group``; defaults stay None so the environment can fill in."""
    cls = GROUPS[group]
    section = parser.add_argument_group(f"{group} settings")
    for f in dataclasses.fields(cls):
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]".replace("%", "%%")
        if f.type in ("bool", bool):
            section.add_argument(flag_name(f.name), dest=f.name, default=None,
                                 action=argparse.BooleanOptionalAction, help=help_text)
        else:
            section.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=f.name.split("_")[-1].upper(),
                                 choices=f.metadata["choices"], type=_PARSERS[str(f.type)], help=help_text)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_PARSERS = {"str": str, "int": int, "float": float, "bool": _parse_bool}


def _group_from(cls: type, args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            try:
                given = _PARSERS[str(f.type)](raw)
            except ValueError as exc:
                raise SettingsError(f"{env_name(f.name)}={raw!r}: {exc}") from None
            choices = f.metadata["choices"]
            if choices and given not in choices:
                raise SettingsError(f"{env_name(f.name)}={raw!r}: choose from {', '.join(choices)}")
        values[f.name] = f.default if given is None else given
    return cls(**values)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings for parsed flags, with ``FEDMQ_*`` variables for flags not given."""
    environ = os.environ if environ is None else environ
    groups = {name: _group_from(cls, args, environ) for name, cls in GROUPS.items()}
    # The embedded mode prints its own line per version; the services log every event.
    default_level = "WARNING" if getattr(args, "command", None) in ("run", "status", "report") else "INFO"
    log_level = getattr(args, "log_level", None) or environ.get(env_name("log_level"), default_level)
    settings = Settings(**groups, log_level=log_level.upper())
    validate(settings)
    return settings


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise SettingsError(f"{flag_name(name)} / {env_name(name)}: {why}")


def validate(s: Settings) -> None:
    """SettingsError for values no run could use."""
    r, w = s.run, s.worker
    _require(s.broker.broker_heartbeat_s >= 0, "broker_heartbeat_s", "must be >= 0")
    _require(s.broker.max_frame_bytes >= 64 * 1024, "max_frame_bytes", "must be at least 65536")
    _require(r.num_partitions >= 0, "num_partitions", "must be >= 0")
    _require(r.dirichlet_alpha > 0, "dirichlet_alpha", "must be > 0")
    _require(r.versions >= 1, "versions", "must be >= 1")
    _require(0.0 <= r.target_accuracy <= 1.0, "target_accuracy", "must be within [0, 1]")
    _require(r.local_epochs >= 0 and r.local_steps >= 0 and r.local_epochs + r.local_steps > 0,
             "local_epochs", "local epochs or local steps must be positive")
    _require(r.batch_size >= 0, "batch_size", "must be >= 0")
    _require(r.learning_rate > 0, "learning_rate", "must be > 0")
    _require(r.min_updates >= 1, "min_updates", "must be >= 1")
    _require(0.0 < r.quorum_fraction <= 1.0, "quorum_fraction", "must be within (0, 1]")
    _require(0.0 < r.client_fraction <= 1.0, "client_fraction", "must be within (0, 1]")
    _require(r.start_workers >= 1, "start_workers", "must be >= 1")
    _require(r.round_timeout_s > 0, "round_timeout_s", "must be > 0")
    _require(r.worker_timeout_s > 0, "worker_timeout_s", "must be > 0")
    _require(r.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
    _require(r.proximal_mu >= 0, "proximal_mu", "must be >= 0")
    _require(0.0 <= r.trim_fraction < 0.5, "trim_fraction", "must be within [0, 0.5)")
    _require(r.krum_attackers >= 0, "krum_attackers", "must be >= 0")
    if r.aggregation == "krum" and r.mode == "async":
        _require(r.buffer_size >= r.krum_attackers + 3, "buffer_size",
                 f"krum needs at least --krum-attackers + 3 = {r.krum_attackers + 3} updates per version")
    elif r.aggregation == "krum":
        _require(r.min_updates >= r.krum_attackers + 3, "min_updates",
                 f"krum needs at least --krum-attackers + 3 = {r.krum_attackers + 3} updates per version")
    _require(r.clip_norm >= 0, "clip_norm", "must be >= 0")
    _require(r.max_samples_per_update >= 0, "max_samples_per_update", "must be >= 0")
    _require(r.dp_noise_multiplier >= 0, "dp_noise_multiplier", "must be >= 0")
    _require(r.dp_noise_multiplier == 0 or r.clip_norm > 0, "dp_noise_multiplier",
             "DP noise is calibrated to the clipping norm: set --clip-norm / FEDMQ_CLIP_NORM too")
    _require(r.dp_noise_multiplier == 0 or r.aggregation == "fedavg", "dp_noise_multiplier",
             f"DP noise is calibrated to the mean of clipped updates; --aggregation {r.aggregation} has no "
             "such sensitivity bound: use --aggregation fedavg")
    _require(0.0 < r.dp_delta < 1.0, "dp_delta", "must be within (0, 1)")
    _require(r.dp_epsilon_budget >= 0, "dp_epsilon_budget", "must be >= 0")
    _require(r.dp_epsilon_budget == 0 or r.dp_noise_multiplier > 0, "dp_epsilon_budget",
             "a privacy budget needs DP noise: set --dp-noise-multiplier")
    for name, spec in (("update_codec", r.update_codec), ("broadcast_codec", r.broadcast_codec)):
        try:
            codec = parse_codec(spec)
        except ValueError as exc:
            raise SettingsError(f"{flag_name(name)} / {env_name(name)}: {exc}") from None
        _require(not (name == "broadcast_codec" and codec.sparse), name, "top-k is for updates only; choose fp32, "
                 "fp16, bf16 or int8")
    _require(r.buffer_size >= 1, "buffer_size", "must be >= 1")
    _require(r.max_staleness >= 0, "max_staleness", "must be >= 0")
    _require(r.staleness_exponent >= 0, "staleness_exponent", "must be >= 0")
    _require(r.staleness_hinge_slope >= 0, "staleness_hinge_slope", "must be >= 0")
    _require(r.staleness_hinge_start >= 0, "staleness_hinge_start", "must be >= 0")
    _require(r.server_learning_rate >= 0, "server_learning_rate", "must be >= 0 (0: the optimizer's default)")
    _require(0 <= r.server_momentum < 1, "server_momentum", "must be within [0, 1)")
    _require(0 <= r.server_beta1 < 1, "server_beta1", "must be within [0, 1)")
    _require(0 <= r.server_beta2 < 1, "server_beta2", "must be within [0, 1)")
    _require(r.server_epsilon > 0, "server_epsilon", "must be > 0")
    _require(w.slowdown >= 1, "slowdown", "must be >= 1")
    _require(r.client_fraction == 1.0 or r.mode == "sync", "client_fraction",
             "async mode has no client selection: every live worker trains the newest version it has")
    _require(r.dp_noise_multiplier == 0 or r.mode == "sync", "dp_noise_multiplier",
             "DP noise is calibrated to the plain mean of one version's clipped updates; async mode weighs "
             "them by staleness: use --mode sync")
    _require(w.partition >= -1, "partition", "must be -1 (assigned) or a partition index")
    _require(w.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
    _require(w.heartbeat_interval_s < r.worker_timeout_s, "heartbeat_interval_s",
             f"must be below the worker timeout ({r.worker_timeout_s} s)")
    _require(s.embedded.workers >= 1, "workers", "must be >= 1")
    _require(w.training_slots >= 0, "training_slots", "must be >= 0")
    _require(0.0 <= w.eval_fraction < 1.0, "eval_fraction", "must be within [0, 1)")
    _require(0 <= s.ops.metrics_port <= 65535, "metrics_port", "must be a TCP port (0: off)")
    _require(s.status.status_timeout_s > 0, "status_timeout_s", "must be > 0")
    for name, value in (("worker_id", w.worker_id), ("run_id", r.run_id)):
        # The same rule the wire enforces (fedmq.wire_fields.check_identifier): at most 128 ASCII
        # letters, digits, - _ . so every queue name and routing key built from it fits AMQP.
        _require(len(value) <= 128 and all((c.isascii() and c.isalnum()) or c in "-_." for c in value),
                 name, "at most 128 letters, digits, - _ .")
