"""The durable store of review decisions: an append-only SQLite table in ``data_dir()/review.db``.

Pipeline runs only read it, so no re-materialisation can overwrite a decision; deciding again on
an example appends a newer row (the latest row wins) and the full history stays queryable.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pandas as pd

from ..errors import ReviewError
from ..settings import data_dir
from .layout import check_run_id

Action = Literal["keep", "drop", "relabel"]
ACTIONS: tuple[str, ...] = ("keep", "drop", "relabel")
DECISION_COLUMNS = ["example_id", "action", "label", "reviewer", "note", "decided_at"]
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
        try:
            store.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReviewError(f"review store {store.path}: its folder cannot be created ({exc.strerror})") from None
        with store._connect() as conn, conn:
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
            raise ReviewError("review decision: no example ids given")
        if action not in ACTIONS:
            raise ReviewError(f"review decision: action {action!r} must be one of {list(ACTIONS)}")
        if action == "relabel":
            if label is None or int(label) < 0:
                raise ReviewError("review decision: 'relabel' needs the new label (an integer >= 0)")
            label = int(label)
        elif label is not None:
            raise ReviewError(f"review decision: a label is only given with 'relabel', not with {action!r}")
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        who = reviewer or _user()
        rows = [(run_id, i, action, label, who, note, stamp) for i in ids]
        with self._connect() as conn, conn:
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

    def history(self, run_id: str) -> pd.DataFrame:
        """Every decision ever recorded for ``run_id``, oldest first."""
        check_run_id(run_id)
        query = f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions WHERE run_id = ? ORDER BY id"
        return self._frame(query, (run_id,))

    def runs(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT run_id FROM decisions ORDER BY run_id")]

    def _frame(self, query: str, params: tuple) -> pd.DataFrame:
        with self._connect() as conn:
            rows = conn.execute(query, params).fetchall()
        frame = pd.DataFrame(rows, columns=DECISION_COLUMNS)
        frame["example_id"] = frame["example_id"].astype("int64")
        frame["label"] = frame["label"].astype("Int64")
        return frame

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection closed on exit; any SQLite failure (a corrupt file, "file is not a database",
        a locked or read-only store) becomes a ReviewError naming the store."""
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as conn:
                yield conn
        except sqlite3.Error as exc:
            raise ReviewError(f"review store {self.path}: cannot be used ({exc})") from None


def _as_id(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ReviewError(f"review decision: example id {value!r} is not an integer") from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
