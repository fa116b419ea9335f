"""The review page in a real browser: every flagged example is shown with its evidence, decisions made
with clicks and with keys land in the store (checked against the store, not the page), bad decisions
are refused as on the CLI, concurrent reviewers lose nothing, and the token and form checks hold."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from z0inf_pipeline.influence.signals import SIGNAL_COLUMNS
from z0inf_pipeline.review.web.app import PAGE_SIZE
from z0inf_pipeline.review import DecisionStore, RunLayout, read_review_queue

from ...conftest import _stop
from .conftest import start_server

pytestmark = pytest.mark.browser


def open_fresh(driver, url: str) -> None:
    """Open ``url`` with no cookie left from an earlier test (cookies are per host, not per port)."""
    driver.get(url)
    driver.delete_all_cookies()
    driver.get(url)


def wait_for(driver, condition, timeout: float = 30):
    return WebDriverWait(driver, timeout).until(condition)


def reloading(driver, action) -> None:
    """Do ``action`` (a click or keys that submit a form) and wait until the page it leads to has loaded."""
    old = driver.find_element(By.TAG_NAME, "html")
    action()
    wait_for(driver, EC.staleness_of(old))
    wait_for(driver, lambda d: d.execute_script("return document.readyState") == "complete")


def cards_on(driver) -> list[int]:
    """The ids of the page's cards, once the document holds as many as its header announces ("N match ·
    page P of Q"): on a busy machine a test can read a page still being parsed (74 of 100 cards)."""

    def announced(d):
        header = re.match(r"(\d+) match(?: · page (\d+) of)?", d.find_element(By.CSS_SELECTOR, "form.filters .muted").text)
        wanted = min(PAGE_SIZE, int(header.group(1)) - (int(header.group(2) or 1) - 1) * PAGE_SIZE)
        cards = d.find_elements(By.CSS_SELECTOR, "article.card")
        return (len(cards) == wanted) and ([int(c.get_attribute("data-id")) for c in cards],)

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, 30, ignored_exceptions=ignored).until(announced)[0]


def press(driver, *keys) -> None:
    """Type ``keys`` on the page, the last of which decides (submits), and wait for the next page."""
    reloading(driver, lambda: driver.find_element(By.TAG_NAME, "body").send_keys(*keys))


def store_of(server) -> DecisionStore:
    return DecisionStore.open(server.data_dir / "review.db")


def queue_of(run, server) -> pd.DataFrame:
    return read_review_queue(RunLayout.for_run(run.run_id, server.data_dir).review_queue)[0]


def set_reviewer(driver, name: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, "nav .whoami input[name=reviewer]")
    field.clear()
    field.send_keys(name, Keys.ENTER)
    wait_for(driver, EC.staleness_of(field))  # the page reloaded, now with the name in every form
    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "nav .whoami input[name=reviewer]").get_attribute("value") == name)


