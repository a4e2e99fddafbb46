"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .protocols import Record
from .report import ALL_STRUCTURES

PREFERRED_REFERENCE = "model"  # the qualitative figure ranks cases by this method's Dice when present


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def dice_bars(summary: list[dict], setting: str, path: Path) -> Path:
    """Mean Dice with 95% intervals: one panel per group, structures on x, one bar per method."""
    plt = _pyplot()
    rows = [row for row in summary if row["setting"] == setting and row["dice"]]
    groups = list(dict.fromkeys(row["group"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    widest = max(len({row["structure"] for row in rows if row["group"] == group}) for group in groups)
    figure, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 0.3 * len(methods) * widest + 1.5) * len(groups), 4.2), squeeze=False)
    width = 0.8 / len(methods)
    for axis, group in zip(axes[0], groups):
        names = list(dict.fromkeys(row["structure"] for row in rows if row["group"] == group))
        for offset, method in enumerate(methods):
            found = {row["structure"]: row["dice"] for row in rows if row["group"] == group and row["method"] == method}
            x = [n + offset * width for n, name in enumerate(names) if name in found]
            means = np.array([found[name]["mean"] for name in names if name in found])
            bounds = np.array([found[name]["ci95"] for name in names if name in found]).reshape(-1, 2)
            axis.bar(x, means, width, yerr=np.abs(bounds.T - means), capsize=2, label=method)
        axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right", fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_ylabel("Dice")
        axis.set_title(group)
        axis.legend(fontsize=8)
    figure.suptitle(setting)
    return _save(plt, figure, path)


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
    figure, axes = plt.subplots(len(picks), len(methods), figsize=(2.6 * len(methods), 2.8 * len(picks)), squeeze=False)
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
            for mask, colour in ((view["truth"], "lime"), (view["prediction"], "red")):
                if mask.any() and not mask.all():
                    axis.contour(mask, levels=[0.5], colors=colour, linewidths=1.0)
            axis.set_title(f"{rank}: {pick.structure.case.id}\n{pick.structure.name}\n{method} Dice {record.scores.dice:.3f}", fontsize=7)
    figure.suptitle(f"{setting} (ranked by {reference})", fontsize=9)
    return _save(plt, figure, path)


def draw_all(records: list[Record], summary: list[dict], folder: Path) -> dict[str, list[Path]]:
    """Every figure of the run, by setting: bar chart, click curve (interactive), overlay grid."""
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {}
    for setting in dict.fromkeys(r.setting for r in records):
        made = []
        if any(row["setting"] == setting and row["dice"] for row in summary):
            made.append(dice_bars(summary, setting, folder / f"dice-{slug(setting)}.png"))
        if any(row["setting"] == setting and row.get("dice_after_click") for row in summary):
            made.append(click_curves(summary, setting, folder / f"clicks-{slug(setting)}.png"))
        made.append(overlay_grid(records, setting, folder / f"overlays-{slug(setting)}.png"))
        figures[setting] = [figure for figure in made if figure is not None]
    return figures
