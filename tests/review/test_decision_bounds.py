"""Every decision the store takes is bounded and named when refused: labels only from the run's label
set (its classes, or where it records none the labels its examples carry), ids within 64 bits, notes
of at most MAX_NOTE_CHARS, run ids without a trailing newline. Real store, real pipeline run, the CLI."""

from __future__ import annotations

import pytest

from z0inf_pipeline.cli import main
from z0inf_pipeline.errors import ReviewError
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review import DecisionStore, RunLayout, check_run_id, read_review_queue, write_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.review.store import MAX_NOTE_CHARS

from ..defs.conftest import contract_run, dagster_home, execute, instance  # noqa: F401 - fixtures


def test_relabels_outside_the_labels_a_run_has_are_refused_without_num_classes(instance, contract_run, capsys):
    assert execute(instance, "influence_job", contract_run).success
    path = RunLayout.for_run(contract_run, outputs_base()).review_queue
    queue, info = read_review_queue(path)
    write_review_queue(queue, path, {**info, "num_classes": None})  # as a ContractLogger run records it
    example = str(int(queue["example_id"].iloc[0]))
    for label in ("999", "2147483648", "-1"):
        assert main(["review", "decide", contract_run, example, "--action", "relabel", "--label", label]) == 2
        err = capsys.readouterr().err
        assert "outside" in err and "Traceback" not in err, label
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
