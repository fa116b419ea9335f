"""The durable store of review decisions: an append-only SQLite table in ``data_dir()/review.db``.

Pipeline runs only read it, so no re-materialisation can overwrite a decision; deciding again on
an example appends a newer row (the latest row wins) and the full history stays queryable.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Literal

import pandas as pd

from ..influence.errors import InfluenceInputError
from ..settings import data_dir
from .layout import check_run_id

Action = Literal["keep", "drop", "relabel"]
ACTIONS: tuple[str, ...] = ("keep", "drop", "relabel")
DECISION_COLUMNS = ["example_id", "action", "label", "reviewer", "note", "decided_at"]
LINEAGE_COLUMNS = [*DECISION_COLUMNS, "run_id", "sequence"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    example_id INTEGER NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('keep', 'drop', 'relabel')),
    label INTEGER CHECK ((action = 'relabel') = (label IS NOT NULL)),
    reviewer TEXT NOT NULL,
    note TEXT,
    decided_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_run ON decisions (run_id, example_id, id);
"""


def default_store_path() -> Path:
    return data_dir() / "review.db"


@dataclass(frozen=True)
class DecisionStore:
    """Review decisions of every run, in one SQLite file (default ``data_dir()/review.db``)."""

    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "DecisionStore":
        store = cls(Path(path) if path is not None else default_store_path())
        store.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(store._connect()) as conn, conn:
            conn.executescript(_SCHEMA)
        return store

    def record(
        self,
        run_id: str,
        example_ids: Iterable[int],
        action: str,
        *,
        label: int | None = None,
        reviewer: str | None = None,
        note: str | None = None,
    ) -> int:
        """Append one decision per example id (all or none); returns how many were recorded."""
        check_run_id(run_id)
        ids = sorted({_as_id(i) for i in example_ids})
        if not ids:
            raise InfluenceInputError("review decision: no example ids given")
        if action not in ACTIONS:
            raise InfluenceInputError(f"review decision: action {action!r} must be one of {list(ACTIONS)}")
        if action == "relabel":
            if label is None or int(label) < 0:
                raise InfluenceInputError("review decision: 'relabel' needs the new label (an integer >= 0)")
            label = int(label)
        elif label is not None:
            raise InfluenceInputError(f"review decision: a label is only given with 'relabel', not with {action!r}")
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        who = reviewer or _user()
        rows = [(run_id, i, action, label, who, note, stamp) for i in ids]
        with closing(self._connect()) as conn, conn:
            conn.executemany(
                "INSERT INTO decisions (run_id, example_id, action, label, reviewer, note, decided_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def current(self, run_id: str) -> pd.DataFrame:
        """The decision in force for each decided example of ``run_id`` (the latest one), by example id."""
        check_run_id(run_id)
        query = (
            "SELECT d.example_id, d.action, d.label, d.reviewer, d.note, d.decided_at FROM decisions d "
            "JOIN (SELECT MAX(id) AS id FROM decisions WHERE run_id = ? GROUP BY example_id) latest "
            "ON d.id = latest.id ORDER BY d.example_id"
        )
        return self._frame(query, (run_id,))

    def current_for_runs(self, run_ids: Iterable[str]) -> pd.DataFrame:
        """The decision in force for each (run, example) of ``run_ids`` (for a run's lineage), with
        ``run_id`` and ``sequence`` (the store's order of recording: larger is newer), oldest first."""
        runs = list(dict.fromkeys(run_ids))
        for run_id in runs:
            check_run_id(run_id)
        if not runs:
            raise InfluenceInputError("review store: current_for_runs needs at least one run id")
        marks = ", ".join("?" * len(runs))
        query = (
            f"SELECT {', '.join('d.' + c for c in DECISION_COLUMNS)}, d.run_id, d.id FROM decisions d "
            f"JOIN (SELECT MAX(id) AS id FROM decisions WHERE run_id IN ({marks}) GROUP BY run_id, example_id) latest "
            "ON d.id = latest.id ORDER BY d.id"
        )
        frame = self._frame(query, tuple(runs), LINEAGE_COLUMNS)
        frame["sequence"] = frame["sequence"].astype("int64")
        return frame

    def history(self, run_id: str) -> pd.DataFrame:
        """Every decision ever recorded for ``run_id``, oldest first."""
        check_run_id(run_id)
        query = f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions WHERE run_id = ? ORDER BY id"
        return self._frame(query, (run_id,))

    def runs(self) -> list[str]:
        with closing(self._connect()) as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT run_id FROM decisions ORDER BY run_id")]

    def _frame(self, query: str, params: tuple, columns: list[str] = DECISION_COLUMNS) -> pd.DataFrame:
        with closing(self._connect()) as conn:
            rows = conn.execute(query, params).fetchall()
        frame = pd.DataFrame(rows, columns=columns)
        frame["example_id"] = frame["example_id"].astype("int64")
        frame["label"] = frame["label"].astype("Int64")
        return frame

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as exc:
            raise InfluenceInputError(f"review store {self.path}: cannot be opened ({exc})") from None


def _as_id(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InfluenceInputError(f"review decision: example id {value!r} is not an integer") from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
