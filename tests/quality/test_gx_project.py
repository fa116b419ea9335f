"""The repository's GX project is what the pipeline validates with: its suites load, a threshold edited
in a suite file changes the next validation, and every validation is stored with its Data Docs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.defs.conftest import REPO_ROOT
from z0inf_pipeline.quality import gx_project_dir, validate_flagging, validate_loss_table
from z0inf_pipeline.quality.suites import GX_DIR_ENV

SUITES = {"loss_table", "scores", "topk", "curated_set", "flagging"}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the repository's gx/ that a test may edit, in force through $Z0INF_GX_DIR."""
    copy = tmp_path / "gx"
    shutil.copytree(REPO_ROOT / "gx", copy, ignore=shutil.ignore_patterns("uncommitted"))
    monkeypatch.setenv(GX_DIR_ENV, str(copy))
    return copy


def _edit(project, suite: str, expectation: str, column: str, **kwargs) -> None:
    """Set kwargs of one expectation in a suite file, as a person editing the JSON would."""
    path = project / "expectations" / f"{suite}.json"
    document = json.loads(path.read_text())
    [target] = [e for e in document["expectations"] if e["type"] == expectation and e["kwargs"].get("column") == column]
    target["kwargs"].update(kwargs)
    path.write_text(json.dumps(document, indent=2))


def test_the_repository_project_holds_every_suite():
    assert gx_project_dir() == REPO_ROOT / "gx"
    assert {p.stem for p in (REPO_ROOT / "gx" / "expectations").glob("*.json")} == SUITES
    for suite in SUITES:
        document = json.loads((REPO_ROOT / "gx" / "expectations" / f"{suite}.json").read_text())
        assert document["name"] == suite and document["notes"] and document["expectations"]


def test_flagging_is_the_unexpected_rows_of_the_suite_and_an_edited_cutoff_holds_next_time(project, tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(5000) * 3 + 7
    scores = rng.gamma(1.0, 1.0, 5000)
    cutoff = float(np.sort(scores)[-60])  # the policy's: the 60 highest
    first = validate_flagging(ids, scores, cutoff, 0.0, folder=tmp_path / "run1")
    assert set(first.flagged_ids) == set(ids[scores >= cutoff]) and len(first.flagged_ids) == 60
    assert first.cutoff == cutoff and not first.report.success  # mostly = 1: anything flagged fails
    # a budget share that covers the flagged share: the expectation holds (mostly = 1 - 0.02)
    assert validate_flagging(ids, scores, cutoff, 0.02).report.success

    _edit(project, "flagging", "expect_column_values_to_be_between", "flag_score", max_value=4.0)
    second = validate_flagging(ids, scores, cutoff, 0.0, folder=tmp_path / "run2")
    assert second.cutoff == 4.0  # the literal in the suite beats the policy's parameter
    assert set(second.flagged_ids) == set(ids[scores >= 4.0]) and len(second.flagged_ids) != 60


def test_an_edited_loss_threshold_fails_a_table_that_passed(project):
    frame = pd.DataFrame({"example_id": np.arange(4), "step_0": [0.1, 0.5, 2.0, 0.3], "step_5": [0.05, 0.2, 1.0, 0.1]})
    assert validate_loss_table(frame, [0, 5], 4).success
    _edit(project, "loss_table", "expect_column_values_to_be_between", "lowest_loss", max_value=0.9)
    report = validate_loss_table(frame, [0, 5], 4)
    assert not report.success
    assert [(f.column, f.observed) for f in report.failures] == [("lowest_loss", "1 unexpected value(s), e.g. [1.0]")]


def test_each_validation_is_stored_with_data_docs_that_list_every_run_validation(tmp_path):
    folder = tmp_path / "gx"
    frame = pd.DataFrame({"example_id": np.arange(3), "step_0": [0.1, 0.2, 0.3], "step_5": [0.1, 0.1, 0.1]})
    loss = validate_loss_table(frame, [0, 5], 3, folder=folder, name="train_loss_table")
    flags = validate_flagging(np.arange(3), np.array([0.1, 5.0, 0.2]), 1.0, 0.0, folder=folder)
    stored = json.loads(flags.report.validation_result.read_text())
    [between] = [r for r in stored["results"] if r["expectation_config"]["type"] == "expect_column_values_to_be_between"]
    assert between["expectation_config"]["kwargs"]["max_value"] == 1.0
    assert between["result"]["unexpected_index_list"] == [{"flag_score": 5.0, "example_id": 1}]
    index = flags.report.data_docs.read_text()
    for report in (loss, flags.report):
        assert all(page.is_file() for page in report.pages)
        assert report.data_docs_page.relative_to(folder).as_posix() in index
