"""Every decision the store takes is bounded and named when refused: labels only from the run's label
set (its classes, or where it records none the labels its examples carry), ids within 64 bits, notes
of at most MAX_NOTE_CHARS, run ids without a trailing newline. Real store, real pipeline run, the CLI."""

from __future__ import annotations

import pandas as pd
import pytest

from z0inf_pipeline.cli import main
from z0inf_pipeline.errors import ReviewError
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review import DecisionStore, RunLayout, check_run_id, read_review_queue, write_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.review.store import MAX_NOTE_CHARS

from ..defs.conftest import contract_run, dagster_home, execute, instance  # noqa: F401 - fixtures


def test_relabels_to_labels_no_example_carries_are_refused_without_num_classes(instance, contract_run, capsys):
    assert execute(instance, "influence_job", contract_run).success
    layout = RunLayout.for_run(contract_run, outputs_base())
    queue, info = read_review_queue(layout.review_queue)
    write_review_queue(queue, layout.review_queue, {**info, "num_classes": None})  # as a ContractLogger run records it
    # a run whose examples carry no 4: inside [0, largest label], but not a label of this run
    examples = pd.read_parquet(layout.examples)
    examples.loc[examples["label"] == 4, "label"] = 5
    examples.to_parquet(layout.examples, index=False)
    seen = sorted(set(examples["label"].astype(int)))
    assert 4 not in seen and max(seen) > 4
    example = str(int(queue["example_id"].iloc[0]))
    for label in ("4", "999", "2147483648", "-1"):
        assert main(["review", "decide", contract_run, example, "--action", "relabel", "--label", label]) == 2
        err = capsys.readouterr().err
        assert f"label {label} is outside" in err and str(seen[-1]) in err and "Traceback" not in err, label
    assert DecisionStore.open().current(contract_run).empty
    assert main(["review", "decide", contract_run, example, "--action", "relabel", "--label", "3"]) == 0


def test_store_refuses_out_of_range_ids_labels_and_long_notes(tmp_path):
    store = DecisionStore.open(tmp_path / "review.db")
    with pytest.raises(ReviewError, match="64-bit"):
        store.record("run1", [99999999999999999999], "drop")
    with pytest.raises(ReviewError, match="label"):
        store.record("run1", [1], "relabel", label=2**31)
    with pytest.raises(ReviewError, match=f"at most {MAX_NOTE_CHARS}"):
        store.record("run1", [1], "drop", note="n" * (MAX_NOTE_CHARS + 1))
    assert store.history("run1").empty
    assert store.record("run1", [1], "drop", note="n" * MAX_NOTE_CHARS) == 1


def test_a_run_id_with_a_trailing_newline_is_not_a_run_id():
    with pytest.raises(InputError, match="not a valid MLflow run id"):
        check_run_id("abc123\n")
    assert check_run_id("abc123") == "abc123"
