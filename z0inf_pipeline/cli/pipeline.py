"""``z0inf demo`` (the whole flow on digits with injected label noise) and ``z0inf materialize``
(run one of the Dagster jobs for an MLflow run, in this process, on the DAGSTER_HOME instance)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import pandas as pd

from ..evaluation.retrain import random_drop_accuracy
from ..review.layout import outputs_base
from ..review.policy import FlagPolicy
from ..training import DEMO_CONFIG, TrainConfig, TrainRecipe
from .arguments import add_settings, settings_from
from .jobs import JobOutcome, dagster_instance, policy_run_config, run_job

JOBS = {"influence": "influence_job", "retrain": "retrain_job", "pipeline": "pipeline_job"}
# Round 1 of the demo is decided by this stand-in, which knows the injected errors (an oracle no real
# reviewer has): the name says so wherever the decisions show, on the page, in the sheet and in MLflow.
SIMULATED_REVIEWER = "simulated reviewer (z0inf demo)"


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="train a demo recipe (digits with 10%% label noise, or --recipe lm) and run the whole pipeline"
    )
    demo.add_argument(
        "--stop-at-gate",
        action="store_true",
        help="stop at round 1's review gate (decide it yourself) instead of letting the simulated reviewer decide "
        "round 1, retraining, and leaving the retrained run's round-2 queue for you",
    )
    demo.add_argument(
        "--recipe",
        choices=["digits", "lm"],
        default="digits",
        help="digits: the MLP on flipped labels; lm: a tiny GPT-2 fine-tuned on letter shifting with 10%% of the "
        "answers wrong, through the Hugging Face callback (needs the [hf] extra; --epochs etc. do not apply)",
    )
    add_settings(
        demo.add_argument_group("the demo's recipe"),
        TrainRecipe,
        only=("epochs", "checkpoints", "label_noise"),
        defaults=DEMO_CONFIG,
    )
    _add_policy_args(demo)
    demo.set_defaults(handler=_demo)

    materialize = sub.add_parser("materialize", help="run a pipeline job for one MLflow run (in this process)")
    materialize.add_argument(
        "job",
        choices=sorted(JOBS),
        help="influence: scores + review queue; retrain: review gate + curation + retraining; pipeline: everything",
    )
    materialize.add_argument("--run", required=True, help="MLflow run id (added as a partition if new)")
    _add_policy_args(materialize)
    materialize.add_argument(
        "--policy-changed-by",
        metavar="REVIEWER",
        help="influence only: rebuild a run's existing queue with other flag-policy flags, recorded under this "
        "name (the gate's policy is fixed when the queue is built; retrain uses the queue's own and cannot change it)",
    )
    materialize.set_defaults(handler=_materialize)


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    add_settings(parser.add_argument_group("flag policy (review_queue config)"), FlagPolicy)


def _policy_config(args) -> dict:
    """The review_queue op config of the flags given (validated by FlagPolicy before any job starts)."""
    return policy_run_config(settings_from(args, FlagPolicy))


def _materialize_config(args) -> dict:
    """The flag policy for ``z0inf materialize``: the flags given; for a retrain without policy flags,
    the policy the run's queue was built with (a retrain cannot change it, so it is not asked for)."""
    from ..review import RunLayout, read_review_queue

    given = settings_from(args, FlagPolicy)
    layout = RunLayout.for_run(args.run, outputs_base())
    if args.job != "influence" and given == FlagPolicy() and layout.review_queue.exists():
        given = FlagPolicy.from_dict(read_review_queue(layout.review_queue)[1]["policy"])
    config = policy_run_config(given)
    if args.policy_changed_by:
        config["ops"]["review_queue"]["config"]["policy_changed_by"] = args.policy_changed_by
    return config


def _materialize(args) -> int:
    from ..tracking import resolve_tracking_uri
    from ..tracking.client import check_reachable

    check_reachable(resolve_tracking_uri())  # a dead MLflow is one named error now, not a failed step later
    instance, persistent = dagster_instance()
    outcome = run_job(instance, JOBS[args.job], args.run, _materialize_config(args))
    _print_steps(outcome)
    _print_checks(outcome)
    if args.job != "influence" and outcome.check_failed("review_gate"):
        print(f"\nretraining did not run: {outcome.checks['review_gate'][1]}")
        print(f"  review with `z0inf review list --run {args.run}` and")
        print(f"  `z0inf review decide {args.run} ID... --action ...`, then run this again")
        return 3
    if not outcome.success:
        if outcome.named_error is not None:  # an expected failure: reported by the CLI's error boundary
            raise outcome.named_error
        for failure in outcome.failures:
            print(f"z0inf: error: {failure}", file=sys.stderr)
        return 2
    _print_outputs(args.run)
    if not persistent:
        print("(DAGSTER_HOME is not set: this run is not kept; `make dev` sets it)")
    return 0


