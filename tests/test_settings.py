"""Settings: flags beat FEDMQ_* variables beat defaults; bad values are clear errors."""

import pytest

from fedmq.settings import GROUPS, SettingsError, env_name, settings_from_args
from fedmq_cli.__main__ import build_parser


def parse(argv, environ=None):
    return settings_from_args(build_parser().parse_args(argv), environ or {})


def test_defaults_environment_and_flags_in_that_order():
    assert parse(["aggregator"]).run.learning_rate == 0.05
    assert parse(["aggregator"], {"FEDMQ_LEARNING_RATE": "0.1"}).run.learning_rate == 0.1
    assert parse(["aggregator", "--learning-rate", "0.2"], {"FEDMQ_LEARNING_RATE": "0.1"}).run.learning_rate == 0.2


def test_booleans_from_flags_and_environment():
    assert parse(["worker"]).worker.exit_when_done is True
    assert parse(["worker", "--no-exit-when-done"]).worker.exit_when_done is False
    assert parse(["worker"], {"FEDMQ_EXIT_WHEN_DONE": "false"}).worker.exit_when_done is False


def test_bad_environment_values_name_the_variable():
    with pytest.raises(SettingsError, match="FEDMQ_VERSIONS"):
        parse(["aggregator"], {"FEDMQ_VERSIONS": "ten"})
    with pytest.raises(SettingsError, match="FEDMQ_DATASET"):
        parse(["aggregator"], {"FEDMQ_DATASET": "imagenet"})
    with pytest.raises(SettingsError, match="--client-fraction"):
        parse(["aggregator", "--client-fraction", "0"])


def test_every_setting_has_a_flag_in_help_with_its_variable(capsys):
    parser = build_parser()
    for command, groups in (("aggregator", ("broker", "data", "run")), ("worker", ("broker", "data", "worker")),
                            ("run", ("data", "run", "worker", "embedded"))):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        for group in groups:
            for field in GROUPS[group].__dataclass_fields__:
                assert "--" + field.replace("_", "-") in text and env_name(field) in text, (command, field)


def test_settings_are_frozen():
    settings = parse(["run"])
    with pytest.raises(Exception):
        settings.run.versions = 3  # type: ignore[misc]


def test_the_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for cls in GROUPS.values():
        for field in cls.__dataclass_fields__:
            assert f"`{env_name(field)}`" in readme and f"`--{field.replace('_', '-')}`" in readme, field


def test_log_level_defaults_to_warnings_for_the_embedded_mode_only():
    assert parse(["run"]).log_level == "WARNING"
    assert parse(["aggregator"]).log_level == "INFO"
    assert parse(["--log-level", "debug", "run"]).log_level == "DEBUG"
    assert parse(["run"], {"FEDMQ_LOG_LEVEL": "INFO"}).log_level == "INFO"


def test_each_service_takes_only_its_own_torch_threads():
    from fedmq_cli.__main__ import torch_threads

    environ = {"FEDMQ_THREADS": "1", "FEDMQ_EVAL_THREADS": "0"}  # one environment for every container
    assert torch_threads("aggregator", parse(["aggregator"], environ)) == 0
    assert torch_threads("worker", parse(["worker"], environ)) == 1
    assert torch_threads("aggregator", parse(["aggregator", "--eval-threads", "3"], environ)) == 3
    assert torch_threads("run", parse(["run"], {"FEDMQ_EVAL_THREADS": "2"})) == 2


def test_the_aggregators_default_run_id_is_fixed_so_a_restart_resumes_and_fedmq_run_is_a_new_run():
    from fedmq.settings import DEFAULT_RUN_ID
    from fedmq_cli.embedded import as_embedded

    first, second = parse(["aggregator"]), parse(["aggregator"])
    assert first.run.run_id == second.run.run_id == "" and DEFAULT_RUN_ID == "default"
    assert as_embedded(parse(["run"])).run.run_id.startswith("run-")
    assert as_embedded(parse(["run", "--run-id", "mine"])).run.run_id == "mine"


def test_default_partitions_give_scaled_workers_distinct_data():
    from aggregator.registry import WorkerRegistry

    run = parse(["aggregator"]).run
    assert run.partition_count == 10 and parse(["aggregator", "--start-workers", "16"]).run.partition_count == 16
    assert parse(["aggregator", "--num-partitions", "3"]).run.partition_count == 3
    # `docker compose up --scale worker=8` with the defaults: eight workers, eight partitions.
    registry = WorkerRegistry(run.partition_count, run.worker_timeout_s)
    assert sorted(registry.join(f"worker-{i}", -1, 0.0).partition for i in range(8)) == list(range(8))


def test_flags_are_matched_exactly_never_abbreviated(capsys):
    settings = parse(["aggregator", "--mode", "async", "--model", "fedavg-2nn"])
    assert (settings.run.mode, settings.run.model) == ("async", "fedavg-2nn")
    assert parse(["run", "--mode", "async"]).run.model == "fedavg-cnn"  # not taken as --model
    for argv in (["aggregator", "--mod", "fedavg-2nn"], ["worker", "--slow", "3"], ["--log", "INFO", "run"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err or "invalid choice" in err, err


def test_async_and_server_optimizer_settings_are_checked():
    settings = parse(["aggregator", "--mode", "async", "--buffer-size", "3", "--server-optimizer", "fedyogi"],
                     {"FEDMQ_STALENESS": "hinge", "FEDMQ_MAX_STALENESS": "4"})
    assert (settings.run.buffer_size, settings.run.server_optimizer, settings.run.staleness,
            settings.run.max_staleness) == (3, "fedyogi", "hinge", 4)
    assert parse(["worker", "--slowdown", "3"]).worker.slowdown == 3.0
    for argv in (["aggregator", "--buffer-size", "0"], ["aggregator", "--server-beta2", "1"],
                 ["worker", "--slowdown", "0.5"], ["aggregator", "--max-staleness", "-1"]):
        with pytest.raises(SettingsError, match=argv[1]):
            parse(argv)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["aggregator", "--mode", "later"])
