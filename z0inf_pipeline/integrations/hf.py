"""Hugging Face ``transformers``: a ``TrainerCallback`` that makes a ``Trainer`` run a contract run.

At the chosen checkpoint steps (step 0, before any update, and the last step included) it saves
the trainable parameters as safetensors and records one loss per example on the train set and on
an eval/probe set (token-mean NLL over the label tokens that are not -100, by default), then logs
one contract run (v2) when training ends::

    callback = Z0InfCallback(train_batches=id_batches(train_set, collator, 64),
                             probe_batches=id_batches(probe_set, collator, 64), num_checkpoints=20)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                      callbacks=[callback])
    with callback:                     # a crash inside train() marks the contract run FAILED
        trainer.train()
    print(callback.run_id)

It lives beside transformers' own MLflow reporting (``report_to=["mlflow"]``): that callback's
run stays its own (it logs a ``train_loss`` of its own at the last step, which would contradict
the contract's metric), and the contract run is created with the client API, shown nested
under it (``mlflow.parentRunId``) and finished or failed by this callback; no fluent
``start_run`` is ever left open. The HF run gets a ``z0inf.contract_run_id`` tag pointing at it.
"""

from __future__ import annotations

import json
import math
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import CONFIG_MAPPING, TrainerCallback

import transformers

from ..influence.devices import single_thread
from ..errors import InputError
from ..tracking.client import ensure_experiment, tracking_client
from ..tracking.contract import SOURCE_TAG
from ..tracking.logger import ContractLogger
from ..tracking.registry import CHECKPOINT_MODEL
from ..training.lm import (
    RECIPE,
    REGISTERED_MODEL,
    LMRecipe,
    SequenceDataset,
    answer_accuracy,
    build_model,
    model_kwargs,
    pretrained_model,
    task_examples,
)
from ..training.recording import BatchLossFn, IdsFn, ids_from_batch, token_mean_nll
from ..training.trainer import checkpoint_steps

CONTRACT_RUN_TAG = "z0inf.contract_run_id"


