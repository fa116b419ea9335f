"""Stage 9: the retrained model reaches the MLflow Model Registry's ``champion`` alias only when its
review gate passed and a paired bootstrap on the same held-out examples says it is better."""

import tempfile

import dagster as dg
import numpy as np
import pandas as pd

from ...evaluation.promotion import PromotionPolicy, decide_promotion, paired_bootstrap
from ...tracking.registry import (
    CHAMPION,
    MODEL_TAG,
    RegisteredVersion,
    aliased_version,
    move_alias,
    registered_version,
)
from ...tracking.reader import no_progress_bars
from ...training.lm import LMRecipe, recipe_from_dict
from ..config import PromotionConfig
from ..metadata import rounded, run_id_of
from ..partitions import PER_RUN
from ..resources import MlflowResource

GATE = dg.AssetCheckKey(dg.AssetKey("review_queue"), "review_gate")
UNITS = {"classifier": "accuracy", "causal_lm": "nats of loss"}


def gate_result(instance: dg.DagsterInstance, dagster_run_id: str | None, run_id: str) -> tuple[bool, str]:
    """Whether ``review_gate`` passed for ``run_id`` in the Dagster run that retrained it, and what it said:
    the gate's own recorded result, not a new evaluation."""
    if not dagster_run_id:
        return False, "the retrained run names no Dagster run (tag z0inf.dagster_run_id)"
    for record in instance.all_logs(dagster_run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.asset_check_evaluation_data
        if evaluation.asset_check_key == GATE and evaluation.partition in (None, run_id):
            verdict = "passed" if evaluation.passed else "failed"
            said = f": {evaluation.description}" if evaluation.description else ""
            return evaluation.passed, f"{verdict} in Dagster run {dagster_run_id}{said}"
    return False, f"review_gate was not evaluated in Dagster run {dagster_run_id}, the run that retrained"


def held_out(recipe) -> tuple[object, np.ndarray | None]:
    """The recipe's held-out examples as the served model takes them, and their labels (None for a LM,
    whose served model returns each example's loss)."""
    if isinstance(recipe, LMRecipe):
        from ...training.lm import probe_inputs

        return probe_inputs(recipe), None
    from ...training import training_data

    test = training_data(recipe).test
    return test.features.numpy(), test.labels.numpy()


def per_example_scores(version: RegisteredVersion, inputs, labels, tracking: MlflowResource) -> tuple[np.ndarray, str]:
    """Correctness (classifier) or loss (LM) of one registered version on each held-out example, and its task.
    The version is downloaded (from where the resource's registry says it is) and loaded as MLflow serves
    it (``mlflow.pyfunc``)."""
    import mlflow.artifacts
    import mlflow.pyfunc

    location = tracking.client().get_model_version_download_uri(version.name, version.version)
    with tempfile.TemporaryDirectory(prefix="z0inf-promotion-") as tmp, no_progress_bars():
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp, tracking_uri=tracking.uri())
        model = mlflow.pyfunc.load_model(local)
        task = (model.metadata.metadata or {}).get("z0inf.task", "")
        predicted = np.asarray(model.predict(inputs))
    if task == "classifier":
        return (predicted == labels).astype(np.float64), task
    return predicted.astype(np.float64), task


