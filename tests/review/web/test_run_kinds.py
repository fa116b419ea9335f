"""Every kind of run is shown truthfully: a text run (the LM recipe) by its prompts, targets and the
model's answers, with no classes to filter or relabel to and its wrong answers listed; a tabular run
from a user's CSV by its feature names and its string labels, on the page and on the command line."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import requests
from mlflow import MlflowClient
from selenium.webdriver.common.by import By

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import DecisionStore, RunLayout, read_review_queue

from ...conftest import _stop
from .conftest import IRIS_LABEL, start_server
from .test_review_page import csrf_session, open_fresh

pytestmark = pytest.mark.browser


@pytest.fixture
def serve(tmp_path):
    """Start `z0inf review serve` on a copy of a run's data folder; stopped after the test."""
    started = []

    def start(run):
        data = tmp_path / "data"
        shutil.copytree(run.data_dir, data, ignore=shutil.ignore_patterns("review.db*"))
        started.append(start_server(run, data))
        return started[-1]

    yield start
    for server in started:
        _stop(server.process)


def test_a_text_run_shows_prompts_targets_and_answers_and_lists_its_wrong_answers(analysed_lm_run, serve, page):
    run_id = analysed_lm_run.run_id
    server = serve(analysed_lm_run)
    layout = RunLayout.for_run(run_id, server.data_dir)
    queue = read_review_queue(layout.review_queue)[0]
    examples = pd.read_parquet(layout.examples).set_index("example_id")
    answers = pd.read_parquet(layout.predictions).set_index("example_id")

    open_fresh(page, f"{server.url}/runs/{run_id}")
    name = MlflowClient(analysed_lm_run.tracking_uri).get_run(run_id).info.run_name
    assert page.find_element(By.TAG_NAME, "h1").text.startswith(f"Run {name}")
    # no classes: no class filter, no class picker, no relabel key, no "label -1"
    assert not page.find_elements(By.CSS_SELECTOR, "select[name=cls]")
    assert not page.find_elements(By.CSS_SELECTOR, "select[name=label], button[value=relabel]")
    assert "class digit" not in page.find_element(By.CSS_SELECTOR, ".keys").text
    body = page.find_element(By.TAG_NAME, "main").text
    assert "label -1" not in body and "predicted -1" not in body
    top = int(queue["example_id"].iloc[0])
    card = page.find_element(By.ID, f"ex-{top}")
    labels = card.find_element(By.CSS_SELECTOR, ".labels").text
    assert f"target {examples.at[top, 'target']}" in labels
    assert f"answer {answers.at[top, 'predicted_text']}" in labels
    prompt = card.find_element(By.CSS_SELECTOR, "pre.payload.text")
    assert prompt.text == f"prompt: {examples.at[top, 'prompt']}"
    assert prompt.size["height"] < 60  # one line of text, not a box stretched to the card's height
    # "helps most" names test examples, or says why it names none
    helps = card.find_element(By.CSS_SELECTOR, ".effects div:first-child").text
    assert card.find_elements(By.CSS_SELECTOR, ".effects div:first-child a.mini") or "none: among no test example" in helps

    # the wrong answers, counted against the test accuracy the recipe logged to MLflow at its last checkpoint
    history = MlflowClient(analysed_lm_run.tracking_uri).get_metric_history(run_id, "test_accuracy")
    accuracy = max(history, key=lambda m: m.step).value
    tests = int((examples["split"] == "test").sum())
    wrong = round((1 - accuracy) * tests)
    page.get(f"{server.url}/runs/{run_id}/tests")
    listed = [int(a.get_attribute("href").rsplit("/", 1)[1]) for a in page.find_elements(By.CSS_SELECTOR, ".minis a.mini")]
    assert f"{wrong} of {tests} test examples answered wrongly" in page.find_element(By.TAG_NAME, "main").text
    assert len(listed) == wrong and all(answers.at[i, "predicted_text"] != examples.at[i, "target"] for i in listed)
    assert "mispredicted" not in page.find_element(By.TAG_NAME, "main").text

    # the first wrong answer (a recipe that learns the task may leave none: then the first test example)
    first = listed[0] if listed else int(examples.index[examples["split"] == "test"][0])
    page.get(f"{server.url}/runs/{run_id}/tests/{first}")
    assert page.find_element(By.TAG_NAME, "h1").text == f"Test example #{first}"
    head = page.find_element(By.CSS_SELECTOR, "section.testhead").text
    assert f"target {examples.at[first, 'target']}" in head and f"answer {answers.at[first, 'predicted_text']}" in head
    assert page.find_elements(By.CSS_SELECTOR, "section.opponents article.card")
    assert not page.find_elements(By.CSS_SELECTOR, "button[value=relabel]")

    # a relabel posted anyway is refused by the same check as the CLI's
    session, csrf = csrf_session(server, f"/runs/{run_id}")
    answer = session.post(f"{server.url}/runs/{run_id}/decide", timeout=30,
                          data={"csrf": csrf, "reviewer": "ana", "example_id": top, "action": "relabel", "label": 1})
    assert answer.ok and "is a text run" in answer.text
    assert DecisionStore.open(server.data_dir / "review.db").history(run_id).empty


