"""Pictures a person looks at: the loss and quality curves, as PNG bytes (the sample grids: `gan.grid`).

They return bytes rather than writing files, so the caller can put them on any storage.
"""

from __future__ import annotations

import functools
import io
from types import ModuleType
from typing import TYPE_CHECKING, Sequence


if TYPE_CHECKING:
    from matplotlib.figure import Figure


@functools.cache
def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend (no display on workers or in CI), loaded on first use."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported, once
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot().close(figure)
    return buffer.getvalue()


def epoch_axis(axis) -> None:
    """Whole epochs on the x axis (a short run would otherwise get 1.2, 1.4, ...)."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)


def loss_curves_png(rows: Sequence[dict]) -> bytes:
    """Per-epoch D and G losses from `metrics.jsonl` rows; the legend below the plot, off the curves."""
    plt = pyplot()
    epochs = [row["epoch"] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4.4), layout="constrained")
    axis.plot(epochs, [row["loss_d"] for row in rows], marker="o", label="discriminator")
    axis.plot(epochs, [row["loss_g"] for row in rows], marker="o", label="generator")
    axis.set_ylabel("mean loss")
    epoch_axis(axis)
    figure.legend(loc="outside lower center", ncol=2, frameon=False)
    return png_bytes(figure)


def quality_curves_png(rows: Sequence[dict]) -> bytes:
    """Training-time quality from `metrics.jsonl` rows: FID in the classifier's space and class coverage."""
    plt = pyplot()
    scored = [row for row in rows if "quality" in row]
    epochs = [row["epoch"] for row in scored]
    figure, (fid_axis, modes_axis) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    fid_axis.plot(
        epochs, [row["quality"]["fid_classifier"] for row in scored], marker="o", label="FID: generated vs test"
    )
    fid_axis.plot(
        epochs,
        [row["quality"]["fid_classifier_floor"] for row in scored],
        linestyle="--",
        label="FID floor: train vs test",
    )
    fid_axis.set_ylabel("FID (classifier features)")
    # Coverage: of the classes for labelled data; unlabelled data has none, and its recall stands in for it.
    labelled = all(row["quality"].get("modes_covered") is not None for row in scored)
    key, label = ("modes_covered", "classes covered (>= 2 %)") if labelled else ("recall", "recall")
    values = [row["quality"][key] for row in scored]
    modes_axis.plot(epochs, values, marker="o", color="tab:green", label=label)
    modes_axis.set_ylim(0, max([10, *values]) + 0.5 if labelled else 1.05)
    modes_axis.set_ylabel(label)
    for axis in (fid_axis, modes_axis):
        epoch_axis(axis)
    figure.legend(loc="outside lower center", ncol=3, frameon=False)  # below both plots, never on the data
    return png_bytes(figure)
