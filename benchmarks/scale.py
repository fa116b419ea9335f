"""What the pipeline costs at the sizes teams have: contract runs at N = 10^4 and 10^5 training examples.

    nice -n 10 python benchmarks/scale.py            # full sizes (about 15 minutes on 2 cores)
    python benchmarks/scale.py --quick               # N = 10^3 / 10^4, D = 10^6: a smoke run
    python benchmarks/scale.py --only topk gram      # some sections

Sections, each figure printed next to its limit:

- ``pipeline``: synthetic contract runs (M = N/10 probe examples, T = 20 checkpoints of D float32
  weights, losses as real parquet files) logged to a SQLite MLflow store, then ``influence_job``
  in a fresh process (its own peak RSS): wall time per asset and per data check;
- ``checks``: each GX data check of ``influence_job`` and the flagging expectation beside the asset
  computation it checks, on synthetic tables in fresh processes (medians), and the fixed cost per process;
- ``topk``: train-test top-k at N = 10^6, M = 10^5, k = 10 against a bare GEMM of the same shape;
- ``loss``: loss tables recorded from a DataLoader against a bare ``no_grad`` loop over the same loader;
- ``gram``: the streaming Gram against a cold read of the same files and a bare in-memory float64 product.
- ``csv``: CSV training alone at a tenth of ``--rows`` and at ``--rows`` (peak RSS growth, bytes per row);
- ``scaleout``: a ``--rows`` (10^6) CSV trained (peak RSS growth against one batch + model), then
  ``influence_job`` recomputing its loss tables in shards (and, with ``--method directions``, the
  random-direction projections) on celery workers over Redis: one worker on every core, one on one
  core, two on one core each (wall time, each kind of sharded step's span and speed-up, peak RSS per
  process); not part of the full run's 15 minutes (``--method directions`` at 10^6: about 30 minutes).

Timings on a shared machine swing with its load: read the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimators import evict_page_cache, median_seconds, peak_rss_bytes  # noqa: E402

from z0inf_pipeline.influence import gram_matrix, save_checkpoint, train_test_topk  # noqa: E402
from z0inf_pipeline.influence.estimators import influence_features  # noqa: E402
from z0inf_pipeline.influence.loss_tables import LossTable  # noqa: E402
from z0inf_pipeline.training import layout  # noqa: E402
from z0inf_pipeline.training.recording import BatchLossRecorder  # noqa: E402

GB = 2**30
T = 20
CHECKS = ("loss_tables_are_valid", "gram_is_valid", "self_influence_is_valid", "train_test_influence_is_valid")


def limit(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---------------------------------------------------------------- synthetic runs and influence_job


def write_run_folder(folder: Path, n_train: int, n_test: int, dim: int, seed: int) -> list[dict]:
    """A contract run folder: T checkpoints of ``dim`` float32 weights drifting like training, loss tables
    that fall over the steps, an examples table; returns the metric rows a producer logs."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(dim, generator=gen)
    steps = [t * 50 for t in range(T)]
    for step in steps:
        state = {"body.weight": weights[: dim // 2].reshape(-1, 100), "head.weight": weights[dim // 2 :]}
        save_checkpoint(folder / layout.checkpoint_name(step), state, step=step, learning_rate=0.1)
        weights = weights + 0.01 * torch.randn(dim, generator=gen)
    rows = []
    tables = {}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, n_train)):
        decay = torch.linspace(1.0, 0.2, T)[:, None]
        values = (decay * torch.rand(1, n, generator=gen) * 3 + 0.05 * torch.rand(T, n, generator=gen)).float()
        table = LossTable(np.arange(offset, offset + n, dtype=np.int64), tuple(steps), values)
        table.write(folder / (layout.TRAIN_LOSSES if split == "train" else layout.TEST_LOSSES))
        tables[split] = values.double().mean(dim=1)
    labels = np.random.default_rng(seed).integers(0, 10, n_train + n_test)
    layout.write_examples(folder / layout.EXAMPLES, train_ids=np.arange(n_train), train_labels=labels[:n_train],
                          original_train_labels=labels[:n_train], flipped_ids=np.array([], dtype=np.int64),
                          test_ids=np.arange(n_train, n_train + n_test), test_labels=labels[n_train:])
    layout.write_json(folder / layout.MODEL_SPEC, {"factory": "torch.nn:Identity", "kwargs": {}})
    layout.write_manifest(folder)
    for t, step in enumerate(steps):
        rows.append({"step": step, "train_loss": float(tables["train"][t]), "test_loss": float(tables["test"][t])})
    return rows


