"""What a reviewer sees of a run's flagged examples, ready to render: the example itself (an image,
its text or its feature row), label and prediction, every flag signal with its rank, the loss
trajectory, and the test examples it helps and hurts most. Shared by the review page and the
self-contained review sheet; reads run outputs only through ``RunLayout``."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from ..influence.errors import InfluenceInputError
from ..influence.loss_tables import step_column, steps_of
from ..influence.signals import SIGNAL_COLUMNS, flag_score
from .layout import RunLayout
from .queue import read_review_queue

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


@dataclass
class RunEvidence:
    """One run's review queue with everything shown beside each flagged example."""

    layout: RunLayout
    queue: pd.DataFrame
    info: dict
    train_config: dict | None = None
    # The run's outputs already in memory (the Dagster asset has them as inputs), by RunLayout
    # property name; anything not given is read through ``layout``.
    frames: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)
    _payloads: dict[int, Payload] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, layout: RunLayout, train_config: dict | None = None) -> "RunEvidence":
        """``train_config``: the run's recipe (``ContractRun.train_config``), used to rebuild its data
        for pictures; without it examples are shown by their text columns, if any."""
        queue, info = read_review_queue(layout.review_queue)
        return cls(layout, queue, info, train_config)

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    def _output(self, name: str) -> pd.DataFrame | None:
        """One of the run's outputs (a RunLayout property name): given in ``frames``, else read; None when
        the run has none (no predictions for runs whose data cannot be rebuilt)."""
        if name in self.frames:
            return self.frames[name]
        path = getattr(self.layout, name)
        return pd.read_parquet(path) if path.exists() else None

    @cached_property
    def examples(self) -> pd.DataFrame:
        return self._output("examples").set_index("example_id")

    @cached_property
    def predictions(self) -> pd.DataFrame | None:
        frame = self._output("predictions")
        return None if frame is None else frame.set_index("example_id")

    @cached_property
    def topk(self) -> pd.DataFrame | None:
        return self._output("topk")

    @cached_property
    def all_scores(self) -> pd.DataFrame | None:
        """Per-example scores of every training example (ranks are taken among all of them)."""
        frame = self._output("self_influence")
        return None if frame is None else frame.set_index("example_id")

    @cached_property
    def class_names(self) -> tuple[str, ...]:
        classes = self.info.get("num_classes")
        if classes is None:
            classes = int(self.examples["label"].max()) + 1
        names = self._bundle.class_names if self._bundle is not None else ()
        return tuple(names) if len(names) == classes else tuple(str(c) for c in range(classes))

    @cached_property
    def signal_columns(self) -> list[str]:
        """The signals of ``influence.signals`` that this run defines (confidence and variability are
        undefined for a loss that is not cross-entropy)."""
        return [c for c in SIGNAL_COLUMNS if c in self.queue.columns and self.queue[c].notna().any()]

    @cached_property
    def signal_ranks(self) -> pd.DataFrame:
        """(value, rank, out of) per defined signal for every queued id: the rank among all training
        examples that the queue carries (``<signal>_rank``, 1 = most suspicious)."""
        queue = self.queue.set_index("example_id")
        total = int(self.info.get("training_examples", len(queue)))
        columns = {}
        for name in self.signal_columns:
            columns[(name, "value")] = queue[name]
            columns[(name, "rank")] = queue[f"{name}_rank"]
            columns[(name, "of")] = total
        return pd.DataFrame(columns, index=queue.index)

    @cached_property
    def flag_standing(self) -> pd.DataFrame:
        """Per queued id: its flag score, the score's percentile among all training examples and its
        rank among them (1 = highest); percentile and rank are missing without the run's score file."""
        queue = self.queue.set_index("example_id")
        standing = pd.DataFrame({"score": queue["flag_score"], "percentile": np.nan, "rank": np.nan}, index=queue.index)
        if self.all_scores is not None:
            everyone = flag_score(self.all_scores, self.info["policy"]["score"])
            standing["percentile"], standing["rank"] = flag_score_standing(standing["score"], everyone)
        return standing

    def flagged_by(self, example_id: int) -> tuple[str, ...]:
        """The signals that flag the example on their own under the run's policy (``flagged_by``)."""
        return split_names(self.queue.set_index("example_id").at[example_id, "flagged_by"])

    @cached_property
    def flag_signal_names(self) -> tuple[str, ...]:
        """The signals that flag at least one queued example on their own, in ``SIGNAL_COLUMNS`` order."""
        named = {n for value in self.queue["flagged_by"] for n in split_names(value)}
        return tuple(c for c in SIGNAL_COLUMNS if c in named)

    def effects(self, example_ids) -> dict[int, tuple[pd.DataFrame, pd.DataFrame]]:
        """For each training id: (test examples it helps most, test examples it hurts most), best first,
        from the train-test top-k table (where the id is among a test example's proponents or opponents)."""
        ids = np.asarray(list(example_ids), dtype=np.int64)
        empty = pd.DataFrame(columns=["test_example_id", "score"])
        if self.topk is None:
            return {int(i): (empty, empty) for i in ids}
        top = self.topk
        helps = _strongest(top, "proponent_id", "proponent_score", ids, ascending=False)
        hurts = _strongest(top, "opponent_id", "opponent_score", ids, ascending=True)
        return {int(i): (helps.get(int(i), empty), hurts.get(int(i), empty)) for i in ids}

    def mispredicted_tests(self) -> pd.DataFrame:
        """Test examples whose prediction differs from the label, most confidently wrong first."""
        if self.predictions is None:
            return pd.DataFrame(columns=["example_id", "label", "predicted_label", "confidence"])
        test = self.predictions[self.predictions["split"] == "test"]
        wrong = test[test["predicted_label"] != test["label"]].reset_index()
        return wrong.sort_values("confidence", ascending=False, kind="stable").reset_index(drop=True)

    def neighbours(self, test_id: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(proponents, opponents) of one test example: training id and score, strongest first."""
        if self.topk is None:
            raise InfluenceInputError(f"run {self.run_id}: has no train-test top-k table yet")
        rows = self.topk[self.topk["test_example_id"] == int(test_id)].sort_values("rank")
        if rows.empty:
            raise InfluenceInputError(f"run {self.run_id}: {test_id} is not a test example with influence scores")
        proponents = rows[["proponent_id", "proponent_score"]].set_axis(["example_id", "score"], axis=1)
        opponents = rows[["opponent_id", "opponent_score"]].set_axis(["example_id", "score"], axis=1)
        return proponents.reset_index(drop=True), opponents.reset_index(drop=True)

    def loss_trajectories(self, example_ids, split: str = "train") -> dict[int, np.ndarray]:
        table = self._output("train_losses" if split == "train" else "test_losses").set_index("example_id")
        columns = [step_column(s) for s in steps_of(table.columns)]
        ids = [int(i) for i in example_ids]
        values = table.reindex(ids)[columns].to_numpy(np.float64)
        return dict(zip(ids, values))

    def payloads(self, example_ids) -> dict[int, Payload]:
        """How each example looks (computed once per id): a picture, its text, or its feature row."""
        ids = [int(i) for i in example_ids]
        missing = [i for i in ids if i not in self._payloads]
        if missing:
            self._payloads.update(self._build_payloads(missing))
        return {i: self._payloads[i] for i in ids if i in self._payloads}

    def _build_payloads(self, ids: list[int]) -> dict[int, Payload]:
        text_columns = [
            c for c in self.examples.columns if c != "split" and pd.api.types.is_string_dtype(self.examples[c])
        ]
        if text_columns:
            rows = self.examples.reindex(ids)[text_columns]
            return {
                i: Payload("text", text=_clip("\n".join(f"{c}: {v}" for c, v in row.items() if pd.notna(v))))
                for i, row in zip(ids, rows.to_dict("records"))
            }
        bundle = self._bundle
        if bundle is None:
            return {}
        all_ids = np.concatenate([bundle.train.example_ids, bundle.test.example_ids])
        features = np.concatenate([bundle.train.features.numpy(), bundle.test.features.numpy()])
        positions = pd.Index(all_ids).get_indexer(ids)
        found = [(i, p) for i, p in zip(ids, positions) if p >= 0]
        if self._is_image:
            return {i: Payload("image", image=image_data_uri(features[p])) for i, p in found}
        return {
            i: Payload(
                "features",
                features=tuple(
                    (f"x{j}", f"{v:.3g}") for j, v in enumerate(features[p].reshape(-1)[:FEATURES_SHOWN])
                ),
            )
            for i, p in found
        }

    @cached_property
    def _is_image(self) -> bool:
        return self._bundle is not None and len(self._bundle.input_shape) == 3

    @cached_property
    def _bundle(self):
        """The run's data rebuilt from its recipe (as images when the dataset has them); None when it cannot be."""
        if self.train_config is None:
            return None
        from ..training import TrainConfig, load_dataset

        try:
            config = TrainConfig.from_dict(self.train_config)
        except InfluenceInputError:  # another recipe (the LM recipe): its examples are shown by their text
            return None
        options = dict(seed=config.seed, test_fraction=config.test_fraction, label_column=config.label_column)
        for image in (True, False):
            try:
                return load_dataset(config.dataset, image=image, **options)
            except InfluenceInputError:
                continue
        return None


def _strongest(top: pd.DataFrame, id_column: str, score_column: str, ids: np.ndarray, *, ascending: bool) -> dict:
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


def sparkline_svg(values, width: int = 120, height: int = 28) -> str:
    """A loss trajectory as a small inline SVG polyline (first and last values are labelled beside it)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < 2:
        return ""
    low, high = float(finite.min()), float(finite.max())
    span = high - low or 1.0
    x = np.linspace(1, width - 1, len(values))
    y = height - 2 - (np.nan_to_num(values, nan=low) - low) / span * (height - 4)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="loss over checkpoints"><polyline fill="none" stroke="currentColor" stroke-width="1.5" '
        f'points="{points}"/><circle cx="{x[-1]:.1f}" cy="{y[-1]:.1f}" r="2" fill="currentColor"/></svg>'
    )


def short_number(value) -> str:
    """Three significant digits, as people read them ('' for a missing value)."""
    if value is None or pd.isna(value):
        return ""
    value = float(value)
    if np.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.3g}"


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"
