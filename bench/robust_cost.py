"""What robust aggregation costs per version, as a ratio to FedAvg's streaming fold.

For N updates of the FedAvg CNN (1.66M parameters): the time to fold N updates into the running
weighted sum and take the mean (FedAvg, O(P) memory), against stacking them into the [P, N]
matrix and taking the coordinate-wise median, the trimmed mean and Krum (O(N*P) memory). Both
sides are measured in the same run; the printed ratios are what matters.

    python bench/robust_cost.py [--updates 10 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from aggregator.fedavg import RunningSum
from aggregator.robust_rules import UpdateMatrix, coordinate_median, krum, trimmed_mean
from fedmq.task import build_model


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    template = {k: v.detach().clone() for k, v in build_model("fedavg-cnn", seed=0).state_dict().items()}
    params = sum(t.numel() for t in template.values())
    print(f"fedavg-cnn: {params:,} parameters, torch threads {torch.get_num_threads()}")
    print(f"{'N':>4} {'fedavg fold s':>14} {'median':>10} {'trimmed':>10} {'krum':>10}   (ratios to the fold; "
          f"matrix MB)")
    for n in args.updates:
        generator = torch.Generator().manual_seed(n)
        updates = [{k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in template.items()} for _ in range(n)]

        def fold():
            running = RunningSum(template)
            for u in updates:
                running.fold(u, 600.0)
            running.mean()

        def stacked(rule):
            def run():
                matrix = UpdateMatrix(template, n)
                for u in updates:
                    matrix.add(u)
                matrix.unflatten(rule(matrix.matrix))
            return run

        base = best_of(args.repeats, fold)
        med = best_of(args.repeats, stacked(coordinate_median))
        trim = best_of(args.repeats, stacked(lambda m: trimmed_mean(m, 0.1)))
        kr = best_of(args.repeats, stacked(lambda m: krum(m, max(0, (n - 3) // 4))[0]))
        print(f"{n:>4} {base:>14.3f} {med / base:>10.2f} {trim / base:>10.2f} {kr / base:>10.2f}   "
              f"({4 * params * n / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
