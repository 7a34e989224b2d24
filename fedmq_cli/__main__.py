"""``fedmq aggregator | worker | run | status | report``: every setting a flag and a ``FEDMQ_*`` variable."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, Sequence

from fedmq.errors import FedmqError
from fedmq.settings import Settings, SettingsError, add_group, settings_from_args

COMMANDS = {
    "run": ("run a whole federation in this process over the in-memory broker (the embedded mode)",
            ("data", "run", "worker", "embedded", "ops")),
    "aggregator": ("serve the aggregator of one federation over RabbitMQ", ("broker", "data", "run", "ops")),
    "worker": ("serve one worker over RabbitMQ", ("broker", "data", "worker", "ops")),
    "status": ("ask the running aggregator for its run, open version and live workers", ("broker", "status")),
    "report": ("plot the metrics of finished (or running) runs into a PNG and a markdown summary", ()),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmq", description="Federated learning as a message-queue service.",
        epilog="Every flag can also be set by its FEDMQ_* environment variable; a flag wins.",
        # Flags are matched exactly: with abbreviations `--mode async` would be taken as `--model`.
        allow_abbrev=False)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING [env FEDMQ_LOG_LEVEL; default INFO]")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, groups) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        for group in groups:
            add_group(sub, group)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print the answer as one JSON object")
        if name == "report":
            from fedmq_cli.report import add_report_arguments

            add_report_arguments(sub)
    return parser


def torch_threads(command: str, settings: Settings) -> int:
    """The torch thread count for ``command`` (0: torch's default). Each service reads only its
    own setting: a ``FEDMQ_THREADS`` meant for workers must not slow the aggregator's evaluation.
    The embedded mode trains and evaluates in one process: the workers' setting wins there."""
    if command == "aggregator":
        return settings.run.eval_threads
    if command == "worker":
        return settings.worker.threads
    return settings.worker.threads or settings.run.eval_threads


def _configure(command: str, settings: Settings) -> None:
    from fedmq.log_format import configure_logging

    configure_logging(settings.log_level, settings.ops.log_format)
    # pika logs every socket event at INFO; fedmq logs the connection events a person needs.
    logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLogger().level))
    import torch  # imported late: `fedmq --help` stays fast

    threads = torch_threads(command, settings)
    if threads > 0:
        torch.set_num_threads(threads)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM (`docker stop`) and SIGINT (Ctrl-C) ask a service to stop cleanly.

    Needed in a container too: there fedmq is PID 1, which a signal without a handler never stops.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop())


def _exit_now() -> None:
    raise SystemExit(0)


def _tls_files(settings: Settings):
    from fedmq.broker.rabbitmq_tls import TlsFiles

    b = settings.broker
    return TlsFiles(b.broker_ca_file, b.broker_cert_file, b.broker_key_file)


def _summary(result) -> str:  # noqa: ANN001 - aggregator.service.RunResult, imported late
    """The last line a run prints: its final version, the accuracies measured, where it wrote."""
    scores = [f"{what} accuracy {value:.4f}" for what, value in
              (("test", result.test_accuracy), ("federated", result.federated_accuracy)) if value == value]
    return (f"run {result.run_id}: version {result.final_version}, {', '.join(scores) or 'accuracy not measured'}, "
            f"output in {result.output_dir}")


def _metrics_sink(settings: Settings, kind: str, events, servers: list):  # noqa: ANN001 - imported late
    """With ``--metrics-port``: the service's Prometheus metrics on the bus, served over HTTP."""
    if not settings.ops.metrics_port:
        return
    from fedmq.prometheus_metrics import AggregatorMetrics, WorkerMetrics, serve_metrics

    metrics = AggregatorMetrics() if kind == "aggregator" else WorkerMetrics()
    events.add(metrics)
    servers.append(serve_metrics(metrics.registry, settings.ops.metrics_port))


