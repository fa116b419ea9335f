"""A run's GX Data Docs open in real headless Chromium: the index lists every validation of the run, and
the flagging validation shows the expectation on flag_score with the flagged examples as its unexpected rows."""

from __future__ import annotations

import re

import pytest
from selenium.webdriver.common.by import By

from z0inf_pipeline.review import RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base

pytestmark = pytest.mark.browser


def test_run_data_docs_show_the_flagging_expectation_and_its_unexpected_rows(analysed_run, fresh_data, page, monkeypatch):
    for key, value in analysed_run.env(fresh_data).items():
        monkeypatch.setenv(key, value)
    layout = RunLayout.for_run(analysed_run.run_id, outputs_base())
    queue, info = read_review_queue(layout.review_queue)
    page.get((layout.gx_folder / "index.html").as_uri())  # GX's own index needs CDN scripts: this one is plain
    links = {a.get_attribute("href") for a in page.find_elements(By.CSS_SELECTOR, "a[href*='validations/']")}
    validated = {re.search(r"validations/([^/]+)/([^/]+)/", link).group(2) for link in links}
    assert validated >= {"train_loss_table", "test_loss_table", "self_influence", "train_test_topk", "flagging"}

    [flagging] = [link for link in links if "validations/flagging/flagging/" in link]
    page.get(flagging)
    text = page.find_element(By.TAG_NAME, "body").text
    assert "flag_score" in text and "values must be less than" in text
    assert f"{len(queue)} unexpected values found" in text
    table = page.find_element(By.XPATH, "//table[thead/tr/th[normalize-space()='example_id']]")
    header = [th.text.strip() for th in table.find_elements(By.XPATH, "./thead/tr/th")]
    column = header.index("example_id")
    rows = table.find_elements(By.XPATH, "./tbody/tr")
    shown = {int(row.find_elements(By.XPATH, "./td")[column].text) for row in rows}
    # the page samples up to 200 unexpected rows (the stored result, linked beside it, lists all of them)
    assert shown <= set(queue["example_id"].tolist()) and len(shown) == min(len(queue), 200) > 0
    assert info["flagging"]["flagged"] == len(queue)
