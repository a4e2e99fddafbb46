"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed).

Every figure has a legend, and panels wrap into rows so that none is wider than a page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .protocols import Record
from .report import ALL_STRUCTURES, slug

PREFERRED_REFERENCE = "model"  # the qualitative figure ranks cases by this method's Dice when present
STRUCTURES_PER_ROW = 7  # bar-chart panels wrap after this many structures (split evenly over the rows)
TRUTH_COLOUR, PREDICTION_COLOUR = "lime", "red"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    """`rect`: the part of the figure the panels may fill, leaving room for a figure-level legend."""
    figure.tight_layout(rect=rect)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def dice_bars(summary: list[dict], setting: str, path: Path) -> Path:
    """Mean Dice with 95% intervals (none for a single structure): one panel per group and run of at
    most STRUCTURES_PER_ROW structures, stacked in rows; one bar per method, one legend for all."""
    plt = _pyplot()
    rows = [row for row in summary if row["setting"] == setting and row["dice"]]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    panels = []  # (group, structure names) per row of the figure
    for group in dict.fromkeys(row["group"] for row in rows):
        names = list(dict.fromkeys(row["structure"] for row in rows if row["group"] == group))
        count = -(-len(names) // STRUCTURES_PER_ROW)
        size = -(-len(names) // count)
        panels += [(group if count == 1 else f"{group} ({part + 1}/{count})", names[part * size:(part + 1) * size])
                   for part in range(count)]
    widest = max(len(names) for _, names in panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(5.0, 0.22 * len(methods) * widest + 2.0), 3.0 * len(panels) + 0.6),
                                squeeze=False)
    width = 0.8 / len(methods)
    for axis, (title, names) in zip(axes[:, 0], panels):
        group = title.split(" (")[0]
        for offset, method in enumerate(methods):
            found = {row["structure"]: row["dice"] for row in rows if row["group"] == group and row["method"] == method}
            shown = [name for name in names if name in found]
            x = np.array([names.index(name) + offset * width for name in shown])
            means = np.array([found[name]["mean"] for name in shown])
            axis.bar(x, means, width, label=method, color=f"C{offset}")
            spread = [found[name]["n"] > 1 for name in shown]  # no interval for a single structure
            if any(spread):
                bounds = np.array([found[name]["ci95"] for name in shown]).reshape(-1, 2)[spread]
                axis.errorbar(x[spread], means[spread], yerr=np.abs(bounds.T - means[spread]), fmt="none",
                              ecolor="black", elinewidth=1, capsize=2)
        axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20, ha="right", fontsize=8)
        axis.set_xlim(-0.5, widest - 0.2)
        axis.set_ylim(0, 1)
        axis.set_ylabel("Dice")
        axis.set_title(title, fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", fontsize=8, ncol=len(methods))
    figure.suptitle(setting, x=0.02, ha="left", fontsize=10)
    return _save(plt, figure, path, rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))


def click_curves(summary: list[dict], setting: str, path: Path) -> Path:
    """Mean Dice after 0..N corrective clicks, one line per method and group."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for row in summary:
        if row["setting"] == setting and row["structure"] == ALL_STRUCTURES and row.get("dice_after_click"):
            curve = row["dice_after_click"]
            axis.plot(range(len(curve)), curve, marker="o", label=f"{row['method']} ({row['group']}, AUC {row['click_auc']['mean']:.3f})")
    axis.set_xlabel("corrective clicks")
    axis.set_ylabel("mean Dice")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title(setting, fontsize=10)
    return _save(plt, figure, path)


def overlay_grid(records: list[Record], setting: str, path: Path) -> Path | None:
    """Best, median and worst structure by the reference method's Dice (rows), every method (columns):
    the axial slice through the structure's centre, truth outline green, prediction red."""
    done = [r for r in records if r.setting == setting and r.status == "ok"]
    if not done:
        return None
    methods = list(dict.fromkeys(r.method for r in done))
    reference = PREFERRED_REFERENCE if PREFERRED_REFERENCE in methods else methods[0]
    ranked = sorted((r for r in done if r.method == reference), key=lambda r: r.scores.dice, reverse=True)
    picks = {"best": ranked[0], "median": ranked[len(ranked) // 2], "worst": ranked[-1]}
    by_key = {(r.structure.key, r.structure.group, r.method): r for r in done}
    plt = _pyplot()
    figure, axes = plt.subplots(len(picks), len(methods), figsize=(max(2.6 * len(methods), 4.0), 2.8 * len(picks)), squeeze=False)
    for row, (rank, pick) in enumerate(picks.items()):
        for column, method in enumerate(methods):
            axis = axes[row][column]
            axis.axis("off")
            record = by_key.get((pick.structure.key, pick.structure.group, method))
            if record is None:
                continue
            view = record.preview
            axis.imshow(view["image"], cmap="gray")
            axis.imshow(np.ma.masked_where(~view["prediction"], view["prediction"]), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
            for mask, colour in ((view["truth"], TRUTH_COLOUR), (view["prediction"], PREDICTION_COLOUR)):
                if mask.any() and not mask.all():
                    axis.contour(mask, levels=[0.5], colors=colour, linewidths=1.0)
            axis.set_title(f"{rank}: {pick.structure.case.id}\n{pick.structure.name}\n{method} Dice {record.scores.dice:.3f}", fontsize=7)
    figure.suptitle(f"{setting} (ranked by {reference})", fontsize=9)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure.legend([Line2D([], [], color=TRUTH_COLOUR), Patch(facecolor=(1.0, 1.0, 0.0, 0.35), edgecolor=PREDICTION_COLOUR)],
                  ["truth (outline)", "prediction (outline, fill)"], loc="lower center", ncol=2, fontsize=7)
    return _save(plt, figure, path, rect=(0, 0.05, 1, 1))


def draw_summary_figures(summary: list[dict], folder: Path) -> dict[str, list[Path]]:
    """The figures made from numbers alone, by setting: bar chart and click curve (interactive)."""
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {}
    for setting in dict.fromkeys(row["setting"] for row in summary):
        made = figures.setdefault(setting, [])
        if any(row["setting"] == setting and row["dice"] for row in summary):
            made.append(dice_bars(summary, setting, folder / f"dice-{slug(setting)}.png"))
        if any(row["setting"] == setting and row.get("dice_after_click") for row in summary):
            made.append(click_curves(summary, setting, folder / f"clicks-{slug(setting)}.png"))
    return figures


def draw_all(records: list[Record], summary: list[dict], folder: Path) -> dict[str, list[Path]]:
    """Every figure of the run, by setting: bar chart, click curve (interactive), overlay grid."""
    figures = draw_summary_figures(summary, folder)
    for setting in dict.fromkeys(r.setting for r in records):
        overlay = overlay_grid(records, setting, folder / f"overlays-{slug(setting)}.png")
        figures.setdefault(setting, []).extend([overlay] if overlay is not None else [])
    return figures
