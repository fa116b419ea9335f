"""A whole review round from the page: decide, see the gate open, retrain through the real Dagster
job, and find the retrained run (named after its parent and round in MLflow) with the parent's
decisions in force on its page and counted by its gate."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient
from selenium.webdriver.common.by import By

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking.logger import retrained_run_name

from .test_review_page import open_fresh, press, reloading, set_reviewer, store_of

pytestmark = pytest.mark.browser


def test_a_review_round_from_the_page_to_the_retrained_run(analysed_run, server, page, monkeypatch, capsys):
    for key, value in analysed_run.env(server.data_dir).items():
        monkeypatch.setenv(key, value)
    run_id = analysed_run.run_id
    queue = read_review_queue(RunLayout.for_run(run_id, outputs_base()).review_queue)[0]
    second = int(queue["example_id"].iloc[1])

    open_fresh(page, f"{server.url}/runs/{run_id}")
    set_reviewer(page, "ana")
    press(page, "d")
    assert page.current_url.endswith(f"#ex-{second}")
    press(page, "r", "3")
    assert "relabel → 3" in page.find_element(By.ID, f"ex-{second}").text
    assert "shut" in page.find_element(By.CSS_SELECTOR, ".progress").text
    # the rest on the command line: the same store, so the page sees them too
    assert main(["review", "decide", run_id, "--flagged", "--action", "keep", "--reviewer", "ben"]) == 0
    page.get(f"{server.url}/runs/{run_id}")
    assert "open" in page.find_element(By.CSS_SELECTOR, ".progress").text
    assert f"z0inf materialize retrain --run {run_id}" in page.find_element(By.CSS_SELECTOR, ".next").text

    # the gated retrain from the page's button: retrain_job, then influence_job on the retrained run
    press_button = page.find_element(By.CSS_SELECTOR, "form.retrain button")
    reloading(page, press_button.click)
    child = str(pd.read_parquet(RunLayout.for_run(run_id, outputs_base()).retrained)["retrained_run_id"].iloc[0])
    assert f"/runs/{child}" in page.current_url and child in page.find_element(By.CSS_SELECTOR, ".flash.ok").text
    client = MlflowClient(analysed_run.tracking_uri)
    assert client.get_run(child).info.run_name == retrained_run_name(client.get_run(run_id).info.run_name)
    with dg.DagsterInstance.get() as instance:  # the runs the button started are on the DAGSTER_HOME instance
        jobs = [r.job_name for r in instance.get_runs() if r.tags.get("dagster/partition") in (run_id, child)]
    assert {"retrain_job", "influence_job"} <= set(jobs)

    # the index shows runs by their MLflow names (the id on hover), the child under its parent
    page.get(server.url)
    runs = page.find_element(By.CSS_SELECTOR, "table.runs")
    child_name, parent_name = client.get_run(child).info.run_name, client.get_run(run_id).info.run_name
    link = runs.find_element(By.CSS_SELECTOR, f'a[href="/runs/{child}"]')
    assert link.text == child_name and child in link.get_attribute("title")
    assert f"retrained into {child_name}" in runs.text and parent_name in runs.text
    page.get(f"{server.url}/runs/{run_id}")
    # one child per round: the retrained parent shows its child and offers no second plain retrain
    assert not page.find_elements(By.CSS_SELECTOR, "form.retrain:not(.again)")
    assert child_name in page.find_element(By.CSS_SELECTOR, "p.retrained").text
    reloading(page, page.find_element(By.LINK_TEXT, "Review it").click)
    assert child in page.find_element(By.TAG_NAME, "h1").text
    assert "retrain round 1" in page.find_element(By.CSS_SELECTOR, "section.runhead").text

    # decisions made on the parent stay in force on the retrained run: an example decided there and
    # flagged again shows as decided here, the parent's decision named with its run, not pending
    child_queue = read_review_queue(RunLayout.for_run(child, outputs_base()).review_queue)[0]
    parent_decisions = store_of(server).current(run_id).set_index("example_id")
    again = sorted(set(child_queue["example_id"]) & set(parent_decisions.index))
    assert again, "a kept example is flagged again in the retrained run"
    assert store_of(server).history(child).empty  # nothing was decided on the retrained run itself
    expected = parent_decisions.loc[again[0]]
    card = page.find_element(By.ID, f"ex-{again[0]}")
    assert f"decided {expected['action']}" in card.get_attribute("class")
    carried = card.find_element(By.CSS_SELECTOR, ".decided-by.carried").text
    assert f"{expected['action']} by {expected['reviewer']}" in carried and run_id[:8] in carried
    history = card.find_element(By.CSS_SELECTOR, "details.history")
    history.find_element(By.TAG_NAME, "summary").click()
    assert run_id[:8] in history.find_element(By.CSS_SELECTOR, "li.carried").text
    # ... and they count toward the retrained run's gate: its progress counts exactly those examples
    assert set(child_queue.loc[child_queue["decided_on_run"].notna(), "example_id"]) == set(again)
    progress = page.find_element(By.CSS_SELECTOR, ".progress").text
    assert f"{len(again)} of {len(child_queue)} flagged decided" in progress
    assert ("open" if len(again) == len(child_queue) else "shut") in progress
    page.get(f"{server.url}/runs/{child}?pending=1")
    pending = [int(c.get_attribute("data-id")) for c in page.find_elements(By.CSS_SELECTOR, "article.card")]
    assert pending == [i for i in child_queue["example_id"] if i not in set(again)][:100]


def test_a_second_retrain_of_one_round_needs_an_explicit_request_and_gets_its_own_name(
    analysed_run, server, page, monkeypatch
):
    for key, value in analysed_run.env(server.data_dir).items():
        monkeypatch.setenv(key, value)
    run_id = analysed_run.run_id
    assert main(["review", "decide", run_id, "--flagged", "--action", "keep", "--reviewer", "ben"]) == 0
    open_fresh(page, f"{server.url}/runs/{run_id}")
    reloading(page, page.find_element(By.CSS_SELECTOR, "form.retrain button").click)
    summary = RunLayout.for_run(run_id, outputs_base()).retrained
    first = str(pd.read_parquet(summary)["retrained_run_id"].iloc[0])

    # a plain retrain posted again (a second tab, a double click) is refused and leads to the child
    page.get(f"{server.url}/runs/{run_id}")
    csrf = page.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    session = requests.Session()
    answer = session.post(f"{server.url}/runs/{run_id}/retrain", data={"csrf": csrf}, timeout=120)
    assert answer.url.endswith(f"/runs/{first}") and "already retrained into" in answer.text
    assert str(pd.read_parquet(summary)["retrained_run_id"].iloc[0]) == first

    # asked for explicitly, a second child is made, with a name of its own
    page.find_element(By.CSS_SELECTOR, "details.again summary").click()
    reloading(page, page.find_element(By.CSS_SELECTOR, "form.retrain.again button").click)
    second = str(pd.read_parquet(summary)["retrained_run_id"].iloc[0])
    assert second != first and f"/runs/{second}" in page.current_url
    client = MlflowClient(analysed_run.tracking_uri)
    names = {client.get_run(r).info.run_name for r in (first, second)}
    assert len(names) == 2 and all(n.startswith(retrained_run_name(client.get_run(run_id).info.run_name)) for n in names)
    page.get(f"{server.url}/runs/{run_id}")  # the parent lists both children
    text = page.find_element(By.CSS_SELECTOR, "p.retrained").text
    assert all(n in text for n in names)