def _federation_view(settings: Settings, events):  # noqa: ANN001, ANN202 - imported late
    """The live view of the federation (or plain version lines), fed by ``events``."""
    from fedmq.federation_state import FederationState
    from fedmq.live_view import console_view, render_federation

    state = FederationState(settings.run.run_id, settings.run.versions)
    events.add(state)
    return console_view(settings.ops.live_view, lambda: render_federation(state.snapshot()), sys.stdout)


def _serve_aggregator(settings: Settings) -> int:
    from aggregator.service import Aggregator
    from fedmq.broker.rabbitmq import RabbitBroker
    from fedmq.events import EventBus

    broker = RabbitBroker(settings.broker.broker_url, connection_name="fedmq-aggregator",
                          heartbeat_s=settings.broker.broker_heartbeat_s,
                          max_message_bytes=settings.broker.max_frame_bytes, tls=_tls_files(settings))
    events, servers = EventBus(), []
    _metrics_sink(settings, "aggregator", events, servers)
    with broker, _federation_view(settings, events) as view:
        aggregator = Aggregator(settings, broker, on_version=lambda r: view.print_line(r.console_line()),
                                events=events)
        _stop_on_signals(aggregator.stop)
        result = aggregator.run()
    if not aggregator.finished:
        print(f"run {result.run_id}: stopped at version {result.final_version}; the same run id resumes it "
              f"from {result.output_dir}", flush=True)
        return 0
    print(_summary(result), flush=True)
    return 0


def _serve_worker(settings: Settings) -> int:
    from fedmq.broker.rabbitmq import RabbitBroker
    from fedmq.events import EventBus
    from fedmq.live_view import console_view
    from worker.service import Worker
    from worker.worker_view import WorkerViewState

    broker = RabbitBroker(settings.broker.broker_url, connection_name="fedmq-worker",
                          heartbeat_s=settings.broker.broker_heartbeat_s,
                          max_message_bytes=settings.broker.max_frame_bytes, tls=_tls_files(settings))
    events, servers = EventBus(), []
    _metrics_sink(settings, "worker", events, servers)
    with broker:
        worker = Worker(settings, broker, events=events)
        # A stopped worker says goodbye, so the quorum stops counting on it at once instead of
        # after the heartbeat timeout.
        _stop_on_signals(worker.stop)
        view = WorkerViewState(worker.worker_id)
        events.add(view)
        with console_view(settings.ops.live_view, lambda: view.render(worker.progress.snapshot()), sys.stdout):
            worker.run()
    if worker.failure:
        print(f"fedmq worker {worker.worker_id}: {worker.failure}", file=sys.stderr, flush=True)
        return 1
    return 0


def _run_embedded(settings: Settings) -> int:
    from fedmq_cli.embedded import run_embedded

    print(f"fedmq embedded: {settings.embedded.workers} workers, {settings.run.model} on {settings.run.dataset}, "
          f"{settings.run.versions} versions", flush=True)
    from fedmq.events import EventBus

    events, servers = EventBus(), []
    _metrics_sink(settings, "aggregator", events, servers)
    with _federation_view(settings, events) as view:
        result = run_embedded(settings, on_version=lambda r: view.print_line(r.console_line()), events=events)
    print(_summary(result), flush=True)
    return 0


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from fedmq_cli.status import run_status

    return run_status(settings, as_json=args.json)


def _report(args: argparse.Namespace) -> int:
    from fedmq_cli.report import run_report

    return run_report(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        parser.error(str(exc))
    if args.command in ("aggregator", "worker"):
        # Until the service is up and can stop cleanly, a stop signal just ends the process.
        _stop_on_signals(_exit_now)
    if args.command in ("status", "report"):  # no torch: these answer in a moment
        from fedmq.log_format import configure_logging

        configure_logging(settings.log_level, settings.ops.log_format)
        logging.getLogger("pika").setLevel(logging.WARNING)
    else:
        _configure(args.command, settings)
    handlers = {"aggregator": _serve_aggregator, "worker": _serve_worker, "run": _run_embedded,
                "status": lambda s: _status(s, args), "report": lambda s: _report(args)}
    try:
        return handlers[args.command](settings)
    except FedmqError as exc:
        print(f"fedmq {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
