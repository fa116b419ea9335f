"""The paper's setting in the accuracy suite: a tiny GPT-2 pretrained on one task family (copying) and
fine-tuned on another (letter shift, letter complement), checkpoints only while fine-tuning.

The LM recipe's own pieces (``z0inf_pipeline.training.lm``: base model, tasks, sequences) with a plain
fine-tuning loop instead of ``transformers.Trainer`` and MLflow, so that the 20 held-out refits of LDS
stay affordable on 2 shared cores. The pretrained base is deterministic in the seed and built once per
recipe. Per-example loss: the token-mean NLL of the answer (as ``Z0InfCallback`` logs it). Peer:
TracInCP over every fine-tuning checkpoint and all parameters, learning-rate weighted, from exact
per-example gradients (one backward pass each; captum's batched gradients do not support GPT-2's Conv1D).
TRAK is left out here (its ``image_classification`` task does not fit a causal LM).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from z0inf_pipeline.evaluation.ground_truth import random_subsets
from z0inf_pipeline.influence import load_state_dict, open_checkpoints, save_checkpoint
from z0inf_pipeline.influence.directions import ForwardAccess
from z0inf_pipeline.training import lm


@dataclass(frozen=True)
class LMCase:
    name: str
    recipe: lm.LMRecipe


_SMALL = dict(n_train=200, n_probe=60, epochs=8, checkpoints=8, batch_size=32)
LM_CASES = (
    LMCase("tiny GPT-2 / copy -> shift / fine-tune / corrupt 10%", lm.LMRecipe(task="shift", corrupt_fraction=0.1, **_SMALL)),
    LMCase("tiny GPT-2 / copy -> complement / fine-tune / clean", lm.LMRecipe(task="complement", corrupt_fraction=0.0, **_SMALL)),
)


class TokenLM(nn.Module):
    """The GPT-2 as a tensor-in, logits-out module: what ``ForwardAccess`` and ``torch.func`` call.
    Padding sits after every answer, so causal attention needs no mask."""

    def __init__(self, recipe: lm.LMRecipe) -> None:
        super().__init__()
        self.lm = lm.build_model(**lm.model_kwargs(recipe))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of each sequence's answer tokens, (n,)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=lm.IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1) / labels.ne(lm.IGNORE_INDEX).sum(dim=1)


def tensors(frame, recipe: lm.LMRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = lm.SequenceDataset(frame, recipe.sequence_length)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([i["input_ids"] for i in items]), torch.stack([i["labels"] for i in items])


@functools.cache
def _base_state(recipe: lm.LMRecipe) -> dict:
    """The copy-pretrained base (pretraining does not depend on the fine-tuning task or subset)."""
    return {k: v.clone() for k, v in lm.pretrained_model(recipe).state_dict().items()}


def fine_tune(recipe: lm.LMRecipe, train: tuple[torch.Tensor, torch.Tensor], folder: Path | None = None) -> TokenLM:
    """AdamW with a cosine schedule from the pretrained base; ``recipe.checkpoints`` evenly spaced
    safetensors checkpoints (first and last included) under ``folder`` when given."""
    model = TokenLM(recipe)
    model.lm.load_state_dict(_base_state(recipe))
    ids, labels = train
    steps_per_epoch = math.ceil(len(ids) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    saves = set(np.floor(np.linspace(0, total, recipe.checkpoints) + 0.5).astype(int).tolist())
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    generator = torch.Generator().manual_seed(recipe.seed)
    step = 0
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(ids), generator=generator)
        for first in range(0, len(ids), recipe.batch_size):
            if folder is not None and step in saves:
                _save(model, folder, step, schedule.get_last_lr()[0])
            batch = order[first : first + recipe.batch_size]
            loss = answer_nll(model(ids[batch]), labels[batch]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    if folder is not None:
        _save(model, folder, step, schedule.get_last_lr()[0])
    return model.eval()


def _save(model: nn.Module, folder: Path, step: int, learning_rate: float) -> None:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # tied weights: separate copies
    save_checkpoint(folder / f"step_{step:06d}.safetensors", state, step=step, learning_rate=learning_rate)


def losses(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return answer_nll(model(data[0]), data[1]).double()


def answer_accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Share of held-out prompts whose whole answer is the model's top prediction (teacher-forced)."""
    with torch.no_grad():
        logits = model(data[0])[:, :-1]
    labels = data[1][:, 1:]
    wrong = (logits.argmax(dim=-1) != labels) & labels.ne(lm.IGNORE_INDEX)
    return float((~wrong.any(dim=1)).double().mean())


def exact_tracincp(recipe: lm.LMRecipe, checkpoints, train, test) -> np.ndarray:
    """sum_t lr_t <grad l_i(w_t), grad l_z(w_t)> over every checkpoint and all parameters, (N, M), from
    exact per-example gradients: one backward pass per example (``vmap`` over GPT-2's inputs stops at
    the data-dependent branches of its attention-mask code)."""
    model = TokenLM(recipe).eval()
    params = list(model.parameters())
    total = 0.0
    for checkpoint in checkpoints:
        model.load_state_dict(load_state_dict(checkpoint))

        def gradients(data):
            rows = []
            for ids, labels in zip(*data):
                loss = answer_nll(model(ids[None]), labels[None])[0]
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
            return torch.stack(rows).double()

        total = total + checkpoint.learning_rate * (gradients(train) @ gradients(test).T)
    return total.numpy()


@dataclass
class LMRun:
    """One LM case trained for the suite: reference checkpoints, loss tables, held-out LDS refits."""

    recipe: lm.LMRecipe
    checkpoints: list
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_losses: torch.Tensor  # (T, N)
    test_losses: torch.Tensor  # (T, M)
    test_accuracy: float
    holdout_masks: np.ndarray
    holdout_test_losses: np.ndarray  # (S, M)

    def access(self) -> ForwardAccess:
        return ForwardAccess(lambda: TokenLM(self.recipe), self.train, self.test, answer_nll)

    def tracincp(self) -> np.ndarray:
        return exact_tracincp(self.recipe, self.checkpoints, self.train, self.test)


def train_lm_case(case: LMCase, work: Path, holdout_models: int) -> LMRun:
    recipe = case.recipe
    train_frame, probe_frame = lm.task_examples(recipe)
    train, test = tensors(train_frame, recipe), tensors(probe_frame, recipe)
    folder = work / "checkpoints"
    model = fine_tune(recipe, train, folder)
    checkpoints = open_checkpoints(folder)
    scratch = TokenLM(recipe).eval()
    rows = []
    for checkpoint in checkpoints:
        scratch.load_state_dict(load_state_dict(checkpoint))
        rows.append((losses(scratch, train), losses(scratch, test)))
    masks = random_subsets(len(train[0]), holdout_models, seed=1)
    refits = []
    for mask in masks:
        keep = torch.from_numpy(mask)
        refits.append(losses(fine_tune(recipe, (train[0][keep], train[1][keep])), test).numpy())
    return LMRun(recipe, checkpoints, train, test, torch.stack([r[0] for r in rows]),
                 torch.stack([r[1] for r in rows]), answer_accuracy(model, test), masks, np.stack(refits))
