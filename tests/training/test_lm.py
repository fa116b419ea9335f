"""The LM recipe: the generated task, a real fine-tune logged as a contract run, and its retraining."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

pytest.importorskip("transformers")

from z0inf_pipeline.errors import InputError  # noqa: E402
from z0inf_pipeline.review import CuratedSet, retrain_config  # noqa: E402
from z0inf_pipeline.integrations import train_and_log_recipe  # noqa: E402
from z0inf_pipeline.tracking import fetch_run  # noqa: E402
from z0inf_pipeline.training import TrainConfig  # noqa: E402
import torch  # noqa: E402

from z0inf_pipeline.training.lm import (  # noqa: E402
    EOS,
    VOCAB,
    answer_accuracy,
    IGNORE_INDEX,
    LMRecipe,
    SequenceDataset,
    decode,
    recipe_from_dict,
    task_examples,
)

SMALL = LMRecipe(n_train=60, n_probe=10, corrupt_fraction=0.2, pretrain_steps=5, epochs=1, checkpoints=3,
                 batch_size=16, n_embd=16)


def test_the_task_has_exactly_the_corrupted_fraction_wrong_and_probes_right():
    shift = {a: b for a, b in zip("abcdefgh", "bcdefgha")}
    answers = {"reversal": lambda s: s[::-1], "shift": lambda s: "".join(shift[c] for c in s)}
    for task, answer in answers.items():
        train, probe = task_examples(LMRecipe(task=task, n_train=500, n_probe=50, corrupt_fraction=0.1))
        right = np.array([answer(p[:-1]) == t for p, t in zip(train["prompt"], train["target"])])
        np.testing.assert_array_equal(~right, train["corrupted"].to_numpy())
        assert train["corrupted"].sum() == 50 and not probe["corrupted"].any()
        assert all(answer(p[:-1]) == t for p, t in zip(probe["prompt"], probe["target"]))
    assert set(train["example_id"]).isdisjoint(probe["example_id"])


def test_only_answer_tokens_are_labels():
    train, _ = task_examples(SMALL)
    item = SequenceDataset(train, SMALL.sequence_length)[0]
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert labelled[-1] == EOS and decode(labelled) == train.at[0, "target"]
    assert item["example_id"] == train.at[0, "example_id"]


def test_recipes_round_trip_and_refuse_relabels():
    assert recipe_from_dict(SMALL.to_dict()) == SMALL
    assert recipe_from_dict(TrainConfig().to_dict()) == TrainConfig()
    with pytest.raises(InputError, match="relabels"):
        retrain_config(SMALL, CuratedSet(pd.DataFrame(), (), {3: 1}))


def test_a_logged_lm_run_retrains_without_the_dropped_examples(tracking_uri, tmp_path):
    parent_id = train_and_log_recipe(SMALL, tracking_uri=tracking_uri)
    parent = fetch_run(parent_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    assert parent.tags["z0inf.contract"] == "2" and len(parent.steps) == 3
    examples = pd.read_parquet(parent.examples)
    train = examples[examples.split == "train"]
    assert train.flipped.sum() == 12 and train.prompt.str.endswith(">").all()
    child_recipe = retrain_config(recipe_from_dict(parent.train_config), CuratedSet(pd.DataFrame(), (3, 7), {}))
    child_id = train_and_log_recipe(child_recipe, tracking_uri=tracking_uri, parent_run_id=parent_id)
    child = fetch_run(child_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    child_train = pd.read_parquet(child.examples).query("split == 'train'")
    assert set(train.example_id) - set(child_train.example_id) == {3, 7}
    assert child.tags["z0inf.parent_run_id"] == parent_id and child.train_config["exclude_ids"] == [3, 7]
    assert 0.0 <= MlflowClient(tracking_uri).get_run(child_id).data.metrics["test_accuracy"] <= 1.0


def test_answer_accuracy_counts_whole_answers():
    train, _ = task_examples(SMALL)
    dataset = SequenceDataset(train.head(4), SMALL.sequence_length)
    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}

    class Oracle(torch.nn.Module):
        """Predicts the next token of each sequence exactly, except one answer token of sequence 2."""

        def forward(self, input_ids, attention_mask):
            logits = torch.full((*input_ids.shape, len(VOCAB)), -10.0)
            nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
            logits.scatter_(2, nxt[..., None], 10.0)
            logits[2, SMALL.sequence_length - 4] = 0.0  # inside sequence 2's answer: argmax now token 0
            return type("Out", (), {"logits": logits})()

    assert answer_accuracy(Oracle(), [batch]) == 0.75


def test_edited_targets_are_trained_on_and_checked_against_the_recipe():
    train, _ = task_examples(SMALL)
    wrong = int(train.index[train["corrupted"]][0])
    letters = "abcdefgh"  # the letter-shift answer, written out here
    right = "".join(letters[(letters.index(c) + 1) % 8] for c in train.at[wrong, "prompt"][:-1])
    edited, _ = task_examples(SMALL.replace(target_edits=((wrong, right), (1, "ab"))))
    assert edited.at[wrong, "target"] == right and not edited.at[wrong, "corrupted"]  # fixed: no longer injected noise
    assert edited.at[1, "target"] == "ab" and edited.at[1, "corrupted"]  # a wrong edit is still a wrong answer
    unchanged = ~edited["example_id"].isin([wrong, 1])
    assert edited.loc[unchanged, "target"].tolist() == train.loc[unchanged, "target"].tolist()
    for text, message in [("xyz", "outside the recipe's letters"), ("abcdefg", "an answer has 1 to 5"), ("", "1 to 5")]:
        with pytest.raises(InputError, match=message):
            SMALL.replace(target_edits=((0, text),))
    with pytest.raises(InputError, match="not training examples"):
        task_examples(SMALL.replace(target_edits=((SMALL.n_train, "ab"),)))

    # curation carries edits into an LM recipe (earlier rounds' kept, dropped ids' removed), never into a class recipe
    parent = SMALL.replace(target_edits=((2, "cc"), (3, "dd")))
    child = retrain_config(parent, CuratedSet(pd.DataFrame(), (3,), {}, {4: "ee"}))
    assert child.target_edits == ((2, "cc"), (4, "ee")) and child.exclude_ids == (3,)
    with pytest.raises(InputError, match="trains on class labels"):
        retrain_config(TrainConfig(), CuratedSet(pd.DataFrame(), (), {}, {4: "ee"}))