def _demo(args) -> int:
    from ..review import RunLayout
    from ..integrations import train_and_log_recipe
    from ..tracking import resolve_tracking_uri

    started = time.perf_counter()
    config = settings_from(args, TrainRecipe, base=DEMO_CONFIG)
    if args.recipe == "lm":
        from ..training.lm import LM_DEMO_RECIPE as config
    instance, persistent = dagster_instance()
    tracking_uri = resolve_tracking_uri()
    print(
        f"z0inf demo: {config.dataset}, {config.model} {list(config.hidden)}, {config.epochs} epochs, "
        f"{config.checkpoints} checkpoints, {config.label_noise:.0%} of training labels flipped on purpose"
        if args.recipe == "digits"
        else f"z0inf demo --recipe lm: tiny GPT-2 ({config.n_layer} layers, width {config.n_embd}) pretrained "
        f"{config.pretrain_steps} steps, fine-tuned {config.epochs} epochs on {config.n_train} '{config.task}' prompts, "
        f"{config.corrupt_fraction:.0%} of answers wrong on purpose, {config.checkpoints} checkpoints"
    )
    print(f"  MLflow: {tracking_uri}")
    print(f"  Dagster: {os.environ['DAGSTER_HOME'] if persistent else 'in-memory instance (DAGSTER_HOME not set)'}\n")

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    run_id = train_and_log_recipe(
        config, tracking_uri=tracking_uri, tags={"z0inf.source_command": "z0inf demo"}, progress=True
    )
    timings["train + log contract run"] = time.perf_counter() - tick
    print(f"[1/3] trained and logged MLflow run {run_id} ({timings['train + log contract run']:.1f} s)")
    _print_learned(tracking_uri, run_id, "held-out answer accuracy" if args.recipe == "lm" else "test accuracy")

    influence = run_job(instance, "influence_job", run_id, _policy_config(args))
    timings.update({f"influence_job: {k}": v for k, v in influence.step_seconds.items()})
    if not influence.success:
        _print_failures("influence_job", influence)
        return 1
    print(
        f"[2/3] influence_job: every data check passed "
        f"({', '.join(n for n, (ok, _) in influence.checks.items() if ok)})"
    )
    layout = RunLayout.for_run(run_id, outputs_base())
    _print_findings(layout)

    gated = run_job(instance, "retrain_job", run_id, _policy_config(args))
    timings.update({f"retrain_job (gated): {k}": v for k, v in gated.step_seconds.items()})
    exit_code = 0
    if gated.check_failed("review_gate"):
        print(f"\n[3/3] retrain_job: {gated.checks['review_gate'][1]}")
        print(
            "      retraining did NOT run: it is skipped while the review gate is shut (until the flagged examples have decisions)."
        )
        if args.stop_at_gate:
            _print_review_instructions(run_id, layout)
        else:
            exit_code = _simulated_round(instance, run_id, layout, args, timings, config)
    elif gated.success:
        print("\n[3/3] retrain_job: the review gate was open (see --max-unreviewed-fraction)")
        _print_retrained(layout)
    else:
        _print_failures("retrain_job", gated)
        exit_code = 1

    print("\nstage timings")
    for name, seconds in timings.items():
        print(f"  {seconds:7.2f} s  {name}")
    print(f"  {time.perf_counter() - started:7.2f} s  total")
    print(
        f"\nbrowse it: `make dev` (Dagster UI: assets, checks, review queue, histogram, flagged images), "
        "`make mlflow-ui` (MLflow UI)"
    )
    return exit_code


def _print_failures(job: str, outcome: JobOutcome) -> None:
    """A failed job as the CLI's named errors read (``z0inf: error: ...``), one line per failed step."""
    for failure in outcome.failures or ["(no step failed; see the Dagster run)"]:
        print(f"z0inf: error: {job} (Dagster run {outcome.dagster_run_id}): {failure}", file=sys.stderr)