def csrf_session(server, path: str) -> tuple[requests.Session, str]:
    session = requests.Session()
    html = session.get(server.url + path, timeout=30).text
    return session, re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_every_flagged_example_is_a_card_with_its_evidence(analysed_run, server, page, tmp_path):
    queue = queue_of(analysed_run, server)
    layout = RunLayout.for_run(analysed_run.run_id, server.data_dir)
    predictions = pd.read_parquet(layout.predictions).set_index("example_id")
    open_fresh(page, f"{server.url}/runs/{analysed_run.run_id}")

    seen: list[int] = []
    while True:
        seen += cards_on(page)
        following = page.find_elements(By.XPATH, "//nav[@class='pages']/b/following-sibling::a[1]")
        if not following:
            break
        reloading(page, following[0].click)
    assert seen == queue["example_id"].tolist()  # every flagged example, in queue order, across pages

    open_fresh(page, f"{server.url}/runs/{analysed_run.run_id}")
    top = queue.iloc[0]
    card = page.find_element(By.ID, f"ex-{top['example_id']}")
    assert card.find_element(By.CSS_SELECTOR, "img.payload").get_attribute("src").startswith("data:image/png;base64,")
    text = card.text
    assert f"label {top['label']}" in text
    # the prediction with the model's probability of it, from the predictions file
    predicted = predictions.loc[top["example_id"]]
    assert f"predicted {predicted['predicted_label']} (p {predicted['confidence']:.3f})" in text
    # the flag score with its percentile and rank among all training examples, from the score file
    info = read_review_queue(layout.review_queue)[1]
    scores = pd.read_parquet(layout.self_influence)
    assert info["policy"]["score"] == "mean_loss"  # the default policy: a count on mean_loss
    everyone = scores["mean_loss"].to_numpy()
    percentile = 100 * np.mean(everyone <= top["flag_score"])
    rank = int(np.sum(everyone > top["flag_score"])) + 1
    assert f"flag score {top['flag_score']:.3g} mean_loss · #{rank} of {len(scores)} · percentile {percentile:.1f}" in text
    assert "robust" not in text.lower()
    # every signal with its rank among all training examples (1 = most suspicious; low confidence is),
    # the signals that flag it on their own marked
    rows = {r.find_element(By.TAG_NAME, "th").text: r for r in card.find_elements(By.CSS_SELECTOR, "table.signals tr:not(.head)")}
    assert list(rows) == list(SIGNAL_COLUMNS)
    assert f"rank of {len(scores)}" in card.find_element(By.CSS_SELECTOR, "table.signals tr.head").text
    flagging = top["flagged_by"].split(", ")
    assert "mean_loss" in flagging  # the flag score's own signal flags every flagged example
    me = scores["example_id"] == top["example_id"]
    for name in SIGNAL_COLUMNS:
        oriented = -scores[name] if name == "confidence" else scores[name]
        expected_rank = int((oriented > oriented[me].iloc[0]).sum()) + 1
        marker = " flags it" if name in flagging else ""
        assert rows[name].text == f"{name} {scores.loc[me, name].iloc[0]:.3g} #{expected_rank}{marker}"
        assert ("flagging" in (rows[name].get_attribute("class") or "")) == (name in flagging)
    assert card.find_elements(By.CSS_SELECTOR, "svg.spark polyline")
    # the test examples it helps most are the ones where it is a proponent with the highest scores
    topk = pd.read_parquet(layout.topk)
    mine = topk[topk["proponent_id"] == top["example_id"]].sort_values("proponent_score", ascending=False)
    shown = [int(a.get_attribute("href").rsplit("/", 1)[1]) for a in card.find_elements(By.CSS_SELECTOR, ".effects div:first-child a.mini")]
    assert shown == mine["test_example_id"].head(3).tolist()
    page.save_screenshot(str(tmp_path / "review-page.png"))


def test_decisions_by_click_and_by_key_reach_the_store(analysed_run, server, page, tmp_path):
    queue = queue_of(analysed_run, server)
    ids = queue["example_id"].tolist()
    open_fresh(page, f"{server.url}/runs/{analysed_run.run_id}")
    set_reviewer(page, "ana")

    # a click: drop the first card, with a note
    first = page.find_element(By.ID, f"ex-{ids[0]}")
    first.find_element(By.NAME, "note").send_keys("smudged")
    reloading(page, first.find_element(By.CSS_SELECTOR, "button[value=drop]").click)
    assert page.find_elements(By.CSS_SELECTOR, ".flash.ok")
    # after the decision the page lands on the next undecided example, ready for keys
    assert page.current_url.endswith(f"#ex-{ids[1]}")
    assert "current" in page.find_element(By.ID, f"ex-{ids[1]}").get_attribute("class")

    press(page, "k")  # keep ids[1]
    assert page.current_url.endswith(f"#ex-{ids[2]}")
    press(page, "j", "r", "7")  # skip ids[2], relabel ids[3] as 7
    assert page.current_url.endswith(f"#ex-{ids[4]}")
    press(page, "u", Keys.ARROW_UP, "d")  # back up to ids[2]: drop it
    assert page.current_url.endswith(f"#ex-{ids[4]}")

    history = store_of(server).history(analysed_run.run_id)
    assert list(zip(history["example_id"], history["action"], history["label"].fillna(-1))) == [
        (ids[0], "drop", -1), (ids[1], "keep", -1), (ids[3], "relabel", 7), (ids[2], "drop", -1),
    ]
    assert set(history["reviewer"]) == {"ana"}
    assert history["note"].tolist()[0] == "smudged"
    assert page.find_element(By.ID, f"ex-{ids[3]}").find_element(By.CSS_SELECTOR, ".status").text == "RELABEL → 7"
    assert "4 of" in page.find_element(By.CSS_SELECTOR, ".progress").text
    page.save_screenshot(str(tmp_path / "after-decisions.png"))

    # filters: pending only hides the decided ones; a class filter shows only that label
    page.get(f"{server.url}/runs/{analysed_run.run_id}?pending=1")
    pending = cards_on(page)
    assert pending == ids[4:][:100]  # the first page of 100
    label = int(queue["label"].iloc[0])
    page.get(f"{server.url}/runs/{analysed_run.run_id}?cls={label}")
    shown = cards_on(page)
    assert shown == queue.loc[queue["label"] == label, "example_id"].tolist()[:100]
    # the signal filter offers every signal: the examples it flags on its own, most suspicious by it
    # first (highest loss, lowest confidence), computed here from the values, not the queue's ranks
    offered = [o.get_attribute("value") for o in page.find_elements(By.CSS_SELECTOR, "select[name=signal] option")]
    assert offered == ["", *SIGNAL_COLUMNS]
    for name in ("final_loss", "confidence"):
        page.get(f"{server.url}/runs/{analysed_run.run_id}?signal={name}")
        shown = cards_on(page)
        by_it = queue[[name in v.split(", ") for v in queue["flagged_by"]]] if (queue["flagged_by"].str.contains(name)).any() else queue
        ordered = by_it.sort_values(name, ascending=name == "confidence", kind="stable")
        assert shown == ordered["example_id"].tolist()[:100]


