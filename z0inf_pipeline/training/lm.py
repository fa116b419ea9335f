"""The paper's setting, offline and small: fine-tuning a tiny causal LM, with some answers wrong on purpose.

A GPT-2-style model (random init, ~10^5 parameters, nothing downloaded) is pretrained briefly on
a generated copying corpus (one task family), then fine-tuned through ``Z0InfCallback`` and a real
``transformers.Trainer`` on another: by default letter shifting (prompt ``"abcde>"``, answer
``"bcdef"``, each letter moved one place on, ``h`` wrapping to ``a``), which the model learns to a
held-out answer accuracy of 1.0 within the recipe's 4 epochs; string reversal (``"edcba"``) is the
harder option (``task="reversal"``: accuracy about 0.1 in the same budget). A known fraction of the
training answers is replaced by a random string. The run carries the
recipe as its ``train_config.json`` (``"recipe": "lm"``), so ``retrained_run`` can fine-tune it
again without the dropped examples and with the target answers reviewers edited (``target_edits``).
Needs the ``[hf]`` extra (transformers).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pydantic import field_validator, model_validator

from ..arguments import Settings
from ..errors import ConfigurationError
from .recording import IGNORE_INDEX

RECIPE = "lm"
REGISTERED_MODEL = "lm-letter-shift"  # every round of the recipe is a version of this registered model
ALPHABET = "abcdefgh"
# 0 pads, 1 starts a sequence, 2 ends one; then the separators and the letters.
VOCAB = ["<pad>", "<s>", "</s>", ">", "="] + list(ALPHABET)
PAD, BOS, EOS = 0, 1, 2


def _shifted(text: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(ch) + 1) % len(ALPHABET)] for ch in text)


def _complemented(text: str) -> str:
    return "".join(ALPHABET[len(ALPHABET) - 1 - ALPHABET.index(ch)] for ch in text)


# The fine-tuning tasks: the right answer to a prompt string (complement: a <-> h, b <-> g, ...).
TASKS = {"shift": _shifted, "complement": _complemented, "reversal": lambda text: text[::-1]}


class LMRecipe(Settings):
    """Fine-tuning a pretrained tiny GPT-2 on a generated string task, ``corrupt_fraction`` of answers wrong."""

    owner: ClassVar[str] = "lm recipe"

    recipe: str = RECIPE
    task: str = "shift"
    seed: int = 0
    n_train: int = 1200
    n_probe: int = 200
    string_length: int = 5
    corrupt_fraction: float = 0.1
    pretrain_steps: int = 300
    epochs: int = 4
    checkpoints: int = 12
    lr: float = 2e-3
    batch_size: int = 32
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    exclude_ids: tuple[int, ...] = ()
    relabels: tuple[tuple[int, int], ...] = ()
    # (training id, new target answer): a reviewer's ``edit_target`` decisions, applied by curation
    target_edits: tuple[tuple[int, str], ...] = ()

    @field_validator("target_edits", mode="after")
    @classmethod
    def _sorted_edits(cls, edits: tuple[tuple[int, str], ...]) -> tuple[tuple[int, str], ...]:
        return tuple(sorted(edits))

    @model_validator(mode="after")
    def _check(self) -> "LMRecipe":
        checks = [
            (self.recipe == RECIPE, "recipe", repr(RECIPE)),
            (self.task in TASKS, "task", f"one of {sorted(TASKS)}"),
            (self.relabels == (), "relabels", "empty: a sequence answer has no class to relabel to (drop it instead)"),
            (0.0 <= self.corrupt_fraction < 1.0, "corrupt_fraction", "in [0, 1)"),
            (self.n_train >= 2 and self.n_probe >= 1, "n_train", "at least 2 (and n_probe at least 1)"),
            (self.checkpoints >= 2, "checkpoints", "at least 2"),
            (2 <= self.string_length <= 8, "string_length", "between 2 and 8"),
        ]
        broken = next(((name, expected) for ok, name, expected in checks if not ok), None)
        if broken:
            raise ConfigurationError(f"lm recipe: {broken[0]}={getattr(self, broken[0])!r} must be {broken[1]}")
        for example_id, text in self.target_edits:
            if problem := self.target_text_problem(text):
                raise ConfigurationError(f"lm recipe: target_edits: example {example_id}: {problem}")
        return self

    @property
    def sequence_length(self) -> int:
        return 2 * self.string_length + 3  # <s> prompt > answer </s>

    def target_text_problem(self, text: str) -> str | None:
        """Why ``text`` cannot be a target answer of this recipe (letters of its alphabet, 1 to
        ``string_length`` of them, the room its sequences leave for an answer), or None."""
        if not 1 <= len(text) <= self.string_length:
            return f"the target {text!r} has {len(text)} letters; an answer has 1 to {self.string_length}"
        if stray := sorted(set(text) - set(ALPHABET)):
            return f"the target {text!r} has {''.join(stray)!r}, outside the recipe's letters {ALPHABET!r}"
        return None


# The LM demo: 1,200 letter-shift prompts, 10% of the answers wrong, 12 checkpoints over 4 epochs.
LM_DEMO_RECIPE = LMRecipe()


def recipe_from_dict(config: dict):
    """A run's ``train_config.json`` as the recipe object that retrains it: ``LMRecipe`` when it says
    ``"recipe": "lm"``, else ``TrainConfig``."""
    from .trainer import TrainConfig

    return LMRecipe.from_dict(config) if config.get("recipe") == RECIPE else TrainConfig.from_dict(config)


def encode(text: str) -> list[int]:
    return [VOCAB.index(ch) for ch in text]


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids if i > EOS)


def build_model(n_embd: int, n_layer: int, n_head: int, n_positions: int) -> torch.nn.Module:
    """The recipe's network, randomly initialised (the model spec's factory)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(VOCAB), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    # transformers infers the loss from the class name, which "GPT2LMHeadModel" does not spell: without this
    # it warns "`loss_type=None` ... unrecognized" and then uses the causal-LM loss anyway
    model.loss_type = "ForCausalLM"
    return model