def simulated_decisions(queue: pd.DataFrame, examples: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """What the demo's simulated reviewer decides on (part of) a flagged queue, knowing the injected
    errors: an injected label flip is relabelled to the label it had, an injected wrong answer (text
    runs: no label to restore) is dropped, everything else is kept. ``{action: rows of the queue}``
    (relabel rows carry ``original_label``)."""
    known = examples.set_index("example_id").reindex(queue["example_id"])
    injected = known["flipped"].fillna(False).astype(bool).to_numpy()
    rows = queue.assign(original_label=known["original_label"].to_numpy())
    text = "target" in examples.columns
    return {
        "keep": rows[~injected],
        "drop": rows[injected] if text else rows.iloc[:0],
        "relabel": rows.iloc[:0] if text else rows[injected],
    }


def simulated_review(store, run_id: str, queue: pd.DataFrame, examples: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Record the simulated reviewer's ``simulated_decisions`` on ``queue`` in ``store``; return them."""
    decided = simulated_decisions(queue, examples)
    note = "z0inf demo: the simulated reviewer knows the injected errors (no real reviewer does)"
    for action in ("keep", "drop"):
        if len(decided[action]):
            store.record(run_id, decided[action]["example_id"], action, reviewer=SIMULATED_REVIEWER, note=note)
    for label, rows in decided["relabel"].groupby("original_label"):
        store.record(run_id, rows["example_id"], "relabel", label=int(label), reviewer=SIMULATED_REVIEWER, note=note)
    return decided


def _simulated_round(instance, run_id: str, layout, args, timings: dict[str, float], config) -> int:
    """Round 1 decided by the simulated reviewer, the gated retrain, then the retrained run's own
    analysis: its round-2 queue is left pending for a person (``make review``).

    The LM recipe's retrained run flags nothing (measured: 0 of 1081 once its 119 flagged wrong answers
    are dropped), which would leave no queue at all; there the simulated reviewer decides the first half
    of round 1 and leaves the rest pending on the run itself, with the gate shut."""
    from ..review import DecisionStore, read_review_queue
    from ..review.run_review import RunReview

    queue, _ = read_review_queue(layout.review_queue)
    store = DecisionStore.open()
    partial = args.recipe == "lm"
    decided = simulated_review(store, run_id, queue.head(len(queue) // 2) if partial else queue,
                               pd.read_parquet(layout.examples))
    counts = ", ".join(f"{len(rows)} {action}" for action, rows in decided.items())
    print(f"\n      round 1 decided by the SIMULATED reviewer ({SIMULATED_REVIEWER!r}: it knows the injected errors): "
          f"{counts}, in {store.location}")
    if partial:
        pending = len(queue) - sum(len(rows) for rows in decided.values())
        print(
            f"\n[round 1] the simulated reviewer decided the first half; {pending} flagged examples are PENDING for "
            f"you (this recipe's retrained run flags none, so round 1 is where a queue is left).\n"
            f"      decide them on the review page (`make review`, http://127.0.0.1:8765/runs/{run_id}?pending=1), "
            "then press 'retrain now' there"
        )
        return 0
    retrain = run_job(instance, "retrain_job", run_id, _policy_config(args))
    timings.update({f"retrain_job: {k}": v for k, v in retrain.step_seconds.items()})
    if not retrain.success:
        _print_failures("retrain_job", retrain)
        return 1
    print(f"      retrain_job: {retrain.checks['review_gate'][1]}")
    # The random-drop baseline retrains a TrainConfig recipe in-process; the LM recipe trains through MLflow.
    _print_retrained(layout, recipe=config if isinstance(config, TrainConfig) else None)
    if _print_promotion(layout, config if isinstance(config, TrainConfig) else None):
        return 1

    child = str(pd.read_parquet(layout.retrained).iloc[0]["retrained_run_id"])
    analysed = run_job(instance, "influence_job", child, _policy_config(args))
    timings.update({f"influence_job (round 2): {k}": v for k, v in analysed.step_seconds.items()})
    if not analysed.success:
        _print_failures("influence_job", analysed)
        return 1
    review = RunReview.open(child, outputs_base())
    status = review.gate(review.decisions(store))
    print(
        f"\n[round 2] the retrained run {child} is analysed: {status.flagged} flagged, {status.reviewed} decided "
        f"(decisions carried over from round 1), {status.unreviewed} PENDING for you.\n"
        f"      decide them on the review page (`make review`, http://127.0.0.1:8765/runs/{child}?pending=1), "
        "then press 'retrain now' there"
    )
    return 0


def _print_findings(layout) -> None:
    from ..review import detection_quality, read_review_queue

    queue, info = read_review_queue(layout.review_queue)
    examples = pd.read_parquet(layout.examples)
    train = examples[examples["split"] == "train"]
    flipped = train.loc[train["flipped"], "example_id"]
    quality = detection_quality(queue["example_id"], flipped)
    print(f"\n  MLflow run        {layout.run_id}")
    print("                      outputs logged back to it: artifacts z0inf/<stage>/, metrics z0inf.*")
    print(f"  parquet outputs   {_short(layout.root)}/")
    for path in (
        layout.train_losses,
        layout.test_losses,
        layout.gram,
        layout.self_influence,
        layout.topk,
        layout.review_queue,
    ):
        print(f"                      {path.relative_to(layout.root)}")
    policy = FlagPolicy.from_dict(info["policy"])
    # The `flipped` column marks what was corrupted on purpose: a label (digits) or an answer (the LM recipe).
    injected, corrupted = ("wrong answers",) * 2 if "target" in queue else ("injected flips", "flipped labels")
    print(
        f"  flagged           {len(queue)} of {info['training_examples']} training examples "
        f"(flag score {policy.score}, cut-off {info['cutoff']:.4g}, policy {policy.method})"
    )
    if quality is not None:
        print(
            f"  {'vs ' + injected:<17} precision {quality['precision']:.3f}, recall {quality['recall']:.3f} "
            f"({int(quality['true_positives'])} of the {int(quality['flipped'])} {corrupted} are in the queue; "
            f"base rate {quality['flipped'] / info['training_examples']:.3f})"
        )
        _print_default_policy_quality(layout, policy, flipped, injected)
    top = queue.head(8)
    print("  top of the review queue:")
    print(
        "    "
        + pd.DataFrame(
            {
                "rank": top["rank"],
                "id": top["example_id"],
                "flag score": top["flag_score"].map("{:.4g}".format),
                "self_influence rank": top["self_influence_rank"],
                "flagged by": top["flagged_by"],
                # a text run has no classes: its prompt and target stand where label and prediction would
                **({c: top[c] for c in ("prompt", "target")} if "target" in top else {
                    "label": top["label"], "predicted": top["predicted_label"].astype("string").fillna("?")}),
                f"{corrupted.split()[0]} on purpose": top["flipped"],
            }
        )
        .to_string(index=False)
        .replace("\n", "\n    ")
    )


def _print_default_policy_quality(layout, queue_policy: FlagPolicy, flipped_ids, injected: str) -> None:
    """What the library's default flag policy would flag on the same scores, when the launchpad ran another
    (nothing when the queue's policy flags as the default does: only the review gate's share differs)."""
    from ..review import detection_quality, flag_scores
    from ..review.policy import given_labels

    policy = FlagPolicy()
    if queue_policy.replace(max_unreviewed_fraction=policy.max_unreviewed_fraction) == policy:
        return
    scores = pd.read_parquet(layout.self_influence)
    flags = flag_scores(scores, policy, labels=given_labels(pd.read_parquet(layout.examples), scores),
                        loss_tables=(pd.read_parquet(layout.train_losses), pd.read_parquet(layout.test_losses)))
    quality = detection_quality(scores.loc[flags.flagged, "example_id"], flipped_ids)
    print(
        f"  default policy    {policy.describe()}: {flags.count} flagged, precision {quality['precision']:.3f}, "
        f"recall {quality['recall']:.3f} against the {injected}"
    )


def _print_review_instructions(run_id: str, layout) -> None:
    from ..review import read_review_queue

    queue, _ = read_review_queue(layout.review_queue)
    # Suggest relabelling where the model disagrees with the label, dropping a few of the others.
    disagree = queue["predicted_label"].notna() & (queue["predicted_label"] != queue["label"])
    relabel = queue[disagree].head(2)
    drop = " ".join(str(i) for i in queue.loc[~queue["example_id"].isin(relabel["example_id"]), "example_id"].head(3))
    print("\n  record decisions (they go to the review store and survive every re-run), for example:")
    print(f"    z0inf review list --run {run_id}")
    for row in relabel.itertuples():
        print(f"    z0inf review decide {run_id} {row.example_id} --action relabel --label {row.predicted_label}")
    print(f"    z0inf review decide {run_id} {drop} --action drop")
    print(f"    z0inf review decide {run_id} --flagged --action keep      # everything still undecided")
    print(f"  then retrain (the gate re-checks in the same run):\n    z0inf materialize retrain --run {run_id}")
    print("  or let a simulated reviewer decide this round: z0inf demo (without --stop-at-gate)")


def _print_retrained(layout, recipe=None) -> None:
    """The retrained run against its parent; with the parent's ``recipe``, also against the same recipe
    and seed trained without as many examples drawn at random, so the effect of curation is not
    mistaken for the effect of having less data."""
    row = pd.read_parquet(layout.retrained).iloc[0]
    print(
        f"      retrained MLflow run {row['retrained_run_id']} (tag z0inf.parent_run_id={layout.run_id}): "
        f"{row['train_examples']} training examples ({row['dropped']} dropped, {row['relabelled']} relabelled)"
    )
    parent, retrained = row["parent_test_accuracy"], row["retrained_test_accuracy"]
    if recipe is None or row["dropped"] == 0:  # the random-drop baseline only means something after drops
        print(f"      test accuracy {parent:.4f} (parent) -> {retrained:.4f} (retrained)")
        return
    random_drop = random_drop_accuracy(recipe, int(row["dropped"]))
    print(
        f"      test accuracy: parent {parent:.4f}, without the {row['dropped']} flagged {retrained:.4f}, "
        f"without {row['dropped']} random examples {random_drop:.4f} (same recipe and seed)"
    )


def _print_learned(tracking_uri: str, run_id: str, what: str) -> None:
    """The trained model's accuracy on held-out examples at its last checkpoint: an attribution of a
    model that learned nothing would mean little."""
    from mlflow import MlflowClient

    accuracy = MlflowClient(tracking_uri).get_run(run_id).data.metrics.get("test_accuracy")
    if accuracy is not None:
        print(f"      {what} of the parent run: {accuracy:.3f}")


def _print_promotion(layout, recipe=None) -> int:
    """Where the retrained model went in the MLflow Model Registry; with a ``recipe``, also load
    ``models:/<name>@champion`` as a serving job would and check that its accuracy on the test set is the
    retrained run's logged ``test_accuracy`` (exit 1 when not)."""
    if not layout.promotion.exists():
        return 0
    row = pd.read_parquet(layout.promotion).iloc[0]
    if not row["alias"]:
        print(f"      model registry: {row['reason']}")
        return 0
    print(f"      model registry: models:/{row['registered_model']}/{row['version']} -> @{row['alias']}")
    print(f"        {row['reason']}")
    if row["alias"] != "champion" or recipe is None:
        return 0
    return _check_champion(row, recipe)


def _check_champion(row, recipe) -> int:
    import mlflow
    import numpy as np

    from ..tracking import resolve_tracking_uri, tracking_client
    from ..training import training_data

    uri = f"models:/{row['registered_model']}@champion"
    with _tracking_uri_in_environment(resolve_tracking_uri()):
        champion = mlflow.pyfunc.load_model(uri)
    test = training_data(recipe).test
    accuracy = float(np.mean(champion.predict(test.features.numpy()) == test.labels.numpy()))
    logged = tracking_client().get_run(row["retrained_run_id"]).data.metrics["test_accuracy"]
    agrees = abs(accuracy - logged) < 1e-6  # the metric is logged from float32
    print(
        f"      mlflow.pyfunc.load_model({uri!r}) on the {len(test)} test examples: accuracy {accuracy:.4f}, "
        f"the retrained run logged {logged:.4f}: {'the same' if agrees else 'DIFFERENT'}"
    )
    return 0 if agrees else 1


@contextlib.contextmanager
def _tracking_uri_in_environment(uri: str):
    """``$MLFLOW_TRACKING_URI`` set to ``uri`` for a block: MLflow's own loaders resolve ``models:/`` with
    it, and nothing global is left pinned afterwards."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _print_steps(outcome: JobOutcome) -> None:
    print(
        f"{outcome.job} (Dagster run {outcome.dagster_run_id}): {'succeeded' if outcome.success else 'did not succeed'}"
    )
    for step, seconds in outcome.step_seconds.items():
        print(f"  {seconds:7.2f} s  {step}")


def _print_checks(outcome: JobOutcome) -> None:
    for name, (passed, description) in outcome.checks.items():
        print(f"  [{'pass' if passed else 'FAIL'}] {name}: {description}")


def _print_outputs(run_id: str) -> None:
    from ..review import RunLayout

    layout = RunLayout.for_run(run_id, outputs_base())
    print(f"outputs in {_short(layout.root)}/")
    if layout.retrained.exists():
        _print_retrained(layout)


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