@dg.asset(**PER_RUN, kinds={"mlflow"})
def model_promotion(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    retrained_run: pd.DataFrame,
    mlflow: MlflowResource,
) -> dg.Output[pd.DataFrame]:
    """Compare the retrained model with the registered model's ``champion`` (or, with none, the parent
    run's version) on the same held-out examples: per-example correctness (loss for LM runs) and a paired
    bootstrap interval on the gain. Alias it ``champion`` when the review gate passed for this lineage and
    the interval's lower end >= ``margin``, else ``challenger``; every move is tagged on the version.
    A retrained run without a registered model is skipped, and the output says so."""
    policy = config.settings(PromotionPolicy)
    run_id = run_id_of(context)
    child_id = str(retrained_run.at[0, "retrained_run_id"])
    client = mlflow.client()
    child_tags = client.get_run(child_id).data.tags
    version = registered_version(child_tags)
    summary = {"retrained_run_id": child_id, "registered_model": "", "version": "", "alias": "",
               "compared_with": "", "gate_passed": False, "gain": np.nan, "gain_low": np.nan, "gain_high": np.nan,
               "confidence": policy.confidence, "margin": policy.margin, "examples": 0, "reason": ""}
    incumbent, compared_with = None, ""
    if version is not None:
        champion = aliased_version(client, version.name, CHAMPION)
        if champion is not None and champion.version != version.version:
            incumbent, compared_with = champion, f"champion (version {champion.version})"
        else:
            incumbent = registered_version(mlflow.fetch(run_id).tags)
            compared_with = f"the parent run's version {incumbent.version}" if incumbent else ""
        summary.update(registered_model=version.name, version=version.version, compared_with=compared_with)
    if version is None or incumbent is None:
        summary["reason"] = (
            f"skipped: the retrained run has no registered model ({MODEL_TAG}={child_tags.get(MODEL_TAG, 'unset')})"
            if version is None
            else "skipped: there is no champion and the parent run registered no model, so nothing to compare with"
        )
        context.log.info(summary["reason"])
        return dg.Output(pd.DataFrame([summary]), metadata=_metadata(mlflow, child_id, summary))

    inputs, labels = held_out(recipe_from_dict(mlflow.fetch(run_id).train_config))
    new, task = per_example_scores(version, inputs, labels, mlflow)
    old, _ = per_example_scores(incumbent, inputs, labels, mlflow)
    gains = new - old if task == "classifier" else old - new
    interval = paired_bootstrap(gains, confidence=policy.confidence, resamples=policy.resamples, seed=policy.seed)
    gate_passed, gate_text = gate_result(context.instance, child_tags.get("z0inf.dagster_run_id"), run_id)
    decision = decide_promotion(gate_passed, interval, policy.margin, unit=UNITS[task], compared_with=compared_with,
                                gate=gate_text)
    move_alias(client, version, decision.alias, {
        "by": f"z0inf model_promotion, Dagster run {context.run.run_id}",
        "gate": gate_text,
        "compared_with": compared_with,
        "gain": interval.mean,
        "interval": [interval.low, interval.high],
        "confidence": interval.confidence,
        "margin": policy.margin,
        "examples": interval.examples,
    })
    client.set_tag(child_id, "z0inf.alias", decision.alias)
    mlflow.log_metrics(child_id, {"z0inf.promotion_gain": interval.mean, "z0inf.promotion_gain_low": interval.low,
                                  "z0inf.promotion_gain_high": interval.high})
    summary.update(alias=decision.alias, gate_passed=gate_passed, gain=interval.mean, gain_low=interval.low,
                   gain_high=interval.high, examples=interval.examples, reason=decision.reason)
    context.log.info(f"{version.uri} -> @{decision.alias}: {decision.reason}")
    return dg.Output(pd.DataFrame([summary]), metadata=_metadata(mlflow, child_id, summary))


def _metadata(mlflow: MlflowResource, child_id: str, summary: dict) -> dict:
    shown = {
        "registered_model": summary["registered_model"],
        "version": str(summary["version"]),
        "alias": summary["alias"] or "none (skipped)",
        "compared_with": summary["compared_with"],
        "gate_passed": bool(summary["gate_passed"]),
        "gain": rounded(summary["gain"]),
        "interval": f"[{rounded(summary['gain_low'])}, {rounded(summary['gain_high'])}]",
        "margin": summary["margin"],
        "reason": dg.MetadataValue.md(summary["reason"]),
    }
    if summary["version"]:
        shown["model_uri"] = f"models:/{summary['registered_model']}/{summary['version']}"
    return {**mlflow.run_metadata(child_id, prefix="retrained_run"), **shown}