def model_kwargs(recipe: LMRecipe) -> dict:
    return {"n_embd": recipe.n_embd, "n_layer": recipe.n_layer, "n_head": recipe.n_head,
            "n_positions": recipe.sequence_length}


def task_examples(recipe: LMRecipe) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, probe) frames: ``example_id``, ``prompt``, ``target`` (as trained), ``corrupted``. Probe
    answers are always right; a ``corrupt_fraction`` of training answers is a random other string,
    unless a reviewer edited it (``target_edits``: then ``corrupted`` says whether the edit is still wrong)."""
    rng = np.random.default_rng(recipe.seed)
    total = recipe.n_train + recipe.n_probe
    letters = rng.integers(0, len(ALPHABET), size=(total, recipe.string_length))
    strings = ["".join(ALPHABET[i] for i in row) for row in letters]
    targets = [TASKS[recipe.task](s) for s in strings]
    corrupted = np.zeros(total, dtype=bool)
    corrupted[rng.choice(recipe.n_train, size=round(recipe.corrupt_fraction * recipe.n_train), replace=False)] = True
    for i in np.flatnonzero(corrupted):
        wrong = "".join(ALPHABET[j] for j in rng.integers(0, len(ALPHABET), size=recipe.string_length))
        targets[i] = wrong if wrong != targets[i] else wrong[1:] + wrong[:1]
    edits = dict(recipe.target_edits)
    if unknown := sorted(set(edits) - set(range(recipe.n_train))):
        raise ConfigurationError(f"lm recipe: target_edits name ids that are not training examples: {unknown[:5]}")
    for i, text in edits.items():
        targets[i] = text
        corrupted[i] = text != TASKS[recipe.task](strings[i])
    frame = pd.DataFrame({"example_id": np.arange(total, dtype=np.int64), "prompt": [s + ">" for s in strings],
                          "target": targets, "corrupted": corrupted})
    return frame.iloc[: recipe.n_train].reset_index(drop=True), frame.iloc[recipe.n_train :].reset_index(drop=True)


class SequenceDataset(torch.utils.data.Dataset):
    """Prompt/answer pairs as fixed-length token sequences; only the answer tokens (and </s>) are labels."""

    def __init__(self, frame: pd.DataFrame, length: int) -> None:
        self.ids = frame["example_id"].to_numpy(np.int64)
        self.prompts, self.targets, self.length = list(frame["prompt"]), list(frame["target"]), length

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        prompt, answer = [BOS, *encode(self.prompts[index])], [*encode(self.targets[index]), EOS]
        tokens = prompt + answer
        pad = self.length - len(tokens)
        labels = [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * pad
        return {"example_id": int(self.ids[index]), "input_ids": torch.tensor(tokens + [PAD] * pad),
                "attention_mask": torch.tensor([1] * len(tokens) + [0] * pad), "labels": torch.tensor(labels)}


def probe_inputs(recipe: LMRecipe) -> dict[str, np.ndarray]:
    """The probe (held-out) examples as one batch of token arrays: ``input_ids``, ``attention_mask``,
    ``labels`` (what the registered LM scores)."""
    _, probe = task_examples(recipe)
    dataset = SequenceDataset(probe, recipe.sequence_length)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset), shuffle=False)))
    return {key: batch[key].numpy() for key in ("input_ids", "attention_mask", "labels")}


def answer_accuracy(model: torch.nn.Module, batches) -> float:
    """Share of examples whose every answer token (and </s>) is the model's top prediction, teacher-forced."""
    right = total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        wrong = (logits.argmax(dim=-1) != labels) & (labels != IGNORE_INDEX)
        right += int((~wrong.any(dim=1)).sum())
        total += len(labels)
    return right / total


