"""What recording per-example loss tables costs during training, measured side by side.

    python benchmarks/training.py              # digits MLP, 30 epochs, T = 20 checkpoints, 5 repeats
    python benchmarks/training.py --repeats 9 --model cnn

Both variants write the same T safetensors checkpoints; "with" also evaluates every train and
test example at each checkpoint (one no_grad pass each) and writes both loss tables. Repeats
alternate between the variants so drifting machine load hits both alike; the target is a ratio
of medians of at most 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from z0inf_pipeline.training import TrainConfig, train

TARGET_RATIO = 1.5


def timed(config: TrainConfig, out: Path, record_losses: bool) -> float:
    start = time.perf_counter()
    train(config, out, record_losses=record_losses)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--model", default="mlp", choices=["logreg", "mlp", "cnn"])
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args()
    config = TrainConfig(dataset=args.dataset, model=args.model, epochs=args.epochs, checkpoints=args.checkpoints)

    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        timed(config, Path(tmp) / "warmup", True)  # imports, first-call allocations
        for _ in range(args.repeats):
            for record in (False, True):
                times[record].append(timed(config, Path(tmp) / f"run-{record}", record))

    without, with_tables = statistics.median(times[False]), statistics.median(times[True])
    ratio = with_tables / without
    print(f"{args.dataset} {args.model}, {args.epochs} epochs, T = {args.checkpoints} checkpoints, "
          f"median of {args.repeats} repeats")
    print(f"  training without loss tables: {without:8.3f} s")
    print(f"  training with loss tables:    {with_tables:8.3f} s")
    print(f"  ratio (with / without):       {ratio:8.2f}x   target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
