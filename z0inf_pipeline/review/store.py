"""The durable store of review decisions: one append-only table in a SQL database.

By default a SQLite file, ``data_dir()/review.db``; a team points ``$Z0INF_REVIEW_STORE_URL`` (or
``DecisionStore.open(url)``) at PostgreSQL, e.g. ``postgresql+psycopg2://user:pass@host:5432/z0inf``.
Pipeline runs only read it, so no re-materialisation can overwrite a decision; deciding again on
an example appends a newer row (the latest row wins) and the full history stays queryable.

A text run's answer has no class to relabel to: its correction is ``edit_target``, which keeps the new
target text in ``target_text``. Stores written before that action existed are migrated in place when
opened (in one transaction: every decision is kept, with its id and so its order).
"""

from __future__ import annotations

import getpass
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from ..errors import ReviewError
from ..settings import data_dir
from .layout import check_run_id

Action = Literal["keep", "drop", "relabel", "edit_target"]
ACTIONS: tuple[str, ...] = ("keep", "drop", "relabel", "edit_target")
DECISION_COLUMNS = ["example_id", "action", "label", "target_text", "reviewer", "note", "decided_at"]
LINEAGE_COLUMNS = [*DECISION_COLUMNS, "run_id", "sequence"]
STORE_URL_ENV = "Z0INF_REVIEW_STORE_URL"
# A note is a reason, not a document: longer ones are refused (the page answers 400), so no decision
# can make the store, the page or the sheet huge.
MAX_NOTE_CHARS = 400
MAX_REVIEWER_CHARS = 100
# A target answer is one line of text a model is trained to produce, not a document.
MAX_TARGET_CHARS = 400
_INT64 = (-(2**63), 2**63 - 1)
_INT32_MAX = 2**31 - 1  # the label column's type
# Any constant works: it only serialises schema creation between processes opening a new Postgres store.
_SCHEMA_LOCK = 0x7A30696E66

_ACTION_RULE = "action IN ('keep', 'drop', 'relabel', 'edit_target')"
_LABEL_RULE = "(action = 'relabel') = (label IS NOT NULL)"
_TARGET_RULE = "(action = 'edit_target') = (target_text IS NOT NULL)"

