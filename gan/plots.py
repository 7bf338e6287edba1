"""Pictures a person looks at: the loss and quality curves, as PNG bytes (the sample grids: `gan.grid`).

They return bytes rather than writing files, so the caller can put them on any storage.
"""

from __future__ import annotations

import functools
import io
import itertools
from types import ModuleType
from typing import TYPE_CHECKING, Sequence


if TYPE_CHECKING:
    from matplotlib.figure import Figure


@functools.cache
def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend (no display on workers or in CI), loaded on first use."""
    import matplotlib  # why: heavy optional dependency, kept off the CLI's start-up path

    matplotlib.use("Agg")  # before pyplot is imported, once
    import matplotlib.pyplot as plt  # why: as above

    return plt


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _pyplot().close(figure)
    return buffer.getvalue()


def _epoch_axis(axis) -> None:
    """Whole epochs on the x axis (a short run would otherwise get 1.2, 1.4, ...)."""
    from matplotlib.ticker import MaxNLocator  # why: matplotlib is heavy, loaded with pyplot on first use

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)


def loss_curves_png(rows: Sequence[dict]) -> bytes:
    """Per-epoch D and G losses from `metrics.jsonl` rows; the legend below the plot, off the curves."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4.4), layout="constrained")
    axis.plot(epochs, [row["loss_d"] for row in rows], marker="o", label="discriminator")
    axis.plot(epochs, [row["loss_g"] for row in rows], marker="o", label="generator")
    axis.set_ylabel("mean loss")
    _epoch_axis(axis)
    figure.legend(loc="outside lower center", ncol=2, frameon=False)
    return _png(figure)


def quality_curves_png(rows: Sequence[dict]) -> bytes:
    """Training-time quality from `metrics.jsonl` rows: FID in the classifier's space and class coverage."""
    plt = _pyplot()
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
    modes_axis.plot(epochs, [row["quality"]["modes_covered"] for row in scored], marker="o", color="tab:green",
                    label="classes covered (>= 2 %)")  # fmt: skip
    modes_axis.set_ylim(0, 10.5)
    modes_axis.set_ylabel("classes covered (>= 2 %)")
    for axis in (fid_axis, modes_axis):
        _epoch_axis(axis)
    figure.legend(loc="outside lower center", ncol=3, frameon=False)  # below both plots, never on the data
    return _png(figure)


def sweep_png(
    curves: dict[str, list[tuple[int, float]]],  # per trial: (epoch, FID) as it trained
    best: str | None,  # the winning trial, highlighted
    searched: dict[str, dict[str, float]],  # per searched setting: trial -> its value
    final_fid: dict[str, float],  # per trial, in trial order: the FID each panel of a setting shows (its last)
    log_scaled: Sequence[str] = (),  # searched settings drawn on a log axis
) -> bytes:
    """A sweep at a glance: FID against epoch per trial (the best highlighted), FID against each searched setting,
    and the best FID found against the number of trials."""
    plt = _pyplot()
    panels = 2 + len(searched)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False)
    curve_axis, *setting_axes, budget_axis = axes[0]
    for trial, points in curves.items():
        if not points:
            continue
        epochs, fids = zip(*points)
        highlighted = trial == best
        curve_axis.plot(epochs, fids, marker="o", markersize=3, linewidth=2.5 if highlighted else 1,
                        color="tab:red" if highlighted else "tab:gray", alpha=1 if highlighted else 0.6,
                        label=f"best: {trial}" if highlighted else None, zorder=3 if highlighted else 2)  # fmt: skip
    curve_axis.set(xlabel="epoch", ylabel="FID (classifier)", yscale="log", title="FID per trial")
    _epoch_axis(curve_axis)
    if best is not None:
        curve_axis.legend(fontsize=8)
    for axis, (name, values) in zip(setting_axes, searched.items()):
        trials = [t for t in values if t in final_fid]
        axis.scatter([values[t] for t in trials], [final_fid[t] for t in trials],
                     c=["tab:red" if t == best else "tab:blue" for t in trials])  # fmt: skip
        axis.set(xlabel=name, ylabel="FID (final where re-scored)", yscale="log", title=f"FID against {name}")
        if name in log_scaled:
            axis.set_xscale("log")
    best_so_far = list(itertools.accumulate(final_fid.values(), min))  # final_fid comes in trial order
    budget_axis.step(range(1, len(best_so_far) + 1), best_so_far, where="post", marker="o")
    _epoch_axis(budget_axis)
    budget_axis.set(xlabel="trials", ylabel="best FID so far", yscale="log", title="best found against trials")
    figure.tight_layout()
    return _png(figure)