def answer_predictions(model: torch.nn.Module, examples: pd.DataFrame, recipe: LMRecipe) -> pd.DataFrame:
    """The model's answer to every example of a run's examples table (``example_id``, ``split``,
    ``prompt``, ``target``), read as ``answer_accuracy`` scores it: the top token at each answer position,
    teacher-forced. Columns of a predictions table: ``predicted_text``, ``correct`` (every answer token
    and </s> right), ``confidence`` (the probability of the model's own answer, the product over its
    tokens), and ``label`` / ``predicted_label`` = NO_LABEL: a text answer has no class."""
    from .layout import NO_LABEL

    data = SequenceDataset(examples.reset_index(drop=True), recipe.sequence_length)
    answers, right, confidence = [], [], []
    model = model.eval()
    with torch.no_grad():
        for start in range(0, len(data), 256):
            batch = [data[i] for i in range(start, min(start + 256, len(data)))]
            tokens = torch.stack([b["input_ids"] for b in batch])
            mask = torch.stack([b["attention_mask"] for b in batch])
            labels = torch.stack([b["labels"] for b in batch])[:, 1:]
            probs = torch.softmax(model(input_ids=tokens, attention_mask=mask).logits[:, :-1].double(), dim=-1)
            top, predicted = probs.max(dim=-1)
            answer = labels != IGNORE_INDEX
            right += ((predicted == labels) | ~answer).all(dim=1).tolist()
            confidence += torch.where(answer, top, torch.ones_like(top)).prod(dim=1).tolist()
            answers += [decode(row[keep].tolist()) for row, keep in zip(predicted, answer)]
    return pd.DataFrame({
        "example_id": examples["example_id"].to_numpy(np.int64),
        "split": examples["split"].to_numpy(),
        "label": NO_LABEL,
        "predicted_label": NO_LABEL,
        "confidence": confidence,
        "predicted_text": answers,
        "correct": right,
    })


def pretrained_model(recipe: LMRecipe) -> torch.nn.Module:
    """The base model: random init, then ``pretrain_steps`` of next-token training on generated copying
    text (``"abcde=abcde"``). Deterministic in the seed, so a retraining starts from the same base."""
    torch.manual_seed(recipe.seed)
    model = build_model(**model_kwargs(recipe))
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    model.train()
    for _ in range(recipe.pretrain_steps):
        letters = torch.randint(len(VOCAB) - len(ALPHABET), len(VOCAB), (recipe.batch_size, recipe.string_length),
                                generator=generator)
        tokens = torch.cat([torch.full((recipe.batch_size, 1), BOS), letters,
                            torch.full((recipe.batch_size, 1), VOCAB.index("=")), letters,
                            torch.full((recipe.batch_size, 1), EOS)], dim=1)
        logits = model(input_ids=tokens).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model
