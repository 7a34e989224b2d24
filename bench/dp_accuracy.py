"""Accuracy against epsilon for DP-FedAvg on MNIST with the CNN, next to the non-private run.

Each configuration is a whole fedmq federation in this process (``fedmq run``'s embedded mode:
the real aggregator and workers over the in-memory broker, which still encodes every message):
the aggregator clips, adds the noise Z*C/m and accounts epsilon itself; this script only reads
its version records. For every worker count (10: every worker in every version; 100: client
fraction 0.1, so 10 updates per version too) it runs the non-private FedAvg run (no clipping, no
noise), then DP-FedAvg at each noise multiplier Z with the same seeds, partitions and clipping
norm, and prints the test accuracy of the last version and the epsilon at --delta that the
aggregator's accountant (Opacus RDP) reported for it.

    python bench/dp_accuracy.py                                   # the defaults below
    python bench/dp_accuracy.py --workers 10 --noise 0.1 1.0 --versions 2 --local-steps 10

The CNN on two shared CPU cores is slow: ``--local-steps`` caps each worker's local training
(0: one epoch of its partition) and ``--versions`` the versions; the printout says what ran.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from fedmq.settings import DataSettings, EmbeddedSettings, RunSettings, Settings, WorkerSettings
from fedmq_cli.embedded import run_embedded


def run_one(args, workers: int, noise: float, work: Path) -> dict:
    fraction = 1.0 if workers <= 10 else 10 / workers
    private = noise > 0
    run = RunSettings(run_id=f"dp-{workers}-{noise:g}", model=args.model, dataset="mnist", versions=args.versions,
                      num_partitions=workers, start_workers=workers, client_fraction=fraction,
                      local_steps=args.local_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      clip_norm=args.clip_norm if private or args.clip_baseline else 0.0,
                      dp_noise_multiplier=noise, dp_delta=args.delta, output_dir=str(work), seed=args.seed,
                      worker_timeout_s=600.0, round_timeout_s=args.round_timeout_s)
    settings = Settings(data=DataSettings(data_root=args.data_root, data_mirror=args.data_mirror, download=False),
                        run=run, worker=WorkerSettings(heartbeat_interval_s=5.0),
                        embedded=EmbeddedSettings(workers=workers))
    started = time.perf_counter()
    result = run_embedded(settings)
    seconds = time.perf_counter() - started
    last = result.records[-1]
    return {"workers": workers, "q": fraction, "z": noise, "accuracy": last.test_accuracy,
            "best": max(r.test_accuracy for r in result.records), "epsilon": last.dp_epsilon,
            "noise_std": last.dp_noise_std, "clipped": sum(r.clipped_updates for r in result.records),
            "updates": sum(r.participants for r in result.records), "seconds": seconds,
            "dead": sum(r.dead_lettered for r in result.records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.03, 0.1, 1.0],
                        help="noise multipliers Z of the private runs (the non-private run always comes first)")
    parser.add_argument("--versions", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20, help="local SGD steps per version (0: one epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--clip-baseline", action="store_true", help="clip the non-private run too")
    parser.add_argument("--skip-baseline", action="store_true", help="run the private configurations only")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--round-timeout-s", type=float, default=180.0,
                        help="a version still short of updates closes then (a worker whose training diverged on a "
                             "noisy model sends a non-finite update, which is dead-lettered)")
    parser.add_argument("--model", default="fedavg-cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=".cache/bench-data")
    parser.add_argument("--data-mirror", default="../shared/data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"DP-FedAvg on MNIST, {args.model}, {args.versions} versions, {args.local_steps or 'one epoch of'} local "
          f"steps of B={args.batch_size}, lr {args.learning_rate}, clip norm {args.clip_norm}, delta {args.delta}")
    print(f"{'workers':>7} {'q':>5} {'Z':>6} {'noise std':>10} {'epsilon':>12} {'accuracy':>9} {'best':>7} "
          f"{'clipped':>9} {'dead':>5} {'seconds':>8}")
    with tempfile.TemporaryDirectory(prefix="fedmq-dp-") as work:
        for workers in args.workers:
            for noise in ([] if args.skip_baseline else [0.0]) + args.noise:
                row = run_one(args, workers, noise, Path(work))
                epsilon = "inf (no DP)" if row["epsilon"] is None else f"{row['epsilon']:.4g}"
                std = "-" if row["noise_std"] is None else f"{row['noise_std']:.2e}"
                print(f"{row['workers']:>7} {row['q']:>5.2f} {row['z']:>6g} {std:>10} {epsilon:>12} "
                      f"{row['accuracy']:>9.4f} {row['best']:>7.4f} {row['clipped']:>4}/{row['updates']:<4} "
                      f"{row['dead']:>5} {row['seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
