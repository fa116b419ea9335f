"""The decision store is durable, append-only, and refuses malformed decisions: on its default SQLite
file and on a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing

import pandas as pd
import pytest

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review import DecisionStore

RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path) -> str:
    """Where a fresh store lives: a SQLite file path (the default kind), or a new Postgres database."""
    if request.param == "sqlite":
        return str(tmp_path / "review.db")
    server = request.getfixturevalue("postgres_server")
    return server.url(server.create_database())


def test_latest_decision_wins_and_history_is_kept(store_url):
    store = DecisionStore.open(store_url)
    assert store.record(RUN, [5, 3, 5], "drop", reviewer="ana") == 2
    store.record(RUN, [7], "relabel", label=4, reviewer="ben", note="looks like a 4")
    store.record(RUN, [3], "keep", reviewer="ben")
    store.record("otherrun", [3], "drop")

    reopened = DecisionStore.open(store_url)  # a new process sees the same decisions
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
        ((RUN, [1], "edit_target"), {}, "needs the new target text"),
        ((RUN, [1], "edit_target"), {"target_text": "  "}, "needs the new target text"),
        ((RUN, [1], "edit_target"), {"target_text": "ab\ncd"}, "spans lines"),
        ((RUN, [1], "edit_target"), {"target_text": "a" * 401}, "at most 400"),
        ((RUN, [1], "keep"), {"target_text": "abc"}, "only given with 'edit_target'"),
        ((RUN, [], "drop"), {}, "no example ids"),
        ((RUN, ["x"], "drop"), {}, "not an integer"),
        (("../etc", [1], "drop"), {}, "not a valid MLflow run id"),
    ],
)
def test_malformed_decisions_are_refused_and_nothing_is_written(store_url, args, kwargs, message):
    store = DecisionStore.open(store_url)
    with pytest.raises(InputError, match=message):
        store.record(*args, **kwargs)
    assert store.history(RUN).empty


def test_empty_store_has_typed_empty_frames(tmp_path):
    store = DecisionStore.open(tmp_path / "nested" / "review.db")
    frame = store.current(RUN)
    assert frame.empty and list(frame.columns) == [
        "example_id", "action", "label", "target_text", "reviewer", "note", "decided_at"
    ]


def _decide_in_turn(url: str, writer: int, rounds: int) -> None:
    store = DecisionStore.open(url)  # every writer opens the store itself, as separate CLI calls would
    for i in range(rounds):
        action = ("keep", "drop", "relabel")[(writer + i) % 3]
        label = writer if action == "relabel" else None
        store.record(RUN, [i % 7, 100 + writer], action, label=label, reviewer=f"writer-{writer}", note=str(i))


def test_concurrent_writers_lose_nothing_and_the_latest_wins(store_url):
    writers, rounds = 4, 15
    DecisionStore.open(store_url)
    # spawn, not fork: a forked child runs the after-fork hooks of whatever the test process holds (kombu's
    # pools from the Celery tests block in them on Redis), while a spawned one starts clean, as a CLI call does
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_decide_in_turn, args=(store_url, w, rounds)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * writers

    store = DecisionStore.open(store_url)
    history = store.history(RUN)
    assert len(history) == writers * rounds * 2  # every decision of every writer is kept
    for writer in range(writers):  # each writer's own decisions appear in the order it made them
        notes = history.loc[history["reviewer"] == f"writer-{writer}", "note"].astype(int).tolist()
        assert notes == sorted(notes) and len(notes) == 2 * rounds
    # brute force: the last row of the history per example is the decision in force
    expected = history.groupby("example_id").tail(1).sort_values("example_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(store.current(RUN), expected)


def test_example_ids_beyond_32_bits_are_kept(store_url):
    store = DecisionStore.open(store_url)
    big = 2**40 + 7  # e.g. hashed row ids of a table dataset
    store.record(RUN, [big, 3], "drop")
    assert store.current(RUN)["example_id"].tolist() == [3, big]


def test_existing_sqlite_stores_and_urls_open_the_same_file(tmp_path):
    import sqlite3

    path = tmp_path / "review.db"
    DecisionStore.open(path).record(RUN, [1], "drop", reviewer="ana")
    by_url = DecisionStore.open(f"sqlite:///{path}")
    assert by_url.path == path and by_url.current(RUN)["action"].tolist() == ["drop"]
    with sqlite3.connect(path) as conn:  # the schema the SQLite-only store created, read without the store
        assert conn.execute("SELECT run_id, example_id, action FROM decisions").fetchall() == [(RUN, 1, "drop")]


def test_the_url_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("Z0INF_REVIEW_STORE_URL", f"sqlite:///{tmp_path / 'team.db'}")
    assert DecisionStore.open().path == tmp_path / "team.db"
    monkeypatch.delenv("Z0INF_REVIEW_STORE_URL")
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    assert DecisionStore.open().path == tmp_path / "data" / "review.db"


def test_an_unreachable_server_is_named_without_its_password():
    with pytest.raises(InputError, match=r"review store postgresql\+psycopg2://ana:\*\*\*@127.0.0.1:1/x"):
        DecisionStore.open("postgresql+psycopg2://ana:secret@127.0.0.1:1/x")


# The decisions table as stores made before 'edit_target' existed created it (no target_text column, three actions).
_OLD_SCHEMA = {
    "sqlite": [
        "CREATE TABLE decisions (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, "
        "example_id BIGINT NOT NULL, action TEXT NOT NULL, label INTEGER, reviewer TEXT NOT NULL, note TEXT, "
        "decided_at TEXT NOT NULL, CONSTRAINT decisions_action CHECK (action IN ('keep', 'drop', 'relabel')), "
        "CONSTRAINT decisions_label_iff_relabel CHECK ((action = 'relabel') = (label IS NOT NULL)))",
        "CREATE INDEX decisions_by_run ON decisions (run_id, example_id, id)",
    ],
    "postgresql": [
        "CREATE TABLE decisions (id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, example_id BIGINT NOT NULL, "
        "action TEXT NOT NULL, label INTEGER, reviewer TEXT NOT NULL, note TEXT, decided_at TEXT NOT NULL, "
        "CONSTRAINT decisions_action CHECK (action IN ('keep', 'drop', 'relabel')), "
        "CONSTRAINT decisions_label_iff_relabel CHECK ((action = 'relabel') = (label IS NOT NULL)))",
        "CREATE INDEX decisions_by_run ON decisions (run_id, example_id, id)",
    ],
}


def test_a_store_from_before_target_edits_is_migrated_keeping_every_decision(store_url):
    import sqlalchemy as sa

    url = store_url if "://" in store_url else f"sqlite:///{store_url}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in _OLD_SCHEMA[conn.dialect.name]:
            conn.exec_driver_sql(statement)
        for example_id, action, label in [(5, "drop", None), (7, "relabel", 4), (5, "keep", None)]:
            conn.execute(sa.text("INSERT INTO decisions (run_id, example_id, action, label, reviewer, note, decided_at) "
                                 "VALUES (:r, :e, :a, :l, 'ana', 'old', '2026-01-02T03:04:05+00:00')"),
                         {"r": RUN, "e": example_id, "a": action, "l": label})
    engine.dispose()

    store = DecisionStore.open(store_url)
    history = store.history(RUN)
    assert list(zip(history["example_id"], history["action"], history["label"].tolist())) == [
        (5, "drop", pd.NA), (7, "relabel", 4), (5, "keep", pd.NA)]
    assert history["target_text"].isna().all() and (history["note"] == "old").all()
    store.record(RUN, [9], "edit_target", target_text="bcdef", reviewer="ben")
    store.record(RUN, [7], "drop", reviewer="ben")
    assert DecisionStore.open(store_url).high_water_mark() == 5  # ids go on after the old ones; opening again changes nothing
    current = store.current(RUN).set_index("example_id")
    assert current.loc[[5, 7, 9], "action"].tolist() == ["keep", "drop", "edit_target"]
    assert current.at[9, "target_text"] == "bcdef"
    # the rules hold on the migrated table, read by the database itself
    engine = sa.create_engine(url)
    for values in ["'relabel', NULL, NULL", "'keep', NULL, 'x'", "'edit_target', NULL, NULL", "'delete', NULL, NULL"]:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO decisions (run_id, example_id, action, label, target_text, reviewer, "
                                 f"decided_at) VALUES ('{RUN}', 1, {values}, 'x', 'now')")
    engine.dispose()
    assert len(store.history(RUN)) == 5
