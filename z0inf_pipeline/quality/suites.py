"""Great Expectations 1.x suites for the pipeline's tables: pure data checks that know nothing of Dagster.

The expectations live in the repository's GX project (``gx/``, a file data context: one JSON file per
suite under ``gx/expectations/``), where a data team reads and tunes them; ``$Z0INF_GX_DIR`` points at
another project. Every validation reads the suite afresh, so an edit holds from the next
materialisation on. Run-specific values (row counts, the cut-off of the flagging expectation) are
suite parameters (``{"$PARAMETER": "rows"}``) filled in here; a literal written over one wins.

Each ``validate_*`` function validates the real table (plus a few derived columns computed in one
vectorised pass, e.g. each loss row's lowest value or whether an id belongs to the loss table, so that a
suite never carries 10^5 ids) through a GX context whose stores are the run's ``gx/`` folder: the
validation result is stored there and the run's Data Docs are rebuilt (``SuiteReport.data_docs``).
GX is imported on first use only (about 3 s). The caller decides what a failure means (the Dagster
asset checks in ``z0inf_pipeline.defs.checks`` turn it into a blocking check result).
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..influence.loss_tables import step_column
from ..influence.signals import SIGNAL_COLUMNS

GX_DIR_ENV = "Z0INF_GX_DIR"
FLOAT_MAX = float(np.finfo(np.float64).max)
# Self-influence is a sum of squared norms, so >= 0 exactly; the quadratic form is evaluated in
# float32, whose rounding can leave values a hair below zero. Tolerate that much and no more.
SELF_INFLUENCE_RTOL = 1e-6
FLAGGING_SUITE = "flagging"
FLAG_SCORE_COLUMN = "flag_score"
# Results that need no per-row lists: counts and a 20-value sample of what broke an expectation.
BASIC = {"result_format": "BASIC"}
# The flagging suite lists its unexpected rows by example id: they are the review queue (its Data Docs
# page shows a sample of up to 200 of them, GX's most; the stored result lists every one).
FLAGGED_ROWS = {"result_format": "COMPLETE", "unexpected_index_column_names": ["example_id"], "partial_unexpected_count": 200,
                "return_unexpected_index_query": False}
DATA_DOCS = Path("uncommitted") / "data_docs" / "local_site"
VALIDATIONS = Path("uncommitted") / "validations"


def gx_project_dir() -> Path:
    """The GX project the suites are read from: ``$Z0INF_GX_DIR``, else the repository's ``gx/``."""
    chosen = os.environ.get(GX_DIR_ENV)
    path = Path(chosen) if chosen else Path(__file__).resolve().parents[2] / "gx"
    if not (path / "great_expectations.yml").is_file():
        raise InputError(f"GX project {path} (${GX_DIR_ENV}): has no great_expectations.yml")
    return path


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation: what was expected, on which column, and what was seen instead."""

    expectation: str
    column: str | None
    observed: str

    def __str__(self) -> str:
        where = f" on '{self.column}'" if self.column else ""
        return f"{self.expectation}{where}: {self.observed}"


@dataclass(frozen=True)
class SuiteReport:
    """Outcome of one suite on one table, and where its GX validation result and Data Docs are."""

    suite: str
    success: bool
    evaluated: int
    rows: int
    failures: tuple[ExpectationFailure, ...] = field(default=())
    validation_result: Path | None = None
    data_docs: Path | None = None  # the run's index of validations (``<run gx folder>/index.html``)
    gx_suite: str = ""  # the project's suite that was applied (``suite`` names the validated table)

    @property
    def pages(self) -> list[Path]:
        """The files a reader needs: the stored result, its page, the suite's page and the run's index."""
        if self.validation_result is None or self.data_docs is None:
            return []
        suite_page = self.data_docs.parent / DATA_DOCS / "expectations" / f"{self.gx_suite}.html"
        return [self.validation_result, self.data_docs_page, suite_page, self.data_docs]

    @property
    def data_docs_page(self) -> Path | None:
        """This validation's own Data Docs page (plain HTML: it opens offline)."""
        if self.validation_result is None or self.data_docs is None:
            return None
        stored = self.validation_result.parts
        relative = Path(*stored[stored.index("validations") + 1 :]).with_suffix(".html")
        return self.data_docs.parent / DATA_DOCS / "validations" / relative

    def summary(self) -> str:
        if self.success:
            return f"{self.suite}: all {self.evaluated} expectations met on {self.rows} rows"
        lines = [f"{self.suite}: {len(self.failures)} of {self.evaluated} expectations failed on {self.rows} rows"]
        lines += [f"  - {failure}" for failure in self.failures]
        return "\n".join(lines)