def test_bad_decisions_are_refused_like_the_cli(analysed_run, server, page):
    queue = queue_of(analysed_run, server)
    open_fresh(page, f"{server.url}/runs/{analysed_run.run_id}")
    set_reviewer(page, "ana")
    card = page.find_element(By.ID, f"ex-{queue['example_id'].iloc[0]}")
    Select(card.find_element(By.NAME, "label")).select_by_value("")  # no class chosen
    reloading(page, card.find_element(By.CSS_SELECTOR, "button[value=relabel]").click)
    assert "needs the new label" in page.find_element(By.CSS_SELECTOR, ".flash.error").text

    session, csrf = csrf_session(server, f"/runs/{analysed_run.run_id}")
    examples = pd.read_parquet(RunLayout.for_run(analysed_run.run_id, server.data_dir).examples)
    test_id = int(examples.loc[examples["split"] == "test", "example_id"].iloc[0])
    for fields, message in [
        ({"example_id": test_id, "action": "drop"}, "are not training examples of run"),
        ({"example_id": int(queue["example_id"].iloc[0]), "action": "relabel", "label": 10}, "is outside the run"),
        ({"example_id": int(queue["example_id"].iloc[0]), "action": "delete"}, "must be one of"),
    ]:
        answer = session.post(f"{server.url}/runs/{analysed_run.run_id}/decide",
                              data={"csrf": csrf, "reviewer": "ana", **fields}, timeout=30)
        assert answer.ok and message in answer.text
    assert store_of(server).history(analysed_run.run_id).empty


def test_two_reviewers_deciding_at_once_lose_nothing(analysed_run, server):
    queue = queue_of(analysed_run, server)
    ids = queue["example_id"].tolist()[:40]
    reviewers = {name: csrf_session(server, f"/runs/{analysed_run.run_id}") for name in ("ana", "ben")}

    def decide(job):
        name, example_id = job
        session, csrf = reviewers[name]
        action = "keep" if name == "ana" else "drop"
        answer = session.post(f"{server.url}/runs/{analysed_run.run_id}/decide", allow_redirects=False, timeout=60,
                              data={"csrf": csrf, "reviewer": name, "example_id": example_id, "action": action})
        return answer.status_code

    jobs = [(name, i) for i in ids for name in reviewers]
    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(decide, jobs))
    assert codes == [303] * len(jobs)
    history = store_of(server).history(analysed_run.run_id)
    assert sorted(zip(history["reviewer"], history["example_id"])) == sorted(jobs)