_metadata = sa.MetaData()
# The table (and index) the SQLite-only store created, plus ``target_text`` (added last, so a migrated
# store has its columns in the same order as a new one).
decisions = sa.Table(
    "decisions",
    _metadata,
    # 64-bit ids everywhere (SQLite's INTEGER already is one, and only it makes the row id autoincrement)
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("example_id", sa.BigInteger, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("label", sa.Integer),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("decided_at", sa.Text, nullable=False),
    sa.Column("target_text", sa.Text),
    sa.CheckConstraint(_ACTION_RULE, name="decisions_action"),
    sa.CheckConstraint(_LABEL_RULE, name="decisions_label_iff_relabel"),
    sa.CheckConstraint(_TARGET_RULE, name="decisions_target_iff_edit"),
    sa.Index("decisions_by_run", "run_id", "example_id", "id"),
    # AUTOINCREMENT: SQLite never reuses an id, so "the highest id is the latest decision" always holds.
    sqlite_autoincrement=True,
)


def default_store_path() -> Path:
    return data_dir() / "review.db"


def default_store_url() -> str:
    """``$Z0INF_REVIEW_STORE_URL``, else the SQLite file ``data_dir()/review.db``."""
    return os.environ.get(STORE_URL_ENV) or f"sqlite:///{default_store_path()}"


@dataclass(frozen=True)
class DecisionStore:
    """Review decisions of every run, in one database (default: the SQLite file ``data_dir()/review.db``)."""

    url: str

    @classmethod
    def open(cls, url: str | os.PathLike | None = None) -> "DecisionStore":
        """``url``: a SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg2://...``) or a SQLite file
        path; unset: ``default_store_url()``. Creates the table on first use."""
        if url is None:
            url = default_store_url()
        elif isinstance(url, os.PathLike) or "://" not in str(url):
            url = f"sqlite:///{Path(url)}"
        store = cls(str(url))
        if store.path is not None:
            try:
                store.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ReviewError(f"review store {store.path}: its folder cannot be created ({exc.strerror})") from None
        with store._transaction(create=True) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
            if sa.inspect(conn).has_table(decisions.name):
                _add_target_text(conn)
            else:
                _metadata.create_all(conn)
        return store

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a database server."""
        parsed = self._parsed_url()
        return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None

    @property
    def location(self) -> str:
        """Where the decisions are, for people: the SQLite file, or the URL without its password."""
        return str(self.path) if self.path is not None else self._parsed_url().render_as_string(hide_password=True)

    def record(
        self,
        run_id: str,
        example_ids: Iterable[int],
        action: str,
        *,
        label: int | None = None,
        target_text: str | None = None,
        reviewer: str | None = None,
        note: str | None = None,
    ) -> int:
        """Append one decision per example id (all or none); returns how many were recorded.
        ``label``: the new class, with ``relabel`` only; ``target_text``: the new target answer of a
        text example, with ``edit_target`` only."""
        check_run_id(run_id)
        ids = sorted({as_example_id(i) for i in example_ids})
        if not ids:
            raise ReviewError("review decision: no example ids given")
        if action not in ACTIONS:
            raise ReviewError(f"review decision: action {action!r} must be one of {list(ACTIONS)}")
        if action == "relabel":
            if label is None or not 0 <= int(label) <= _INT32_MAX:
                raise ReviewError(f"review decision: 'relabel' needs the new label (an integer in [0, {_INT32_MAX}])")
            label = int(label)
        elif label is not None:
            raise ReviewError(f"review decision: a label is only given with 'relabel', not with {action!r}")
        if action == "edit_target":
            target_text = check_target_text(target_text)
        elif target_text is not None:
            raise ReviewError(f"review decision: a target text is only given with 'edit_target', not with {action!r}")
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise ReviewError(f"review decision: the note has {len(note)} characters; at most {MAX_NOTE_CHARS} are kept")
        who = reviewer or _user()
        if len(who) > MAX_REVIEWER_CHARS:
            raise ReviewError(f"review decision: the reviewer name has {len(who)} characters; at most {MAX_REVIEWER_CHARS}")
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [
            {"run_id": run_id, "example_id": i, "action": action, "label": label, "target_text": target_text,
             "reviewer": who, "note": note, "decided_at": stamp}
            for i in ids
        ]
        with self._transaction() as conn:
            conn.execute(decisions.insert(), rows)
        return len(rows)

    def current(self, run_id: str) -> pd.DataFrame:
        """The decision in force for each decided example of ``run_id`` (the latest one), by example id."""
        check_run_id(run_id)
        latest = _latest_ids(decisions.c.run_id == run_id, decisions.c.example_id)
        query = (
            sa.select(*_columns())
            .join(latest, decisions.c.id == latest.c.id)
            .order_by(decisions.c.example_id)
        )
        return self._frame(query)

    def current_for_runs(self, run_ids: Iterable[str], *, through: int | None = None) -> pd.DataFrame:
        """The decision in force for each (run, example) of ``run_ids`` (for a run's lineage), with
        ``run_id`` and ``sequence`` (the store's order of recording: larger is newer), oldest first.

        ``through``: a ``high_water_mark()``; only decisions recorded up to it count (the store as it
        was then), so a retrain and the checks on it see one snapshot however many decisions follow."""
        runs = list(dict.fromkeys(run_ids))
        for run_id in runs:
            check_run_id(run_id)
        if not runs:
            raise ReviewError("review store: current_for_runs needs at least one run id")
        where = decisions.c.run_id.in_(runs)
        if through is not None:
            where = where & (decisions.c.id <= int(through))
        latest = _latest_ids(where, decisions.c.run_id, decisions.c.example_id)
        query = (
            sa.select(*_columns(), decisions.c.run_id, decisions.c.id)
            .join(latest, decisions.c.id == latest.c.id)
            .order_by(decisions.c.id)
        )
        frame = self._frame(query, LINEAGE_COLUMNS)
        frame["sequence"] = frame["sequence"].astype("int64")
        return frame

    def high_water_mark(self) -> int:
        """The sequence number of the latest decision recorded (0 for an empty store): every decision
        acknowledged so far has a sequence at most this, every later one a larger sequence (SQLite
        writes one transaction at a time; on PostgreSQL a decision still committing may get a smaller
        one, which the curation check then reports instead of passing)."""
        with self._transaction() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(decisions.c.id), 0))).scalar_one())

    def history(self, run_id: str) -> pd.DataFrame:
        """Every decision ever recorded for ``run_id``, oldest first."""
        check_run_id(run_id)
        return self._frame(sa.select(*_columns()).where(decisions.c.run_id == run_id).order_by(decisions.c.id))

    def runs(self) -> list[str]:
        query = sa.select(decisions.c.run_id).distinct().order_by(decisions.c.run_id)
        with self._transaction() as conn:
            return [row[0] for row in conn.execute(query)]

    def _frame(self, query: sa.Select, columns: list[str] = DECISION_COLUMNS) -> pd.DataFrame:
        with self._transaction() as conn:
            rows = conn.execute(query).fetchall()
        frame = pd.DataFrame([tuple(r) for r in rows], columns=columns)
        frame["example_id"] = frame["example_id"].astype("int64")
        frame["label"] = frame["label"].astype("Int64")
        return frame

    @contextmanager
    def _transaction(self, *, create: bool = False) -> Iterator[sa.Connection]:
        """One transaction: committed when the block ends, rolled back (nothing written) on an error.
        Only ``open`` creates a SQLite file: one deleted while in use is an error naming it, not an
        empty store silently put in its place (the server recovers as soon as the file is back)."""
        if not create and self.path is not None and not self.path.exists():
            raise ReviewError(
                f"review store {self.path}: the file is gone (deleted or moved while in use); restore it from a "
                "backup, or run `z0inf review list` to start an empty store there"
            )
        engine = _engine(self.url)
        if create:  # SQLite: the schema is read and perhaps changed under one write lock, taken first
            engine = engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        try:
            with engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            raise ReviewError(f"review store {self.location}: cannot be used ({type(reason).__name__}: {reason})") from None

    def _parsed_url(self) -> sa.URL:
        try:
            return make_url(self.url)
        except sa.exc.ArgumentError:
            raise ReviewError(f"review store: {self.url!r} is not a database URL or a file path") from None


def check_target_text(text) -> str:
    """A new target answer as the store keeps it: one line, not empty, at most MAX_TARGET_CHARS
    characters (leading and trailing spaces kept: they may be part of the answer)."""
    if not isinstance(text, str) or not text.strip():
        raise ReviewError("review decision: 'edit_target' needs the new target text (not empty)")
    if "\n" in text or "\r" in text:
        raise ReviewError(f"review decision: the target text {text[:40]!r} spans lines; a target is one line")
    if len(text) > MAX_TARGET_CHARS:
        raise ReviewError(f"review decision: the target text has {len(text)} characters; at most {MAX_TARGET_CHARS}")
    return text


def _add_target_text(conn: sa.Connection) -> None:
    """Migrate a store written before ``edit_target`` existed: add the ``target_text`` column and
    widen the action rule, keeping every row (with its id). Runs inside ``open``'s transaction, so
    a failure leaves the store as it was. SQLite cannot change a table's CHECK rules in place: the
    table is copied into a new one, which then takes the old one's name."""
    if "target_text" in {c["name"] for c in sa.inspect(conn).get_columns(decisions.name)}:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(sa.text("ALTER TABLE decisions ADD COLUMN target_text TEXT"))
        conn.execute(sa.text("ALTER TABLE decisions DROP CONSTRAINT IF EXISTS decisions_action"))
        conn.execute(sa.text(f"ALTER TABLE decisions ADD CONSTRAINT decisions_action CHECK ({_ACTION_RULE})"))
        conn.execute(sa.text(f"ALTER TABLE decisions ADD CONSTRAINT decisions_target_iff_edit CHECK ({_TARGET_RULE})"))
        return
    old = [c["name"] for c in sa.inspect(conn).get_columns(decisions.name)]
    conn.execute(sa.text("ALTER TABLE decisions RENAME TO decisions_before_target_text"))
    conn.execute(sa.text("DROP INDEX IF EXISTS decisions_by_run"))
    _metadata.create_all(conn)
    columns = ", ".join(old)
    conn.execute(sa.text(f"INSERT INTO decisions ({columns}) SELECT {columns} FROM decisions_before_target_text"))
    conn.execute(sa.text("DROP TABLE decisions_before_target_text"))


def _latest_ids(where, *group_by: sa.Column) -> sa.Subquery:
    """The id of the latest decision (the highest id) of each ``group_by`` group among the rows ``where`` selects."""
    return sa.select(sa.func.max(decisions.c.id).label("id")).where(where).group_by(*group_by).subquery()


def _columns() -> list[sa.Column]:
    return [decisions.c[name] for name in DECISION_COLUMNS]


@lru_cache(maxsize=None)
def _engine(url: str) -> sa.Engine:
    """One engine per URL. No pool: each operation connects afresh, so a forked worker never shares a
    connection with its parent, and SQLite waits up to 30 s for another writer's lock. On SQLite each
    transaction is opened with an explicit BEGIN (Python's sqlite3 would otherwise commit before a
    schema change), so a migration is all or nothing like any other write."""
    try:
        parsed = make_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        engine = sa.create_engine(parsed, poolclass=NullPool,
                                  connect_args={"timeout": 30} if sqlite else {"connect_timeout": 30})
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ReviewError(f"review store {url!r}: cannot be opened ({exc})") from None
    if sqlite:
        @sa.event.listens_for(engine, "connect")
        def _driver_leaves_transactions_alone(dbapi_connection, _record):
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))
    return engine


def as_example_id(value) -> int:
    """An example id as the store keeps it: an integer in the 64-bit range, else a ReviewError naming it."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ReviewError(f"review decision: example id {value!r} is not an integer") from None
    if not _INT64[0] <= number <= _INT64[1]:
        raise ReviewError(f"review decision: example id {value!r} is outside the 64-bit range of example ids")
    return number


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