def test_a_csv_run_shows_feature_names_and_string_labels(analysed_csv_run, serve, page, monkeypatch, capsys):
    run_id = analysed_csv_run.run_id
    server = serve(analysed_csv_run)
    layout = RunLayout.for_run(run_id, server.data_dir)
    queue = read_review_queue(layout.review_queue)[0]
    table = pd.read_csv(analysed_csv_run.data_dir.parent / "iris.csv")
    species = sorted(table[IRIS_LABEL].unique())  # the classes, as the label column spells them
    predictions = pd.read_parquet(layout.predictions).set_index("example_id")

    open_fresh(page, f"{server.url}/runs/{run_id}")
    top = int(queue["example_id"].iloc[0])
    card = page.find_element(By.ID, f"ex-{top}")
    features = card.find_element(By.CSS_SELECTOR, "table.payload.features")
    names = [th.text for th in features.find_elements(By.TAG_NAME, "th")]
    assert names == [c for c in table.columns if c != IRIS_LABEL]  # "sepal length (cm)", not x0
    rows = features.find_elements(By.TAG_NAME, "tr")
    assert abs(features.size["height"] - sum(r.size["height"] for r in rows)) <= 4  # not stretched
    labels = card.find_element(By.CSS_SELECTOR, ".labels").text
    label = species[int(queue["label"].iloc[0])]
    predicted = species[int(predictions.at[top, "predicted_label"])]
    assert f"label {label}" in labels and f"predicted {predicted} (p " in labels
    options = [o.text for o in card.find_elements(By.CSS_SELECTOR, "select[name=label] option")][1:]
    assert options == [f"{i} · {s}" for i, s in enumerate(species)]

    page.get(f"{server.url}/runs/{run_id}/tests")
    minis = page.find_elements(By.CSS_SELECTOR, ".minis a.mini")
    if minis:  # a test example the model gets wrong, by the same names
        shown = int(minis[0].get_attribute("href").rsplit("/", 1)[1])
        row = predictions.loc[shown]
        assert f"y={species[int(row['label'])]} ŷ={species[int(row['predicted_label'])]}" in minis[0].text

    # the command line takes the class by name
    for key, value in analysed_csv_run.env(server.data_dir).items():
        monkeypatch.setenv(key, value)
    assert main(["review", "decide", run_id, str(top), "--action", "relabel", "--label", "versicolor",
                 "--reviewer", "ana"]) == 0
    assert "relabel → versicolor" in capsys.readouterr().out
    decided = DecisionStore.open(server.data_dir / "review.db").current(run_id)
    assert decided[["example_id", "label"]].values.tolist() == [[top, species.index("versicolor")]]
    assert main(["review", "list", "--run", run_id, "--limit", "3"]) == 0
    listing = capsys.readouterr().out
    assert label in listing and "relabel → versicolor" in listing
    page.get(f"{server.url}/runs/{run_id}")
    assert page.find_element(By.ID, f"ex-{top}").find_element(By.CSS_SELECTOR, ".status").text == "RELABEL → VERSICOLOR"
    assert requests.get(server.url, timeout=30).ok
