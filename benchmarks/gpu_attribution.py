"""Train-test attribution on a GPU: LDS, wall time and peak GPU memory of random directions (forward passes
only), TracInCP (exact per-example gradients, ``influence.tracin``) and trajectory-only Z0, side by side, on
three cases of the accuracy suite: digits CNN and both tiny GPT-2 fine-tuning cases.

    python benchmarks/gpu_attribution.py --device cuda --out DIR     # on a GPU machine (about 5 minutes)
    python benchmarks/gpu_attribution.py --device cpu --tiny          # smoke test: tiny sizes, a few seconds

Training and the held-out refits of LDS run on the CPU (as in ``accuracy.py``, same recipes and seeds);
only the attributions run on ``--device``. Needs none of the ``bench`` extra (no captum: TracInCP here is
exact per-example gradients, the same quantity captum's TracInCP computes). Results: a table on stdout and
``gpu_attribution.json`` in ``--out``, written after every case.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import CASES, DEFAULT_TRAIN_TEST, forward_access, windowed, z0_inputs  # noqa: E402
from lm_cases import LM_CASES, LMCase, train_lm_case  # noqa: E402

from z0inf_pipeline.evaluation import linear_datamodeling_score, subsample_and_retrain  # noqa: E402
from z0inf_pipeline.influence import open_checkpoints, train_test_influence, warmup_window  # noqa: E402
from z0inf_pipeline.influence.directions import (  # noqa: E402
    ForwardAccess,
    direction_checkpoint_positions,
    direction_features,
)
from z0inf_pipeline.influence.tracin import tracincp_features  # noqa: E402
from z0inf_pipeline.training import build_model, train  # noqa: E402


def measured(device: torch.device, compute):
    """(result, wall seconds, peak GPU MiB or None on a CPU) of ``compute()``, synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = compute()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return result, seconds, peak


def attributions(access: ForwardAccess, checkpoints, steps, train_losses, test_losses, names, device, directions):
    """Every method's (N, M) scores with its cost: trajectory Z0 at the train-test defaults, random
    directions at the defaults (one and eight directions per batched pass), TracInCP."""
    tt = DEFAULT_TRAIN_TEST
    window = warmup_window(steps, tt.warmup_fraction)
    keep = torch.from_numpy(window)
    positions = direction_checkpoint_positions(window, tt.direction_checkpoints)
    learning_rates = torch.tensor([c.learning_rate for c in checkpoints], dtype=torch.float64)
    from z0inf_pipeline.influence import gram_matrix

    def trajectory():
        gram = gram_matrix([checkpoints[p] for p in window], parameters=names, device=device)
        return train_test_influence(gram, train_losses[keep].to(device), test_losses[keep].to(device),
                                    min(tt.neighbors, len(window) - 1), neighbor_rule=tt.neighbor_rule)

    def random_directions(per_pass: int):
        def run():
            a, b = direction_features(replace(access, directions_per_pass=per_pass), [checkpoints[p] for p in positions],
                                      names, None, directions=directions, step_size=tt.step_size, seed=tt.seed,
                                      device=device)
            return a.to(device) @ b.to(device).T
        return run

    def tracincp():
        a, b = tracincp_features(access, checkpoints, names, learning_rates, device=device)
        return a.double() @ b.double().T  # (N, M) scores times the identity

    methods = {"Z0 trajectory (train-test defaults)": trajectory,
               f"directions P={directions} C={tt.direction_checkpoints}, 1 per pass": random_directions(1),
               f"directions P={directions} C={tt.direction_checkpoints}, 8 per pass": random_directions(8),
               "TracInCP (exact per-example gradients)": tracincp}
    for name, compute in methods.items():
        scores, seconds, mib = measured(device, compute)
        yield name, scores.double().cpu().numpy(), seconds, mib


def classifier_case(case, work: Path, holdout_models: int, device, directions):
    run = train(case.config, work / "run")
    holdout = subsample_and_retrain(run, holdout_models, work / "retrain", seed=1)
    z0 = z0_inputs(run)
    names = [n for n, _ in build_model(run.model_spec).named_parameters()]
    lds = lambda scores: linear_datamodeling_score(scores, holdout.masks, holdout.test_losses).mean  # noqa: E731
    yield from ((name, lds(s), sec, mib) for name, s, sec, mib in attributions(
        forward_access(run), open_checkpoints(run.checkpoints), z0.steps, z0.train, z0.test, names, device, directions))


def lm_case(case: LMCase, work: Path, holdout_models: int, device, directions):
    from lm_cases import TokenLM

    run = train_lm_case(case, work, holdout_models)
    print(f"  {case.name}: held-out answer accuracy {run.test_accuracy:.3f}", flush=True)
    names = [n for n, _ in TokenLM(case.recipe).named_parameters()]
    lds = lambda scores: linear_datamodeling_score(scores, run.holdout_masks, run.holdout_test_losses).mean  # noqa: E731
    steps = [c.step for c in run.checkpoints]
    yield from ((name, lds(s), sec, mib) for name, s, sec, mib in attributions(
        run.access(), run.checkpoints, steps, run.train_losses, run.test_losses, names, device, directions))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gpu_attribution")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of the script on a CPU")
    parser.add_argument("--holdout-models", type=int, default=20, help="held-out refits of LDS (the suite's 20)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    directions = 16 if args.tiny else DEFAULT_TRAIN_TEST.directions
    holdout = 3 if args.tiny else args.holdout_models
    lms = list(LM_CASES)
    cnn = next(c for c in CASES if c.config.model == "cnn")
    if args.tiny:
        small = dict(n_train=24, n_probe=8, epochs=1, checkpoints=3, pretrain_steps=5)
        lms = [replace(lms[0], recipe=replace(lms[0].recipe, **small))]
        cnn = replace(cnn, config=replace(cnn.config, epochs=1, checkpoints=3))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "holdout_models": holdout, "directions": directions}
    print(json.dumps(info), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-attribution.") as tmp:
        for index, case in enumerate([*lms, cnn]):
            work = Path(tmp) / f"case-{index}"
            start = time.perf_counter()
            measure = lm_case if isinstance(case, LMCase) else classifier_case
            for method, lds, seconds, mib in measure(case, work, holdout, device, directions):
                rows.append({"case": case.name, "method": method, "lds": lds, "seconds": seconds, "gpu_mib": mib})
                shown = "-" if mib is None else f"{mib:.1f}"
                print(f"  {case.name} | {method} | LDS {lds:.3f} | {seconds:.2f} s | {shown} MiB", flush=True)
            print(f"== {case.name}: {time.perf_counter() - start:.0f} s (training and refits included)", flush=True)
            (args.out / "gpu_attribution.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print("\n| case | method | LDS | wall s | peak GPU MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['method']} | {r['lds']:.3f} | {r['seconds']:.2f} | "
              f"{'-' if r['gpu_mib'] is None else format(r['gpu_mib'], '.1f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