@dataclass(frozen=True)
class FlaggingResult:
    """The flagging expectation's verdict: its unexpected rows are the flagged examples."""

    report: SuiteReport
    flagged_ids: np.ndarray
    cutoff: float  # as the suite applied it (a literal in the suite file beats the policy's)
    mostly: float


def validate(
    suite_name: str,
    frame: pd.DataFrame,
    parameters: dict,
    *,
    folder: Path | None = None,
    batch: str | None = None,
    result_format: dict = BASIC,
):
    """Validate ``frame`` against the project's suite ``suite_name`` with ``parameters``: (report, GX result).

    ``folder``: the run's GX folder (stores and Data Docs), None for an in-memory validation.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )
    from great_expectations.data_context import EphemeralDataContext
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        FilesystemStoreBackendDefaults,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project = gx.get_context(mode="file", context_root_dir=str(gx_project_dir()))
    try:
        suite = project.suites.get(suite_name)
    except Exception as exc:  # GX raises its own not-found / parse errors: name the suite and the file
        raise InputError(
            f"GX suite {suite_name!r} ({gx_project_dir() / 'expectations' / (suite_name + '.json')}): {exc}"
        ) from None
    batch = batch or suite_name
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        stores = FilesystemStoreBackendDefaults(root_directory=str(folder))
    else:
        stores = InMemoryStoreBackendDefaults()
    config = DataContextConfig(
        store_backend_defaults=stores,
        data_docs_sites={} if folder is None else {"local_site": _docs_site(folder)},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    with _locked(folder):
        context = EphemeralDataContext(project_config=config)
        definition_suite = context.suites.add_or_update(
            gx.ExpectationSuite(name=suite_name, expectations=[_detached(e) for e in suite.expectations],
                                meta=suite.meta, notes=suite.notes)
        )
        data = context.data_sources.add_pandas("z0inf").add_dataframe_asset(batch).add_batch_definition_whole_dataframe(
            "run"
        )
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{suite_name}-{batch}", data=data, suite=definition_suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            result_format=result_format,
            run_id=RunIdentifier(run_name=batch),
        )
        docs = stored = None
        if folder is not None:
            stored = _stored_result(folder, suite_name, batch)
            # this validation's page and its suite's; not GX's index (it rereads every result of the run and
            # fills its table from public CDNs): the run's own index.html lists the pages instead
            with _quiet_suite_page_renderer():
                context.build_data_docs(resource_identifiers=[
                    ValidationResultIdentifier.from_tuple(stored.relative_to(folder / VALIDATIONS).with_suffix("").parts),
                    ExpectationSuiteIdentifier(name=suite_name),
                ], build_index=False)
            docs = _write_offline_index(folder)
    report = SuiteReport(batch, bool(result.success), len(result.results), len(frame),
                         tuple(_failure(r) for r in result.results if not r.success), stored, docs, suite_name)
    return report, result


def _docs_site(folder: Path) -> dict:
    """The run's Data Docs: the index, a page per validation and one per suite as it was applied."""
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder / DATA_DOCS)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


