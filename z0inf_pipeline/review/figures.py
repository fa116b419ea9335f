"""Figures for the review UI: a histogram of the flag score with its cut-off, a grid of flagged images."""

from __future__ import annotations

import base64
import io

import numpy as np


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def histogram_png(scores, cutoff: float, title: str, *, flagged: int | None = None, axis_label: str = "flag score") -> bytes:
    """Histogram of the flag score, on a log axis when it is positive (losses and self-influence are
    heavy-tailed), the cut-off as a red line. ``flagged``: the policy's count (``Flags.count``; the
    review budget can flag fewer than score at or above the cut-off), else those at or above it."""
    scores = np.asarray(scores, dtype=np.float64)
    fig = _figure(7, 3.2)
    ax = fig.subplots()
    positive = scores[scores > 0]
    if len(positive) and positive.min() < positive.max():
        bins = np.geomspace(positive.min(), positive.max(), 60)
        ax.set_xscale("log")
    else:
        positive, bins = scores, 60
    ax.hist(positive, bins=bins, color="#4c72b0")
    flagged = int((scores >= cutoff).sum()) if flagged is None else int(flagged)
    ax.axvline(cutoff, color="#c44e52", linewidth=2, label=f"cut-off {cutoff:.3g}: {flagged} flagged")
    ax.set_xlabel(axis_label)
    ax.set_ylabel("training examples")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def image_grid_png(images: np.ndarray, captions: list[str], columns: int = 10) -> bytes:
    """Images (n, H, W) in a grid, each with its (short, may be two-line) caption."""
    images = np.asarray(images)
    count = len(images)
    rows = max(1, -(-count // columns))
    fig = _figure(1.05 * columns, 1.45 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(image, cmap="gray_r", interpolation="nearest")
        ax.set_title(caption, fontsize=7, linespacing=1.1)
    return _png(fig)


def markdown_image(png: bytes, alt: str) -> str:
    """A PNG embedded in markdown (base64 data URI), as Dagster's markdown metadata renders it."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
