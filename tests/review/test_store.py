"""The decision store is durable, append-only, and refuses malformed decisions."""

from __future__ import annotations

import pytest

from z0inf_pipeline.influence.errors import InfluenceInputError
from z0inf_pipeline.review import DecisionStore

RUN = "0123456789abcdef0123456789abcdef"


def test_latest_decision_wins_and_history_is_kept(tmp_path):
    store = DecisionStore.open(tmp_path / "review.db")
    assert store.record(RUN, [5, 3, 5], "drop", reviewer="ana") == 2
    store.record(RUN, [7], "relabel", label=4, reviewer="ben", note="looks like a 4")
    store.record(RUN, [3], "keep", reviewer="ben")
    store.record("otherrun", [3], "drop")

    reopened = DecisionStore.open(tmp_path / "review.db")  # a new process sees the same decisions
    current = reopened.current(RUN)
    assert current["example_id"].tolist() == [3, 5, 7]
    assert current["action"].tolist() == ["keep", "drop", "relabel"]
    assert current["label"].tolist()[2] == 4
    assert current["label"].isna().tolist() == [True, True, False]
    history = reopened.history(RUN)
    assert list(zip(history["example_id"], history["action"])) == [
        (3, "drop"),
        (5, "drop"),
        (7, "relabel"),
        (3, "keep"),
    ]
    assert reopened.runs() == sorted([RUN, "otherrun"])


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((RUN, [1], "delete"), {}, "must be one of"),
        ((RUN, [1], "relabel"), {}, "needs the new label"),
        ((RUN, [1], "drop"), {"label": 2}, "only given with 'relabel'"),
        ((RUN, [], "drop"), {}, "no example ids"),
        ((RUN, ["x"], "drop"), {}, "not an integer"),
        (("../etc", [1], "drop"), {}, "not an MLflow run id"),
    ],
)
def test_malformed_decisions_are_refused_and_nothing_is_written(tmp_path, args, kwargs, message):
    store = DecisionStore.open(tmp_path / "review.db")
    with pytest.raises(InfluenceInputError, match=message):
        store.record(*args, **kwargs)
    assert store.history(RUN).empty


def test_empty_store_has_typed_empty_frames(tmp_path):
    store = DecisionStore.open(tmp_path / "nested" / "review.db")
    frame = store.current(RUN)
    assert frame.empty and list(frame.columns) == ["example_id", "action", "label", "reviewer", "note", "decided_at"]