def _write_offline_index(folder: Path) -> Path:
    """``<folder>/index.html``: every stored validation of the run, newest first, linking to its Data Docs
    page and its suite's page (plain HTML, they open offline)."""
    import html
    import json

    from ..influence.atomic import atomic_output

    rows = []
    for result in sorted((folder / VALIDATIONS).glob("*/*/*/*.json"), reverse=True):
        suite, table, stamp = result.parts[-4:-1]
        page = (DATA_DOCS / "validations" / suite / table / stamp / result.name).with_suffix(".html").as_posix()
        success = json.loads(result.read_text()).get("success")
        suite_page = (DATA_DOCS / "expectations" / f"{suite}.html").as_posix()
        rows.append(f'<tr><td><a href="{html.escape(page)}">{html.escape(table)}</a></td>'
                    f'<td><a href="{html.escape(suite_page)}">{html.escape(suite)}</a></td>'
                    f'<td>{"passed" if success else "FAILED"}</td><td>{html.escape(stamp)}</td></tr>')
    text = (
        '<!doctype html><html><head><meta charset="utf-8"><title>GX validations of this run</title></head><body>'
        "<h1>GX validations of this run</h1><p>Suites from the repository's <code>gx/</code> project.</p>"
        "<table><thead><tr><th>table</th><th>suite</th><th>result</th><th>validated (UTC)</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></body></html>"
    )
    index = folder / "index.html"
    with atomic_output(index) as tmp:
        Path(tmp).write_text(text)
    return index


class _quiet_suite_page_renderer:
    """GX's suite page cannot describe ``expect_table_columns_to_match_ordered_list`` whose column list is
    a suite parameter (it indexes the ``$PARAMETER`` dict) and logs a traceback for it; the page is built
    without that one line, and the validation page shows the list applied. Silence that log only."""

    def __enter__(self):
        self.logger = logging.getLogger("great_expectations.render.renderer.content_block.content_block")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _detached(expectation):
    """A copy of a suite's expectation that belongs to no suite (GX refuses to share one)."""
    detached = copy.copy(expectation)
    detached.id = None
    return detached