def id_batches(dataset: Dataset, collate_fn: Callable | None, batch_size: int = 64) -> DataLoader:
    """Batches of ``dataset`` in a fixed order (no shuffling, nothing dropped): what the recorder needs.
    Items carry their ``example_id``; the collator must pass it through (transformers' collators do)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, collate_fn=collate_fn)


def model_from_config(architecture: str, config: dict) -> torch.nn.Module:
    """A fresh, randomly initialised ``transformers`` model of class ``architecture`` (``GPT2LMHeadModel``)
    from a config dict: the ``factory`` of the model spec the callback writes (nothing is downloaded)."""
    model_class = getattr(transformers, architecture, None)
    if model_class is None or not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        raise InputError(f"model spec: {architecture!r} is not a transformers model class")
    config = dict(config)
    return model_class(CONFIG_MAPPING[config.pop("model_type")].from_dict(config))


def model_spec_of(model: torch.nn.Module) -> dict:
    config = json.loads(model.config.to_json_string(use_diff=False))
    return {"factory": f"{__name__}:model_from_config",
            "kwargs": {"architecture": type(model).__name__, "config": config}}


class Z0InfCallback(TrainerCallback):
    """Checkpoints + per-example loss tables at chosen steps of a ``Trainer``, logged as one contract run.

    ``train_batches`` / ``probe_batches``: re-iterable batches whose items carry ``example_id``
    (see ``id_batches``); ``loss_fn(model, batch) -> (B,)`` (default ``token_mean_nll``);
    ``steps``: checkpoint steps, or ``num_checkpoints`` evenly spaced over ``max_steps``;
    ``metrics_fn(model)``: extra metrics logged at each checkpoint (say ``test_accuracy``).
    Among the ``ContractLogger`` options: ``examples`` (per-id ``label`` / ``prompt`` / ``target`` /
    ``uri``), ``flipped_ids`` (training ids known to be corrupted, reported against by the review
    queue), ``train_config`` (a recipe this project can re-run, ``z0inf_pipeline.training.lm``).
    """

    def __init__(
        self,
        *,
        train_batches: Iterable,
        probe_batches: Iterable,
        loss_fn: BatchLossFn = token_mean_nll,
        ids_fn: IdsFn = ids_from_batch,
        steps: Sequence[int] | None = None,
        num_checkpoints: int = 20,
        checkpoint_parameters: str = "trainable",
        model_spec: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        metrics_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
        model: str | None = CHECKPOINT_MODEL,
        **logger_options: Any,
    ) -> None:
        """``model``: the run's registered model, by default the final network as a causal-LM scorer
        (``ContractLogger``'s ``model``). ``logger_options`` go to ``ContractLogger`` as they are:
        ``examples``, ``flipped_ids``, ``train_config``, ``experiment``, ``tracking_uri``, ``run_name``,
        ``tags``, ``parent_run_id``, ``dataset``, ``registered_model``."""
        self.steps = None if steps is None else sorted({int(s) for s in steps})
        self.num_checkpoints = num_checkpoints
        self._logger_args = dict(train=train_batches, test=probe_batches, loss_fn=loss_fn, ids_fn=ids_fn,
                                 checkpoint_parameters=checkpoint_parameters, model=model, **logger_options)
        self._model_spec = model_spec
        self._params = dict(params or {})
        self._metrics_fn = metrics_fn
        self.logger: ContractLogger | None = None
        self.run_id: str | None = None
        self._framework_run_id: str | None = None

    # The Trainer's hooks ---------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        """Create the experiment now, with this store's artifact location: if transformers' MLflow
        callback (same experiment name) created it first, artifacts would go to MLflow's default
        ``./mlruns`` in whatever folder training runs from."""
        uri = self._logger_args.get("tracking_uri")
        ensure_experiment(tracking_client(uri), self._logger_args.get("experiment", "z0inf"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import mlflow

        steps = self.steps or checkpoint_steps(state.max_steps, count=min(self.num_checkpoints, state.max_steps + 1))
        if steps[0] != 0 or steps[-1] > state.max_steps:
            raise InputError(f"Z0InfCallback: checkpoint steps {steps} must start at 0 and end by "
                                      f"max_steps={state.max_steps}")
        self._wanted = set(steps)
        framework_run = mlflow.active_run()  # transformers' MLflowCallback has opened its run by now, if reporting
        params = {"learning_rate": args.learning_rate, "max_steps": state.max_steps, "seed": args.seed,
                  "per_device_train_batch_size": args.per_device_train_batch_size, **self._params}
        self._framework_run_id = framework_run.info.run_id if framework_run else None
        self.logger = ContractLogger(
            model_spec=self._model_spec or model_spec_of(model), params=params,
            nested_in=self._framework_run_id, expected_checkpoints=len(steps), **self._logger_args,
        )
        self.logger.__enter__()
        self.run_id = self.logger.run_id
        if self._framework_run_id is not None:
            tracking_client(self._logger_args.get("tracking_uri")).set_tag(self._framework_run_id, CONTRACT_RUN_TAG,
                                                                           self.run_id)
        self._checkpoint(model, state, kwargs.get("lr_scheduler"), args.learning_rate)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.logger is not None and state.global_step in self._wanted:
            self._checkpoint(model, state, kwargs.get("lr_scheduler"), args.learning_rate)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._finish(None)

    # Guarding a crash inside trainer.train() -------------------------------------------------------

    def __enter__(self) -> "Z0InfCallback":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._finish(exc)
        return False

    def _checkpoint(self, model, state, scheduler, initial_lr: float) -> None:
        lr = scheduler.get_last_lr()[0] if scheduler is not None and state.global_step > 0 else initial_lr
        try:
            metrics = None
            if self._metrics_fn is not None:
                was_training = model.training
                with torch.no_grad():
                    metrics = self._metrics_fn(model.eval())
                model.train(was_training)
            self.logger.on_checkpoint(model, state.global_step, epoch=state.epoch or 0.0, lr=lr, metrics=metrics)
        except BaseException as exc:
            self._finish(exc)
            raise

    def _finish(self, exc: BaseException | None) -> None:
        """Close the contract run once: validated and uploaded, or FAILED when ``exc`` is given. A failed
        training also ends the framework's run it was nested in as FAILED, since transformers' own callback
        never gets to end it when ``train()`` raises."""
        import mlflow

        logger, self.logger = self.logger, None
        if logger is None:
            return
        try:
            logger.__exit__(type(exc) if exc else None, exc, None)
        finally:
            active = mlflow.active_run()
            if exc is not None and active is not None and active.info.run_id == self._framework_run_id:
                mlflow.end_run(status="FAILED")


@single_thread()
def train_and_log_lm(recipe: LMRecipe, *, tracking_uri=None, experiment="z0inf", parent_run_id=None, tags=None,
                     run_name=None) -> str:
    """Fine-tune the pretrained base on the recipe's task through a real ``Trainer`` and the callback;
    return the contract run's id."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    train, probe = task_examples(recipe)
    train = train[~train["example_id"].isin(recipe.exclude_ids)].reset_index(drop=True)
    train_set, probe_set = (SequenceDataset(f, recipe.sequence_length) for f in (train, probe))
    model = pretrained_model(recipe)
    steps_per_epoch = math.ceil(len(train_set) / recipe.batch_size)
    probe_batches = id_batches(probe_set, default_data_collator, 256)
    callback = Z0InfCallback(
        train_batches=id_batches(train_set, default_data_collator, 256),
        probe_batches=probe_batches,
        metrics_fn=lambda net: {"test_accuracy": answer_accuracy(net, probe_batches)},
        num_checkpoints=recipe.checkpoints,
        model_spec={"factory": f"{build_model.__module__}:build_model", "kwargs": model_kwargs(recipe)},
        examples=pd.concat([train, probe])[["example_id", "prompt", "target"]],
        flipped_ids=train.loc[train["corrupted"], "example_id"].to_numpy(),
        train_config=recipe.to_dict(), experiment=experiment, tracking_uri=tracking_uri,
        run_name=run_name or f"lm-{recipe.task}-corrupt{recipe.corrupt_fraction:g}", parent_run_id=parent_run_id,
        tags={SOURCE_TAG: "lm recipe", **(tags or {})}, dataset=f"generated-{recipe.task}",
        registered_model=REGISTERED_MODEL,
        params={"n_corrupted": int(train["corrupted"].sum()), "recipe": RECIPE},
    )
    with tempfile.TemporaryDirectory(prefix="z0inf-lm-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=recipe.epochs * steps_per_epoch, per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.lr, lr_scheduler_type="cosine", weight_decay=0.0, seed=recipe.seed,
            report_to="none", save_strategy="no", logging_strategy="no", eval_strategy="no",
            disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=default_data_collator,
                          callbacks=[callback])
        with callback:
            trainer.train()
    return callback.run_id
