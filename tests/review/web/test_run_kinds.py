"""Every kind of run is shown truthfully: a text run (the LM recipe) by its prompts, targets and the
model's answers, with no classes to filter or relabel to and its wrong answers listed, its targets
edited instead (on the page and the command line, kept in the store, carried into the retrain); a
tabular run from a user's CSV by its feature names and its string labels, on the page and on the
command line."""

from __future__ import annotations

import shutil

import dagster as dg
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import DecisionStore, RunLayout, read_review_queue
from z0inf_pipeline.tracking import fetch_run

from ...conftest import _stop
from ...defs.conftest import execute
from .conftest import IRIS_LABEL, start_server
from .test_review_page import csrf_session, open_fresh, reloading, set_reviewer

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


def served_text_run(serve, run):
    """The LM run served on a copy of its data: (run id, server, layout, queue, examples, the model's answers)."""
    server = serve(run)
    layout = RunLayout.for_run(run.run_id, server.data_dir)
    examples = pd.read_parquet(layout.examples).set_index("example_id")
    answers = pd.read_parquet(layout.predictions).set_index("example_id")
    return run.run_id, server, layout, read_review_queue(layout.review_queue)[0], examples, answers


def test_a_text_run_shows_prompts_targets_and_answers_and_lists_its_wrong_answers(analysed_lm_run, serve, page):
    run_id, server, layout, queue, examples, answers = served_text_run(serve, analysed_lm_run)

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


def shifted(prompt: str) -> str:
    """The right answer of the letter-shift task, written out here: each letter one on in a..h, h to a."""
    letters = "abcdefgh"
    return "".join(letters[(letters.index(ch) + 1) % 8] for ch in prompt.removesuffix(">"))


def test_a_text_runs_target_is_edited_kept_and_retrained_on(analysed_lm_run, serve, page, monkeypatch, capsys):
    run_id, server, layout, queue, examples, answers = served_text_run(serve, analysed_lm_run)
    assert len(queue) >= 3, "the half-size LM recipe flags a few wrong answers"
    first, second, *rest = [int(i) for i in queue["example_id"]]

    # on the page: the target field starts with the model's answer where it differs, `e` edits, Enter saves
    open_fresh(page, f"{server.url}/runs/{run_id}")
    set_reviewer(page, "ana")
    card = page.find_element(By.ID, f"ex-{first}")
    field = card.find_element(By.CSS_SELECTOR, "input[name=target_text]")
    assert field.get_attribute("value") == answers.at[first, "predicted_text"]  # the target itself where they agree
    right = shifted(examples.at[first, "prompt"])
    card.click()
    page.find_element(By.TAG_NAME, "body").send_keys("e")
    assert page.switch_to.active_element == field
    reloading(page, lambda: page.switch_to.active_element.send_keys(right, Keys.ENTER))
    card = page.find_element(By.ID, f"ex-{first}")
    assert card.find_element(By.CSS_SELECTOR, ".status").text == f"TARGET → “{right.upper()}”"
    assert f"target → “{right}” by ana" in card.find_element(By.CSS_SELECTOR, ".decided-by").text
    assert card.find_element(By.CSS_SELECTOR, "input[name=target_text]").get_attribute("value") == right

    # on the command line: a target the recipe cannot train on is refused by name, a good one kept
    for key, value in analysed_lm_run.env(server.data_dir).items():
        monkeypatch.setenv(key, value)
    assert main(["review", "decide", run_id, str(second), "--action", "edit_target", "--target", "xyz"]) == 2
    assert "outside the recipe's letters" in capsys.readouterr().err
    assert main(["review", "decide", run_id, str(second), "--action", "relabel", "--label", "1"]) == 2
    assert "edit the target text" in capsys.readouterr().err
    fix = shifted(examples.at[second, "prompt"])
    assert main(["review", "decide", run_id, str(second), "--action", "edit_target", "--target", fix,
                 "--reviewer", "ben"]) == 0
    assert f"target → “{fix}”" in capsys.readouterr().out
    assert main(["review", "decide", run_id, "--flagged", "--action", "keep", "--reviewer", "ben"]) == 0
    assert main(["review", "list", "--run", run_id, "--limit", "0"]) == 0
    listing = capsys.readouterr().out
    assert f"target → “{right}”" in listing and f"target → “{fix}”" in listing
    current = DecisionStore.open(server.data_dir / "review.db").current(run_id).set_index("example_id")
    assert current.loc[[first, second], "target_text"].tolist() == [right, fix]
    assert (current.loc[rest, "action"] == "keep").all()

    # curation applies the edits and the retrain trains on them (read back from the child's own MLflow run)
    with dg.DagsterInstance.get() as instance:
        retrain = execute(instance, "retrain_job", run_id)
    assert retrain.success
    checks = {e.check_name: e.passed for e in retrain.get_asset_check_evaluations()}
    assert checks["curated_set_matches_decisions"] and checks["retrained_run_follows_curation"]
    curated = pd.read_parquet(layout.curated_set).set_index("example_id")
    assert curated.loc[[first, second], "target_text"].tolist() == [right, fix]
    assert curated["target_text"].drop([first, second]).isna().all()
    child_id = pd.read_parquet(layout.retrained).at[0, "retrained_run_id"]
    child = fetch_run(child_id, tracking_uri=analysed_lm_run.tracking_uri)
    trained = pd.read_parquet(child.examples).set_index("example_id")
    assert trained.loc[[first, second], "target"].tolist() == [right, fix]
    untouched = examples.index[(examples["split"] == "train") & ~examples.index.isin([first, second])]
    assert trained.loc[untouched, "target"].tolist() == examples.loc[untouched, "target"].tolist()
    assert sorted(map(tuple, child.train_config["target_edits"])) == sorted([(first, right), (second, fix)])
    assert child.tags["z0inf.target_edits"] == "2"


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