class _locked:
    """An exclusive lock on the run's GX folder: two checks of a run may validate at once, and each
    rebuilds the Data Docs index from every result stored there."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def __enter__(self):
        if self.folder is not None:
            self.handle = open(self.folder / ".lock", "w")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.folder is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _stored_result(folder: Path, suite_name: str, batch: str) -> Path:
    """The newest stored validation result of ``batch`` (GX names it by run name and time)."""
    return sorted((folder / VALIDATIONS / suite_name / batch).glob("*/*.json"))[-1]


def _failure(outcome) -> ExpectationFailure:
    config = outcome.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column") or ", ".join(kwargs.get("column_list") or []) or None
    if kwargs.get("column_A"):
        column = f"{kwargs['column_A']}, {kwargs['column_B']}"
    if config.type == "expect_table_columns_to_match_ordered_list":
        column = None
    info = outcome.result or {}
    if outcome.exception_info and outcome.exception_info.get("raised_exception"):
        observed = f"could not be evaluated: {str(outcome.exception_info.get('exception_message'))[:200]}"
    elif "unexpected_count" in info:
        observed = f"{info['unexpected_count']} unexpected value(s), e.g. {_short(info.get('partial_unexpected_list') or [])}"
    else:
        observed = f"observed {_short(info.get('observed_value'), 12)}"
    return ExpectationFailure(config.type, column, observed)


# The pipeline's tables ---------------------------------------------------------------------------------


def validate_loss_table(
    frame: pd.DataFrame,
    steps: Sequence[int],
    expected_rows: int,
    *,
    name: str = "loss_table",
    nonnegative: bool = True,
    expected_ids: Sequence[int] | None = None,
    folder: Path | None = None,
) -> SuiteReport:
    """A loss table (suite ``loss_table``): ``example_id`` then one column per checkpoint in step order,
    one row per example of the split, unique ids, every loss finite (and >= 0 for a non-negative loss
    such as cross-entropy). Per row, ``nonfinite_losses`` and ``lowest_loss`` carry the step columns."""
    step_columns = [step_column(s) for s in steps]
    present = [c for c in step_columns if c in frame]
    values = frame[present].to_numpy(np.float64) if present else np.zeros((len(frame), 0))
    derived = frame.assign(
        example_id_in_split=_member(frame, "example_id", expected_ids),
        nonfinite_losses=(~np.isfinite(values)).sum(axis=1) + (len(step_columns) - len(present)),
        lowest_loss=values.min(axis=1, initial=np.inf),
    )
    parameters = {
        "table_columns": ["example_id", *step_columns, "example_id_in_split", "nonfinite_losses", "lowest_loss"],
        "rows": int(expected_rows),
        "loss_floor": 0.0 if nonnegative else -FLOAT_MAX,
    }
    return validate("loss_table", derived, parameters, folder=folder, batch=name)[0]


def validate_self_influence(
    frame: pd.DataFrame, loss_table_ids: Sequence[int], *, name: str = "self_influence", folder: Path | None = None
) -> SuiteReport:
    """The per-example scores (suite ``scores``): finite, self-influence >= 0 (up to float32 rounding),
    one row per training example of the loss table."""
    scale = float(np.abs(frame["self_influence"]).max()) if "self_influence" in frame and len(frame) else 0.0
    derived = frame.assign(example_id_in_loss_table=_member(frame, "example_id", loss_table_ids))
    parameters = {
        "table_columns": ["example_id", *SIGNAL_COLUMNS, "example_id_in_loss_table"],
        "rows": len(loss_table_ids),
        "self_influence_floor": -SELF_INFLUENCE_RTOL * scale if np.isfinite(scale) else 0.0,
    }
    return validate("scores", derived, parameters, folder=folder, batch=name)[0]


def validate_topk(
    frame: pd.DataFrame,
    train_ids: Sequence[int],
    test_ids: Sequence[int],
    k: int,
    *,
    name: str = "train_test_topk",
    folder: Path | None = None,
) -> SuiteReport:
    """Top-k train-test influence (suite ``topk``): k finite rows per test example (ranks 1..k unique per
    test example, k x tests rows), ids from the loss tables, proponents scored at least as high as opponents."""
    columns = ["test_example_id", "rank", "proponent_id", "proponent_score", "opponent_id", "opponent_score"]
    derived = frame.assign(
        test_example_id_in_loss_table=_member(frame, "test_example_id", test_ids),
        proponent_id_in_training_set=_member(frame, "proponent_id", train_ids),
        opponent_id_in_training_set=_member(frame, "opponent_id", train_ids),
    )
    parameters = {
        "table_columns": [*columns, "test_example_id_in_loss_table", "proponent_id_in_training_set",
                          "opponent_id_in_training_set"],
        "rows": len(test_ids) * int(k),
        "k": int(k),
    }
    return validate("topk", derived, parameters, folder=folder, batch=name)[0]


def validate_curated_set(
    frame: pd.DataFrame,
    train_ids: Sequence[int],
    dropped_ids: Sequence[int],
    relabels: dict[int, int],
    target_edits: dict[int, str] | None = None,
    *,
    name: str = "curated_training_set",
    folder: Path | None = None,
) -> SuiteReport:
    """A curated training set (suite ``curated_set``): training ids only, no dropped id, every relabel
    applied, every edited target text (the frame's ``target_text``) applied."""
    kept = np.setdiff1d(_as_ids(train_ids), _as_ids(dropped_ids))
    checked = frame[[c for c in ("example_id", "label") if c in frame]]
    ids = frame["example_id"].to_numpy(np.int64) if "example_id" in frame else np.zeros(0, np.int64)
    wanted = pd.Series(relabels, dtype="float64").reindex(ids).to_numpy() if relabels else np.full(len(ids), np.nan)
    labels = frame["label"].to_numpy(np.float64) if "label" in frame else np.full(len(ids), np.nan)
    applied = pd.array(labels == wanted, dtype="boolean")
    applied[np.isnan(wanted)] = pd.NA  # no relabel asked: nothing to check
    edited = pd.Series(target_edits or {}, dtype=object).reindex(ids)
    texts = frame["target_text"].to_numpy(object) if "target_text" in frame else np.full(len(ids), None, object)
    edit_applied = pd.array(edited.to_numpy(object) == texts, dtype="boolean")
    edit_applied[edited.isna().to_numpy()] = pd.NA  # no target edited: nothing to check
    derived = checked.assign(
        kept_training_example=np.isin(ids, kept),
        dropped_by_review=np.isin(ids, _as_ids(dropped_ids)),
        relabel_applied=applied,
        target_edit_applied=edit_applied,
    )
    parameters = {"rows": len(kept)}
    return validate("curated_set", derived, parameters, folder=folder, batch=name)[0]


def validate_flagging(
    example_ids: np.ndarray,
    flag_scores: np.ndarray,
    cutoff: float,
    max_unreviewed_fraction: float,
    *,
    folder: Path | None = None,
) -> FlaggingResult:
    """Flag by the suite ``flagging``: its ``expect_column_values_to_be_between`` on ``flag_score``
    (below the cut-off) lists the flagged examples as its unexpected rows. ``cutoff`` (the count
    policy's; inf: flag nothing) and ``mostly`` = 1 - ``max_unreviewed_fraction`` fill the suite's
    parameters: the expectation succeeds when the flagged share could stay unreviewed."""
    frame = pd.DataFrame({"example_id": np.asarray(example_ids, dtype=np.int64),
                          FLAG_SCORE_COLUMN: np.asarray(flag_scores, dtype=np.float64)})
    parameters = {"flag_cutoff": min(float(cutoff), FLOAT_MAX), "mostly": 1.0 - float(max_unreviewed_fraction)}
    report, result = validate(FLAGGING_SUITE, frame, parameters, folder=folder, result_format=FLAGGED_ROWS)
    flagging = [r for r in result.results if r.expectation_config.type == "expect_column_values_to_be_between"
                and r.expectation_config.kwargs.get("column") == FLAG_SCORE_COLUMN]
    if len(flagging) != 1:
        raise InputError(
            f"GX suite {FLAGGING_SUITE!r} ({gx_project_dir()}): needs exactly one expect_column_values_to_be_between "
            f"on {FLAG_SCORE_COLUMN!r} (its unexpected rows are the review queue), found {len(flagging)}"
        )
    outcome = flagging[0]
    if outcome.exception_info and outcome.exception_info.get("raised_exception"):
        raise InputError(f"GX suite {FLAGGING_SUITE!r}: the flagging expectation failed to run: "
                                  f"{outcome.exception_info.get('exception_message')}")
    rows = (outcome.result or {}).get("unexpected_index_list") or []
    flagged = np.asarray([int(row["example_id"]) for row in rows], dtype=np.int64)
    kwargs = outcome.expectation_config.kwargs
    applied = kwargs.get("max_value")
    return FlaggingResult(report, flagged, float("inf") if applied is None or applied >= FLOAT_MAX else float(applied),
                          float(kwargs.get("mostly", 1.0)))


def _member(frame: pd.DataFrame, column: str, ids) -> np.ndarray:
    """Whether each value of ``column`` is one of ``ids`` (all True when no ids are given)."""
    if column not in frame:
        return np.zeros(len(frame), dtype=bool)
    if ids is None:
        return np.ones(len(frame), dtype=bool)
    return np.isin(frame[column].to_numpy(), _as_ids(ids))


def _as_ids(ids) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _short(value, limit: int = 8) -> str:
    if isinstance(value, (list, tuple)):
        items = [v.item() if isinstance(v, np.generic) else v for v in value[:limit]]
        return repr(items) + (" ..." if len(value) > limit else "")
    return repr(value.item() if isinstance(value, np.generic) else value)