def log_synthetic_run(tracking_uri: str, n_train: int, dim: int, work: Path) -> str:
    from z0inf_pipeline.tracking.client import tracking_client
    from z0inf_pipeline.tracking.contract import SOURCE_TAG
    from z0inf_pipeline.tracking.logger import RunWriter

    folder = work / f"run-{n_train}"
    rows = write_run_folder(folder, n_train, n_train // 10, dim, seed=n_train)
    writer = RunWriter(tracking_client(tracking_uri), "scale", run_name=f"synthetic-N{n_train}",
                        tags={SOURCE_TAG: "benchmarks/scale.py"}, parent_run_id=None)
    writer.log_params({"n_train": n_train, "n_test": n_train // 10})
    for row in rows:
        writer.log_row(row)
    writer.finish(folder, None)  # a synthetic run has no model to register
    return writer.run_id


def influence_child(run_id: str) -> None:
    """In a fresh process: influence_job on the run; prints per-step seconds and this process's peak RSS."""
    from z0inf_pipeline.cli.jobs import dagster_instance, run_job

    instance, _ = dagster_instance()
    start = time.perf_counter()
    outcome = run_job(instance, "influence_job", run_id)
    print(json.dumps({"success": outcome.success, "seconds": time.perf_counter() - start,
                      "steps": outcome.step_seconds, "failures": outcome.failures, "peak_rss": peak_rss_bytes()}))


def section_pipeline(args) -> None:
    sizes = (1_000, 10_000) if args.quick else (10_000, 100_000)
    dim = 1_000_000 if args.quick else 10_000_000
    print(f"\n## influence_job on synthetic contract runs: T = {T}, D = {dim:,} float32, M = N/10")
    results = {}
    with tempfile.TemporaryDirectory(prefix="z0inf-scale-") as tmp:
        work = Path(tmp)
        # the synthetic runs name torch.nn:Identity as their factory (never called: logged tables are used)
        env = {**os.environ, "DAGSTER_HOME": str(work / "dagster"), "Z0INF_DATA_DIR": str(work / "data"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "Z0INF_TRUSTED_FACTORIES": "torch.nn"}
        (work / "dagster").mkdir()
        (work / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        for n in sizes:
            start = time.perf_counter()
            run_id = log_synthetic_run(env["MLFLOW_TRACKING_URI"], n, dim, work)
            print(f"N = {n:,}: run {run_id} generated and logged in {time.perf_counter() - start:.0f} s")
            out = subprocess.run([sys.executable, __file__, "--influence-child", run_id], env=env,
                                 capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:])
                raise SystemExit(f"influence_job child failed for N = {n}")
            results[n] = json.loads(lines[-1])
            if not results[n]["success"]:
                print("\n".join(results[n]["failures"]))
    for n, r in results.items():
        assets = {k: v for k, v in r["steps"].items() if not any(k.endswith(c) for c in CHECKS)}
        checks = {k: v for k, v in r["steps"].items() if k not in assets}
        checked_assets = sum(v for k, v in assets.items()  # the loss tables are built in shard steps
                             if k.split(".")[0] in ("loss_tables", "weight_gram", "self_influence", "train_test_influence"))
        print(f"\nN = {n:,}, M = {n // 10:,}: influence_job {r['seconds']:.1f} s "
              f"({'succeeded' if r['success'] else 'FAILED'}), peak RSS {r['peak_rss'] / GB:.2f} GB")
        for key, seconds in r["steps"].items():
            print(f"  {seconds:7.2f} s  {key}")
        print(f"  data checks {sum(checks.values()):.1f} s vs the assets they check {checked_assets:.1f} s "
              f"(ratio {sum(checks.values()) / checked_assets:.2f}, limit <= 1: {limit(sum(checks.values()) <= checked_assets)})")
        if n == 100_000:
            print(f"  limits at N = 10^5, D = 10^7: time {r['seconds']:.0f} s <= 300 s: {limit(r['seconds'] <= 300)}; "
                  f"peak RSS {r['peak_rss'] / GB:.2f} GB <= 3 GB: {limit(r['peak_rss'] <= 3 * GB)}")
    small, large = sizes
    ratio_n = large / small
    print(f"\ngrowth from N = {small:,} to N = {large:,} (N ratio {ratio_n:.0f}; limit for stages linear in N: "
          f"time ratio at most {1.3 * ratio_n:.0f}, i.e. N ratio + 30%; a ratio far below it means fixed costs "
          "(process, MLflow, Dagster step) still dominate at these sizes)")
    for key in results[small]["steps"]:
        a, b = results[small]["steps"][key], results[large]["steps"].get(key, float("nan"))
        kind = ("independent of N (D fixed)" if key.startswith("weight_gram") else
                "N x M = N^2/10" if key.startswith("train_test_influence") else "linear in N")
        verdict = limit(b / a <= 1.3 * ratio_n) if kind == "linear in N" else "-"
        print(f"  {key:<60} {a:7.2f} s -> {b:7.2f} s  ratio {b / a:6.1f}  ({kind}) {verdict}")


# ---------------------------------------------------------------- the GX data checks beside what they check


def checks_child(n: int, repeats: int) -> None:
    """In a fresh process, on a synthetic run of N training examples (M = N/10, T = 20): each GX data check
    beside the asset computation it checks (medians of ``repeats``; a check's first call is left out of its
    median); prints JSON. The
    fixed cost of the checks in a process is importing GX plus the first validation's extra time over a
    later one (what every Dagster step process that runs a check pays once)."""
    from z0inf_pipeline.influence.analysis import InfluenceAnalysis
    from z0inf_pipeline.influence.loss_tables import read_loss_table
    from z0inf_pipeline.review.policy import FlagPolicy, flag_scores

    with tempfile.TemporaryDirectory(prefix="z0inf-checks-") as tmp:
        folder = Path(tmp)
        write_run_folder(folder, n, n // 10, 10_000, seed=n)
        checkpoints = sorted((folder / layout.CHECKPOINT_DIR).glob("*.safetensors"))
        train_path, test_path = folder / layout.TRAIN_LOSSES, folder / layout.TEST_LOSSES
        gram = gram_matrix(checkpoints)
        analysis = InfluenceAnalysis(checkpoints, train_path, test_path, gram=gram)
        start, cpu = time.perf_counter(), time.process_time()
        import great_expectations  # noqa: F401  (the import the first check of a process pays)

        gx_import, gx_import_cpu = time.perf_counter() - start, time.process_time() - cpu
        from z0inf_pipeline.quality import validate_flagging, validate_loss_table, validate_self_influence, validate_topk

        scores = None  # the self_influence asset's output, set below before the flagging count reads it
        train_frame, test_frame = pd.read_parquet(train_path), pd.read_parquet(test_path)
        labels = np.arange(n) % 10
        assets = {  # check -> the asset computation it checks
            "loss_tables_are_valid": lambda: (read_loss_table(train_path), read_loss_table(test_path)),
            "self_influence_is_valid": analysis.self_influence_frame,
            "train_test_influence_is_valid": analysis.topk_frame,
            "flagging (review_queue)": lambda: flag_scores(scores, FlagPolicy(), labels=labels,
                                                           loss_tables=(train_frame, test_frame)),
        }
        asset_seconds, outputs = {}, {}
        for name, asset in assets.items():  # timed once here (its output feeds the check), then repeats - 1 more
            start = time.perf_counter()
            outputs[name] = asset()
            asset_seconds[name] = [time.perf_counter() - start]
            if name == "self_influence_is_valid":
                scores = outputs[name]
        train, test = outputs["loss_tables_are_valid"]
        topk, flags = outputs["train_test_influence_is_valid"], outputs["flagging (review_queue)"]
        gx = folder / "gx"
        checks = {
            "loss_tables_are_valid": lambda: validate_loss_table(train_frame, train.steps, n,
                                                                 expected_ids=train.example_ids, folder=gx),
            "self_influence_is_valid": lambda: validate_self_influence(scores, train.example_ids, folder=gx),
            "train_test_influence_is_valid": lambda: validate_topk(topk, train.example_ids, test.example_ids, 10,
                                                                   folder=gx),
            "flagging (review_queue)": lambda: validate_flagging(scores["example_id"], flags.score, flags.cutoff, 0.0,
                                                                 folder=gx),
        }
        results, first, first_cpu = {}, None, None
        for name, check in checks.items():
            start, cpu = time.perf_counter(), time.process_time()
            check()
            once, once_cpu = time.perf_counter() - start, time.process_time() - cpu
            if first is None:  # the first validation of the process against a later one, in wall and CPU time
                cpu = time.process_time()
                check()
                first_cpu = once_cpu - (time.process_time() - cpu)
            check_median = median_seconds(check, repeats, warmup=0)
            first = first if first is not None else once - check_median
            for _ in range(repeats - 1):
                start = time.perf_counter()
                assets[name]()
                asset_seconds[name].append(time.perf_counter() - start)
            results[name] = {"check": check_median, "asset": statistics.median(asset_seconds[name])}
    print(json.dumps({"gx_import": gx_import, "first_extra": first, "gx_import_cpu": gx_import_cpu,
                      "first_extra_cpu": first_cpu, "results": results}))


def section_checks(args) -> None:
    sizes = args.sizes or ((1_000, 10_000) if args.quick else (10_000, 100_000))
    runs, repeats = (1, 1) if args.quick else (3, 3)
    print(f"\n## GX data checks beside the computations they check, T = {T}, M = N/10, {runs} fresh processes "
          f"per size, each check and asset the median of {repeats} in each (medians over processes below)")
    for n in sizes:
        outs = []
        for _ in range(runs):
            out = subprocess.run([sys.executable, __file__, "--checks-child", str(n), str(repeats)],
                                 capture_output=True, text=True, check=True)
            outs.append(json.loads(out.stdout.splitlines()[-1]))
        fixed = [o["gx_import"] + o["first_extra"] for o in outs]
        print(f"\nN = {n:,}: fixed cost per process {statistics.median(fixed):.2f} s (import GX "
              f"{statistics.median(o['gx_import'] for o in outs):.2f} s + first validation's extra "
              f"{statistics.median(o['first_extra'] for o in outs):.2f} s)"
              + (f", limit <= 5 s: {limit(statistics.median(fixed) <= 5)}" if n == 10_000 else ""))
        fixed_cpu = [o["gx_import_cpu"] + o["first_extra_cpu"] for o in outs]
        print(f"  in CPU time (what it costs on an idle core, unlike wall time under load): "
              f"{statistics.median(fixed_cpu):.2f} s (import {statistics.median(o['gx_import_cpu'] for o in outs):.2f} s)"
              + (f", limit <= 5 s: {limit(statistics.median(fixed_cpu) <= 5)}" if n == 10_000 else ""))
        total_check = total_asset = 0.0
        for name in outs[0]["results"]:
            check = statistics.median(o["results"][name]["check"] for o in outs)
            asset = statistics.median(o["results"][name]["asset"] for o in outs)
            total_check, total_asset = total_check + check, total_asset + asset
            print(f"  {name:<32} check {check:6.2f} s | asset {asset:6.2f} s | ratio {check / asset:6.2f}")
        verdict = f", limit <= 1 at N = 10^5: {limit(total_check <= total_asset)}" if n == 100_000 else ""
        print(f"  {'all four':<32} check {total_check:6.2f} s | asset {total_asset:6.2f} s | "
              f"ratio {total_check / total_asset:6.2f}{verdict}")


# ---------------------------------------------------------------- top-k vs a bare GEMM


def topk_child(n: int, m: int, m_timed: int) -> None:
    gen = torch.Generator().manual_seed(5)
    weights = torch.randn(T, 64, generator=gen, dtype=torch.float64).cumsum(0)
    gram = weights @ weights.T
    train = (torch.rand(T, n, generator=gen) * torch.linspace(2, 0.2, T)[:, None]).float()
    test = (torch.rand(T, m_timed, generator=gen) * torch.linspace(2, 0.2, T)[:, None]).float()
    base = peak_rss_bytes()
    start = time.perf_counter()
    train_test_topk(gram, train, test, k=10)
    t_topk = time.perf_counter() - start
    peak_topk = peak_rss_bytes()
    features = influence_features(gram, train, test, 2, None, "order")
    a, b = features.train, features.test
    block = max(1, (1 << 26) // n)
    start = time.perf_counter()
    for s in range(0, m_timed, block):
        torch.mm(b[s : s + block], a.T)  # the same products, blocks and layout; nothing selected
    t_gemm = time.perf_counter() - start
    print(json.dumps({"topk": t_topk, "gemm": t_gemm, "base": base, "peak": peak_topk}))


def section_topk(args) -> None:
    n, m = (100_000, 10_000) if args.quick else (1_000_000, 100_000)
    m_timed = m if args.quick else 10_000
    print(f"\n## train-test top-k, N = {n:,}, M = {m:,}, k = 10, T = {T} (k = 2 neighbours: {2 * T} features)")
    out = subprocess.run([sys.executable, __file__, "--topk-child", str(n), str(m), str(m_timed)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.splitlines()[-1])
    scale = m / m_timed
    note = "" if scale == 1 else f" ({m_timed:,} test examples timed, x{scale:.0f}: blocks are independent, cost is linear in M)"
    print(f"top-k {r['topk'] * scale:.1f} s vs bare GEMM of the same shape {r['gemm'] * scale:.1f} s{note}: "
          f"ratio {r['topk'] / r['gemm']:.2f}x, limit <= 2x: {limit(r['topk'] <= 2 * r['gemm'])}")
    print(f"peak RSS {r['peak'] / GB:.2f} GB (interpreter + torch {r['base'] / GB:.2f} GB), limit <= 2 GB: "
          f"{limit(r['peak'] <= 2 * GB)}")


# ---------------------------------------------------------------- loss tables from a DataLoader


class GeneratedItems(Dataset):
    """Examples generated item by item (nothing precomputed), as a Dataset that reads files would serve them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"example_id": i, "x": torch.randn(64, generator=g), "y": i % 10}


def section_loss(args) -> None:
    n = 5_000 if args.quick else 100_000  # a pass of about a second: shorter ones swing with the load
    print(f"\n## loss tables from a DataLoader vs a bare no_grad loop over the same loader, N = {n:,}, 3-layer MLP")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    loader = DataLoader(GeneratedItems(n), batch_size=512)
    cross_entropy = nn.CrossEntropyLoss(reduction="none")

    def loss_fn(net, batch):
        return cross_entropy(net(batch["x"]), batch["y"])

    def bare():
        with torch.no_grad():
            return torch.cat([loss_fn(model, batch) for batch in loader])

    recorder = BatchLossRecorder(loader, loss_fn, capacity=64, name="train")
    step = iter(range(10**6))

    def ours():
        recorder.record(model, next(step))

    t_bare, t_ours = [], []
    for _ in range(7):  # interleaved, so load swings hit both alike
        t_bare.append(median_seconds(bare, repeats=1, warmup=0))
        t_ours.append(median_seconds(ours, repeats=1, warmup=0))
    tb, to = statistics.median(t_bare), statistics.median(t_ours)
    print(f"one pass: bare loop {tb:.2f} s | BatchLossRecorder {to:.2f} s (ratio {to / tb:.2f}x, limit <= 1.25x: "
          f"{limit(to <= 1.25 * tb)})")


# ---------------------------------------------------------------- streaming Gram vs its two limits


def gram_child(kind: str, folder: str) -> None:
    paths = sorted(Path(folder).glob("*.safetensors"))
    start = time.perf_counter()
    if kind == "gram":
        gram_matrix(paths)
    elif kind == "read":
        buffer = bytearray(64 << 20)
        for path in paths:
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
    else:  # the bare in-memory float64 product of the same values (loading not timed)
        from safetensors.torch import load_file

        w = torch.stack([torch.cat([t.reshape(-1) for t in load_file(str(p)).values()]).double() for p in paths])
        w -= w[0].clone()
        start = time.perf_counter()
        w @ w.T
    print(time.perf_counter() - start)


def section_gram(args) -> None:
    dim = 2_500_000 if args.quick else 10_000_000
    print(f"\n## streaming Gram vs max(cold read, bare in-memory float64 product), T = {T}, D = {dim:,} float32")
    with tempfile.TemporaryDirectory() as folder:
        gen = torch.Generator().manual_seed(3)
        w = torch.randn(dim, generator=gen)
        for t in range(T):
            save_checkpoint(Path(folder) / f"c{t:03d}.safetensors",
                            {"a": w[: dim // 2].reshape(-1, 100), "b": w[dim // 2 :]}, step=t)
            w = w + 0.01 * torch.randn(dim, generator=gen)
        os.sync()

        def child(kind: str, cold: bool) -> float:
            if cold:
                evict_page_cache(folder)
            out = subprocess.run([sys.executable, __file__, "--gram-child", kind, folder],
                                 capture_output=True, text=True, check=True)
            return float(out.stdout.split()[-1])

        for cold in (True, False):
            child("read", False)
            reads = [child("read", cold) for _ in range(3)]
            grams = [child("gram", cold) for _ in range(3)]
            product = [child("product", False) for _ in range(3)]
            t_read, t_gram, t_product = (statistics.median(x) for x in (reads, grams, product))
            bound = max(t_read, t_product)
            label = "cold files" if cold else "files in the page cache"
            print(f"{label:>24}: Gram {t_gram:.2f} s | read {t_read:.2f} s | in-memory float64 product "
                  f"{t_product:.2f} s -> ratio {t_gram / bound:.2f}x of the larger, limit <= 1.5x: "
                  f"{limit(t_gram <= 1.5 * bound)}")


# ---------------------------------------------------------------- 10^6 rows: CSV training, celery workers

SCALEOUT_FEATURES, SCALEOUT_CLASSES = 20, 10
# a 3-layer MLP (20 -> 64 -> 64 -> 10); a small test split keeps the N x M top-k to minutes
SCALEOUT_CONFIG = {"model": "mlp", "hidden": (64, 64), "epochs": 1, "checkpoints": 5, "batch_size": 1024,
                   "test_fraction": 0.01}
SCALEOUT_SHARDS = 8
# Sharded steps, by the asset they belong to: loss tables always; projections along random directions
# with the train-test method ``directions`` (2 x 256 forward passes at 2 checkpoints per example, so
# at 10^6 rows they are hours of CPU: `--method directions` with `--rows 100000`).
# (workers, torch threads each): one worker with every core, then workers of one core each, as a GPU
# worker is one GPU: the scale-out the target is about (docs/deployment.md: workers sharing a machine
# split its cores). On 2 cores one worker already runs its forward passes on both.
WORKER_SETUPS = [(1, os.cpu_count() or 1), (1, 1), (2, 1)]
SHARD_STEPS = {"loss tables": "loss_tables.compute_loss_shard", "projections": "train_test_influence.compute_projection_shard"}


def write_classification_csv(path: Path, rows: int) -> None:
    """Gaussian class blobs in ``SCALEOUT_FEATURES`` dimensions, written by pyarrow a block at a time."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(SCALEOUT_CLASSES, SCALEOUT_FEATURES))
    with pacsv.CSVWriter(path, pa.schema([*(pa.field(f"x{j}", pa.float64()) for j in range(SCALEOUT_FEATURES)),
                                          pa.field("label", pa.int64())])) as writer:
        for start in range(0, rows, 100_000):
            labels = rng.integers(0, SCALEOUT_CLASSES, min(100_000, rows - start))
            x = centres[labels] + 1.5 * rng.normal(size=(len(labels), SCALEOUT_FEATURES))
            writer.write_table(pa.table({**{f"x{j}": x[:, j] for j in range(SCALEOUT_FEATURES)}, "label": labels}))


def train_child(csv: str) -> None:
    """In a fresh process: the CSV trained into a contract run; its id, seconds and peak RSS, and the
    size of one batch and of the model (weights, gradients, momentum) for the RSS limit. A small CSV is
    trained first, so imports MLflow and torch make on first use and the store's creation are in the
    baseline; then the peak is reset (``/proc/self/clear_refs``), so ``growth`` is what the big table costs."""
    from z0inf_pipeline.tracking import train_and_log
    from z0inf_pipeline.training.trainer import TrainConfig

    warm_up = Path(csv).with_name("warm-up.csv")
    write_classification_csv(warm_up, 20_000)
    train_and_log(TrainConfig(dataset=str(warm_up), **SCALEOUT_CONFIG), experiment="scale-warm-up")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = peak_rss_bytes()
    config = TrainConfig(dataset=csv, **SCALEOUT_CONFIG)
    start = time.perf_counter()
    run_id = train_and_log(config, experiment="scale")
    params = sum(p.numel() for p in build_mlp().parameters())
    print(json.dumps({"run_id": run_id, "seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
                      "baseline_rss": baseline, "batch_bytes": config.batch_size * (SCALEOUT_FEATURES + 1) * 4,
                      "model_bytes": 3 * params * 4}))


def build_mlp() -> nn.Module:
    from z0inf_pipeline.training.models import ModelSpec, build_model

    return build_model(ModelSpec("mlp", (SCALEOUT_FEATURES,), SCALEOUT_CLASSES, SCALEOUT_CONFIG["hidden"]))


def celery_child(run_id: str, shard_size: int, method: str) -> None:
    """In a fresh process: influence_job on the celery code location (workers already listening);
    prints seconds, the sharded steps' span and this process's peak RSS."""
    import dagster as dg
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    job = ReconstructableRepository.for_module(
        "z0inf_pipeline.deployments.celery", "defs", str(Path(__file__).resolve().parents[1])
    ).get_reconstructable_job("influence_job")
    run_config = {"ops": {"loss_tables": {"config": {"source": "recompute", "shard_size": shard_size}},
                          "train_test_influence": {"config": {"train_test": {"method": method}}}},
                  "resources": {"compute": {"config": {"batch_size": 8192}}}}
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("mlflow_runs", [run_id])
        start = time.perf_counter()
        result = dg.execute_job(job, instance, run_config=run_config, tags={"dagster/partition": run_id})
        seconds = time.perf_counter() - start
        stats = instance.get_run_step_stats(result.run_id)
    spans = {}
    for kind, prefix in SHARD_STEPS.items():
        shards = [s for s in stats if s.step_key.startswith(prefix)]
        if shards:
            spans[kind] = (len(shards), max(s.end_time for s in shards) - min(s.start_time for s in shards))
    print(json.dumps({
        "success": result.success, "seconds": seconds, "peak_rss": peak_rss_bytes(), "spans": spans,
        "steps": {s.step_key: (s.end_time or s.start_time) - s.start_time for s in stats if s.start_time},
    }))


def _redis(work: Path) -> tuple[subprocess.Popen, str]:
    """Debian's redis-server on a free port, nothing persisted; its URL once it answers."""
    import socket

    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    for _ in range(300):
        try:
            client.ping()
            return server, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            time.sleep(0.2)
    raise SystemExit("redis-server did not start")


def _peak_rss_of_group(leader: subprocess.Popen) -> dict[int, int]:
    """Peak RSS (VmHWM) of every process of a worker (its main process and its pool child)."""
    import psutil

    peaks = {}
    for process in [psutil.Process(leader.pid), *psutil.Process(leader.pid).children(recursive=True)]:
        status = Path(f"/proc/{process.pid}/status").read_text()
        peaks[process.pid] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
    return peaks


def _csv_training(work: Path, n: int, env: dict) -> dict:
    """An ``n``-row CSV written into ``work`` and trained in a fresh process (``train_child``); its figures
    printed beside the RSS limit, and returned."""
    csv = work / f"rows-{n}.csv"
    start = time.perf_counter()
    write_classification_csv(csv, n)
    print(f"CSV of {n:,} rows: {csv.stat().st_size / 2**20:.0f} MiB written in {time.perf_counter() - start:.0f} s")
    trained = _child_json([sys.executable, __file__, "--train-child", str(csv)], env)
    limit_bytes = 1.5 * (trained["batch_bytes"] + trained["model_bytes"])
    trained["growth"] = growth = trained["peak_rss"] - trained["baseline_rss"]
    features_bytes = n * SCALEOUT_FEATURES * 4
    print(f"CSV training, {n:,} rows: {trained['seconds']:.0f} s, peak RSS {trained['peak_rss'] / 2**20:.0f} MiB, of which "
          f"{growth / 2**20:.0f} MiB above the process after a 20,000-row warm-up run "
          f"({trained['baseline_rss'] / 2**20:.0f} MiB); one batch {trained['batch_bytes'] / 2**10:.0f} KiB + model "
          f"{trained['model_bytes'] / 2**10:.0f} KiB, limit 1.5x = {limit_bytes / 2**20:.2f} MiB: "
          f"{limit(growth <= limit_bytes)}; for scale: the CSV {csv.stat().st_size / 2**20:.0f} MiB, its "
          f"features as float32 {features_bytes / 2**20:.0f} MiB, growth / float32 features "
          f"{growth / features_bytes:.2f}")
    return trained


def section_csv(args) -> None:
    """CSV training alone at a tenth of ``--rows`` and at ``--rows``: what grows with the table, per row."""
    n = 100_000 if args.quick else args.rows  # a tenth of it still has the 5 checkpoints' steps
    print(f"\n## CSV training at {n // 10:,} and {n:,} rows ({SCALEOUT_CONFIG})")
    with tempfile.TemporaryDirectory(prefix="z0inf-csv-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "Z0INF_DATA_DIR": str(work / "data"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        env.pop("Z0INF_MLFLOW_CONFIG", None)
        small, big = (_csv_training(work, rows, env)["growth"] for rows in (n // 10, n))
    print(f"growth {small / 2**20:.0f} -> {big / 2**20:.0f} MiB for {n - n // 10:,} more rows: "
          f"{(big - small) / (n - n // 10):.0f} bytes a row")


def section_scaleout(args) -> None:
    import signal

    import yaml

    from z0inf_pipeline.deployments import celery

    n = 20_000 if args.quick else args.rows
    print(f"\n## {n:,} rows: CSV training, then influence_job recomputing its loss tables on celery workers "
          f"({SCALEOUT_CONFIG}, {SCALEOUT_SHARDS} training shards, train-test method {args.method})")
    with tempfile.TemporaryDirectory(prefix="z0inf-scaleout-") as tmp:
        work = Path(tmp)
        (work / "dagster").mkdir()
        (work / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {**os.environ, "DAGSTER_HOME": str(work / "dagster"), "Z0INF_DATA_DIR": str(work / "data"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        env.pop("Z0INF_MLFLOW_CONFIG", None)
        trained = _csv_training(work, n, env)
        server, broker = _redis(work)
        env["Z0INF_CELERY_BROKER"] = broker
        config = work / "worker.yaml"
        config.write_text(yaml.safe_dump({"execution": {"config": celery.celery_settings(broker)}}))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        train_shard = max(1, round(n * (1 - SCALEOUT_CONFIG["test_fraction"]) / SCALEOUT_SHARDS))
        results = {}
        try:
            for setup in WORKER_SETUPS:
                count, threads = setup
                env["Z0INF_OUTPUTS_URL"] = str(work / f"outputs-{count}x{threads}")
                workers = [subprocess.Popen(celery.worker_command(str(config), f"w{i}"),
                                            env={**env, "OMP_NUM_THREADS": str(threads)}, cwd=work,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True) for i in range(count)]
                try:
                    result = _child_json([sys.executable, __file__, "--celery-child", trained["run_id"],
                                          str(train_shard), args.method], env)
                    result["workers"] = [max(_peak_rss_of_group(w).values()) for w in workers]
                    results[setup] = result
                finally:
                    for worker in workers:
                        os.killpg(worker.pid, signal.SIGTERM)
                        worker.wait(60)
        finally:
            server.terminate()
            server.wait(30)
    for (count, threads), r in results.items():
        rss = ", ".join(f"{b / GB:.2f}" for b in [r["peak_rss"], *r["workers"]])
        shards = ", ".join(f"{kind}: {count_} steps over {span:.0f} s" for kind, (count_, span) in r["spans"].items())
        print(f"{count} worker(s) x {threads} thread(s): influence_job {r['seconds']:.0f} s ({'succeeded' if r['success'] else 'FAILED'}), "
              f"sharded steps ({shards}); peak RSS GB (launcher, workers) {rss}; "
              f"limits <= 900 s: {limit(r['seconds'] <= 900)}, <= 2 GB: {limit(max(r['peak_rss'], *r['workers']) <= 2 * GB)}")
        slow = sorted(r["steps"].items(), key=lambda kv: -kv[1])[:6]
        print("    slowest steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in slow))
    cores = os.cpu_count() or 1
    for name, (slow, fast) in {"scale-out, one core per worker": ((1, 1), (2, 1)),
                               f"this machine, its {cores} cores in one worker or split": ((1, cores), (2, 1))}.items():
        if slow not in results or fast not in results:
            continue
        for kind, (_, one) in results[slow]["spans"].items():
            two = results[fast]["spans"][kind][1]
            print(f"sharded steps, {kind}, {name}: {slow[0]} x {slow[1]} {one:.1f} s, {fast[0]} x {fast[1]} {two:.1f} s "
                  f"-> {one / two:.2f}x, limit >= 1.6x: {limit(one / two >= 1.6)}")
    print(f"(load average now {os.getloadavg()[0]:.1f})")


def _child_json(command: list[str], env: dict) -> dict:
    """The last JSON line a benchmark child process prints; its output shown if it fails."""
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"{command[2]} failed")
    return json.loads(lines[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].endswith("-child"):
        kind = sys.argv[1]
        if kind == "--influence-child":
            influence_child(sys.argv[2])
        elif kind == "--train-child":
            train_child(sys.argv[2])
        elif kind == "--celery-child":
            celery_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        elif kind == "--checks-child":
            checks_child(int(sys.argv[2]), int(sys.argv[3]))
        elif kind == "--topk-child":
            topk_child(*map(int, sys.argv[2:5]))
        else:
            gram_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=["pipeline", "checks", "topk", "loss", "gram", "csv", "scaleout"])
    parser.add_argument("--sizes", nargs="+", type=int, help="checks: these training-set sizes (default 10^4 10^5)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="csv, scaleout: rows of the CSV (default 10^6)")
    parser.add_argument("--method", choices=["trajectory", "directions"], default="trajectory",
                        help="scaleout: the train-test method (directions: its projections run in shards too)")
    args = parser.parse_args()
    print(f"# z0inf scale benchmark (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    for name, fn in {"pipeline": section_pipeline, "checks": section_checks, "topk": section_topk, "loss": section_loss,
                     "gram": section_gram, "csv": section_csv, "scaleout": section_scaleout}.items():
        if not args.only or name in args.only:
            fn(args)


if __name__ == "__main__":
    main()
