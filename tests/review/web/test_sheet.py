"""The review sheet is one self-contained HTML file: every flagged example as a card, pictures inlined
(and true to the data), decisions with their new labels, nothing fetched from anywhere."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import DecisionStore, RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.review.artifacts import review_artifacts
from z0inf_pipeline.review.run_review import RunReview
from z0inf_pipeline.review.sheet import review_sheet_html
from z0inf_pipeline.tracking import fetch_run


def test_sheet_holds_every_flagged_example_with_inlined_pictures(analysed_run, fresh_data, monkeypatch, tmp_path):
    for key, value in analysed_run.env(fresh_data).items():
        monkeypatch.setenv(key, value)
    layout = RunLayout.for_run(analysed_run.run_id, outputs_base())
    review = RunReview.open(analysed_run.run_id, outputs_base(), train_config=fetch_run(analysed_run.run_id).train_config)
    ids = review.queue["example_id"].tolist()
    store = DecisionStore.open()
    store.record(analysed_run.run_id, [ids[0]], "relabel", label=4, reviewer="ana", note="a <4>")
    store.record(analysed_run.run_id, [ids[1]], "drop", reviewer="ben")

    html = review_sheet_html(review, store.current(analysed_run.run_id))
    assert [int(i) for i in re.findall(r'<article [^>]*data-id="(\d+)"', html)] == ids
    assert not re.search(r"<(script|form|link|iframe)\b", html)
    assert '"Segoe UI"' in html.split("</style>")[0]  # the stylesheet is inlined as written, not escaped
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # nothing to fetch: everything is inline
    first = html[html.index(f'id="ex-{ids[0]}"') : html.index(f'id="ex-{ids[1]}"')]
    assert "relabel → 4" in first and "a &lt;4&gt;" in first  # the note is escaped
    assert "drop" in html[html.index(f'id="ex-{ids[1]}"') : html.index(f'id="ex-{ids[2]}"')]

    # the picture of the first card is that training example's 8x8 digit, dark ink on white
    src = re.search(r'<img class="payload" src="data:image/png;base64,([^"]+)"', first).group(1)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(src))).convert("L"), dtype=np.float64)
    assert pixels.shape == (64, 64)
    raw = load_digits().images[ids[0]]
    expected = 255 * (1 - (raw - raw.min()) / (raw.max() - raw.min()))
    np.testing.assert_allclose(pixels[::8, ::8], expected, atol=1.0)

    output = tmp_path / "sheet.html"
    assert main(["review", "sheet", analysed_run.run_id, "-o", str(output)]) == 0
    written = output.read_text(encoding="utf-8")
    assert len(re.findall(r"<article ", written)) == len(ids) and "review gate BLOCKED" in written
    histogram = re.search(r'<img class="histogram" src="data:image/png;base64,([^"]+)"', written).group(1)
    assert base64.b64decode(histogram) == layout.histogram.read_bytes()  # the run's flag score histogram


def test_review_artifacts_for_mlflow_are_the_sheet_and_the_queue_as_a_table(analysed_run, fresh_data, monkeypatch):
    for key, value in analysed_run.env(fresh_data).items():
        monkeypatch.setenv(key, value)
    layout = RunLayout.for_run(analysed_run.run_id, outputs_base())
    queue, info = read_review_queue(layout.review_queue)
    ids = queue["example_id"].tolist()
    store = DecisionStore.open()
    store.record(analysed_run.run_id, [ids[2]], "relabel", label=5, reviewer="ana")

    review = RunReview(layout, queue, info, fetch_run(analysed_run.run_id).train_config)
    files = review_artifacts(review, store, histogram=layout.histogram.read_bytes())
    assert sorted(files) == ["review_queue.csv", "review_queue.html", "review_sheet.html"]
    sheet = files["review_sheet.html"].decode("utf-8")
    assert [int(i) for i in re.findall(r'<article [^>]*data-id="(\d+)"', sheet)] == ids
    assert "relabel → 5" in sheet and "review gate BLOCKED" in sheet
    assert base64.b64encode(layout.histogram.read_bytes()).decode("ascii") in sheet

    table = pd.read_csv(io.BytesIO(files["review_queue.csv"]))
    assert table["example_id"].tolist() == ids
    # the flag score's percentile and rank among all training examples, recomputed from the scores
    everyone = pd.read_parquet(layout.self_influence)[info["policy"]["score"]].to_numpy()
    np.testing.assert_allclose(table["percentile"], [round(100 * np.mean(everyone <= s), 1) for s in queue["flag_score"]])
    assert table["rank among all"].tolist() == [int(np.sum(everyone > s)) + 1 for s in queue["flag_score"]]
    assert table["mean_loss rank"].tolist() == queue["mean_loss_rank"].tolist()
    assert table["decision"].fillna("").tolist() == ["relabel → 5" if i == ids[2] else "" for i in ids]
    assert "robust_z" not in table.columns
    html = files["review_queue.html"].decode("utf-8")
    assert html.count("<tr") == len(ids) + 1 and "predicted_probability" in html
