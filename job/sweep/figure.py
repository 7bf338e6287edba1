"""`sweep.png`: a sweep at a glance, drawn with the run's own plotting helpers (`gan.plots`)."""

from __future__ import annotations

import itertools
from typing import Sequence

from gan.plots import epoch_axis, png_bytes, pyplot


def sweep_png(
    curves: dict[str, list[tuple[int, float]]],  # per trial: (epoch, FID) as it trained
    best: str | None,  # the winning trial, highlighted
    searched: dict[str, dict[str, float]],  # per searched setting: trial -> its value
    final_fid: dict[str, float],  # per trial, in trial order: the FID each panel of a setting shows (its last)
    log_scaled: Sequence[str] = (),  # searched settings drawn on a log axis
) -> bytes:
    """A sweep at a glance: FID against epoch per trial (the best highlighted), FID against each searched setting,
    and the best FID found against the number of trials."""
    plt = pyplot()
    panels = 2 + len(searched)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False)
    curve_axis, *setting_axes, budget_axis = axes[0]
    for trial, points in curves.items():
        if not points:
            continue
        epochs, fids = zip(*points)
        highlighted = trial == best
        curve_axis.plot(
            epochs,
            fids,
            marker="o",
            markersize=3,
            linewidth=2.5 if highlighted else 1,
            color="tab:red" if highlighted else "tab:gray",
            alpha=1 if highlighted else 0.6,
            label=f"best: {trial}" if highlighted else None,
            zorder=3 if highlighted else 2,
        )
    curve_axis.set(xlabel="epoch", ylabel="FID (classifier)", yscale="log", title="FID per trial")
    epoch_axis(curve_axis)
    if best is not None:
        curve_axis.legend(fontsize=8)
    for axis, (name, values) in zip(setting_axes, searched.items()):
        trials = [t for t in values if t in final_fid]
        colours = ["tab:red" if t == best else "tab:blue" for t in trials]
        axis.scatter([values[t] for t in trials], [final_fid[t] for t in trials], c=colours)
        axis.set(xlabel=name, ylabel="FID (final where re-scored)", yscale="log", title=f"FID against {name}")
        if name in log_scaled:
            axis.set_xscale("log")
    best_so_far = list(itertools.accumulate(final_fid.values(), min))  # final_fid comes in trial order
    budget_axis.step(range(1, len(best_so_far) + 1), best_so_far, where="post", marker="o")
    epoch_axis(budget_axis)
    budget_axis.set(xlabel="trials", ylabel="best FID so far", yscale="log", title="best found against trials")
    figure.tight_layout()
    return png_bytes(figure)