def test_forms_from_elsewhere_and_missing_tokens_are_refused(analysed_run, fresh_data, page):
    served = start_server(analysed_run, fresh_data, "--token", "s3cret")
    try:
        run_url = f"{served.url}/runs/{analysed_run.run_id}"
        assert requests.get(run_url, timeout=30).status_code == 401
        assert requests.get(run_url, headers={"X-Z0inf-Token": "wrong"}, timeout=30).status_code == 401
        assert requests.get(run_url, headers={"X-Z0inf-Token": "s3cret"}, timeout=30).status_code == 200

        open_fresh(page, f"{run_url}?token=s3cret")  # once with the token, then by cookie
        assert "token" not in page.current_url and page.find_elements(By.CSS_SELECTOR, "article.card")
        page.get(run_url)
        assert page.find_elements(By.CSS_SELECTOR, "article.card")

        session = requests.Session()
        session.headers["X-Z0inf-Token"] = "s3cret"
        csrf = re.search(r'name="csrf" value="([^"]+)"', session.get(run_url, timeout=30).text).group(1)
        example_id = int(queue_of(analysed_run, served)["example_id"].iloc[0])
        form = {"reviewer": "eve", "example_id": example_id, "action": "drop"}
        decide_url = f"{run_url}/decide"
        assert session.post(decide_url, data=form, timeout=30).status_code == 403  # no form token
        assert session.post(decide_url, data={**form, "csrf": csrf}, timeout=30,
                            headers={"Origin": "http://evil.example"}).status_code == 403
        assert store_of(served).history(analysed_run.run_id).empty
        assert session.post(decide_url, data={**form, "csrf": csrf}, timeout=30).ok
        assert len(store_of(served).history(analysed_run.run_id)) == 1
    finally:
        _stop(served.process)


def test_a_mispredicted_test_example_shows_the_training_examples_behind_it(analysed_run, server, page, tmp_path):
    layout = RunLayout.for_run(analysed_run.run_id, server.data_dir)
    predictions = pd.read_parquet(layout.predictions)
    test = predictions[predictions["split"] == "test"]
    wrong = test[test["predicted_label"] != test["label"]].sort_values("confidence", ascending=False, kind="stable")
    open_fresh(page, f"{server.url}/runs/{analysed_run.run_id}/tests")
    listed = [int(a.get_attribute("href").rsplit("/", 1)[1]) for a in page.find_elements(By.CSS_SELECTOR, ".minis a.mini")]
    assert listed == wrong["example_id"].head(200).tolist()

    page.find_element(By.CSS_SELECTOR, ".minis a.mini").click()
    test_id = int(wrong["example_id"].iloc[0])
    assert page.find_element(By.TAG_NAME, "h1").text == f"Test example #{test_id}"
    topk = pd.read_parquet(layout.topk)
    rows = topk[topk["test_example_id"] == test_id].sort_values("rank")
    opponents = [int(c.get_attribute("data-id")) for c in page.find_elements(By.CSS_SELECTOR, "section.opponents article.card")]
    proponents = [int(c.get_attribute("data-id")) for c in page.find_elements(By.CSS_SELECTOR, "section.proponents article.card")]
    assert proponents == rows["proponent_id"].tolist() and opponents == rows["opponent_id"].tolist()
    score = page.find_element(By.CSS_SELECTOR, "section.opponents article.card .score").text
    assert score == f"influence {rows['opponent_score'].iloc[0]:.3g}"
    page.save_screenshot(str(tmp_path / "test-example.png"))

    # deciding from this view records the decision and comes back to it
    set_reviewer(page, "ana")
    reloading(page, page.find_element(By.CSS_SELECTOR, "section.opponents article.card button[value=drop]").click)
    assert page.find_elements(By.CSS_SELECTOR, ".flash.ok")
    assert page.current_url.endswith(f"/tests/{test_id}")
    current = store_of(server).current(analysed_run.run_id)
    assert current[["example_id", "action"]].values.tolist() == [[opponents[0], "drop"]]


def test_unknown_run_is_a_404_and_index_lists_the_run(analysed_run, server):
    assert requests.get(f"{server.url}/runs/nosuchrun", timeout=30).status_code == 404
    assert requests.get(f"{server.url}/runs/..%2F..%2Fetc", timeout=30).status_code == 404
    index = requests.get(server.url, timeout=30).text
    assert analysed_run.run_id in index and "shut" in index
    assert np.isin([len(queue_of(analysed_run, server))], [int(n) for n in re.findall(r"<td>(\d+)</td>", index)])[0]
    # the flag score histogram written with the queue is linked from the run page and served as is
    run_page = requests.get(f"{server.url}/runs/{analysed_run.run_id}", timeout=30).text
    assert f'href="/runs/{analysed_run.run_id}/flag_score_histogram.png"' in run_page
    picture = requests.get(f"{server.url}/runs/{analysed_run.run_id}/flag_score_histogram.png", timeout=30)
    layout = RunLayout.for_run(analysed_run.run_id, server.data_dir)
    assert picture.headers["Content-Type"] == "image/png" and picture.content == layout.histogram.read_bytes()
