"""The pieces a reviewer's view of an example is drawn from, for ``RunReview``: how an example looks
(an image, its text or its feature row), a score's standing among all training examples, the
strongest effects in the train-test top-k table, and small number formats."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

EFFECTS_SHOWN = 3
TEXT_LIMIT = 600
FEATURES_SHOWN = 16


@dataclass(frozen=True)
class Payload:
    """An example as a person looks at it: ``kind`` is "image" (a PNG data URI), "text" or "features"."""

    kind: str
    image: str = ""
    text: str = ""
    features: tuple[tuple[str, str], ...] = ()


def strongest_effects(top: pd.DataFrame, id_column: str, score_column: str, ids: np.ndarray, *, ascending: bool) -> dict:
    """Per training id, its EFFECTS_SHOWN strongest test examples in the top-k table."""
    rows = top.loc[top[id_column].isin(ids), [id_column, "test_example_id", score_column]]
    rows = rows.sort_values(score_column, ascending=ascending, kind="stable").groupby(id_column).head(EFFECTS_SHOWN)
    rows = rows.rename(columns={score_column: "score"})
    return {int(i): group[["test_example_id", "score"]].reset_index(drop=True) for i, group in rows.groupby(id_column)}


def flag_score_standing(scores, all_scores) -> tuple[np.ndarray, np.ndarray]:
    """(percentile, rank) of each of ``scores`` among ``all_scores`` (every training example's flag
    score): the percentage of training examples scoring at most as high, and 1 + the number scoring
    higher. Reviewers read "99.3rd percentile, #7 of 900" more easily than a raw score or a robust z."""
    ordered = np.sort(np.asarray(all_scores, dtype=np.float64))
    scores = np.asarray(scores, dtype=np.float64)
    at_most = np.searchsorted(ordered, scores, side="right")
    return 100.0 * at_most / max(len(ordered), 1), len(ordered) - at_most + 1


def split_names(value) -> tuple[str, ...]:
    """A ``flagged_by`` cell as signal names: a list, or a string separated by commas, '|' or spaces."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    if isinstance(value, str):
        return tuple(n for n in value.replace("|", ",").replace(" ", ",").split(",") if n)
    return tuple(str(v) for v in value)


def image_data_uri(image: np.ndarray, scale: int = 8) -> str:
    """A (C, H, W) or (H, W) image as a PNG data URI: dark ink on white, each pixel a scale x scale block."""
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    low, high = float(array.min()), float(array.max())
    scaled = np.zeros_like(array) if high == low else (array - low) / (high - low)
    if scaled.ndim == 2:
        scaled = 1.0 - scaled  # high values drawn dark, like the digits' ink
    pixels = (scaled * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sparkline(values, width: int = 120, height: int = 28) -> dict | None:
    """A loss trajectory as the points of a small polyline (the ``sparkline`` template macro draws it,
    first and last values printed beside it); None when fewer than two values are finite."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < 2:
        return None
    low, high = float(finite.min()), float(finite.max())
    span = high - low or 1.0
    x = np.linspace(1, width - 1, len(values))
    y = height - 2 - (np.nan_to_num(values, nan=low) - low) / span * (height - 4)
    return {
        "width": width,
        "height": height,
        "points": " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y)),
        "last": (f"{x[-1]:.1f}", f"{y[-1]:.1f}"),
    }


def short_number(value) -> str:
    """Three significant digits, as people read them ('' for a missing value)."""
    if value is None or pd.isna(value):
        return ""
    value = float(value)
    if np.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.3g}"


def clip_text(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"
