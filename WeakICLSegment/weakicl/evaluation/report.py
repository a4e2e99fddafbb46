"""Summaries with bootstrap intervals, `results.json` (every number) and `report.md` (tables)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from .metrics import bootstrap_mean
from .protocols import Record

ALL_STRUCTURES = "all"
METRICS: dict[str, Callable[[Record], float | None]] = {
    "dice": lambda r: r.scores.dice,
    "hd95_mm": lambda r: r.scores.hd95,
    "nsd": lambda r: r.scores.nsd,
    "seconds": lambda r: r.seconds,
    "click_auc": lambda r: r.auc,
}


def grouped(records: list[Record]) -> dict[tuple[str, str, str], list[Record]]:
    """Records by (setting, group, method), in the order they were produced."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for record in records:
        groups.setdefault((record.setting, record.structure.group, record.method), []).append(record)
    return groups


def summarise(records: list[Record], seed: int) -> list[dict]:
    """One row per setting, group, method and structure (plus "all"): means with 95% bootstrap
    intervals over the evaluated structures, and how many were not applicable or failed."""
    rows = []
    for (setting, group, method), chunk in grouped(records).items():
        for name in [ALL_STRUCTURES] + sorted({r.structure.name for r in chunk}):
            subset = chunk if name == ALL_STRUCTURES else [r for r in chunk if r.structure.name == name]
            done = [r for r in subset if r.status == "ok"]
            statuses = Counter(r.status for r in subset)
            row = {"setting": setting, "group": group, "method": method, "structure": name, "evaluated": len(done),
                   "not_applicable": statuses["n/a"], "failed": statuses["failed"],
                   "empty_predictions": sum(r.scores.hd95 is None for r in done)}
            for metric, value in METRICS.items():
                interval = bootstrap_mean([value(r) for r in done], seed) if done else None
                row[metric] = interval.as_dict() if interval else None
            if done and done[0].click_dice:
                row["dice_after_click"] = np.mean([r.click_dice for r in done], axis=0).tolist()
            rows.append(row)
    return rows


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` only once the new content is complete, so an interrupted run leaves no half file."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_results(path: Path, run: dict, records: list[Record], summary: list[dict]) -> None:
    document = {**run, "summary": summary, "records": [r.as_dict() for r in records]}
    write_atomically(path, json.dumps(document, indent=1, allow_nan=False) + "\n")


def _cell(interval: dict | None, digits: int) -> str:
    if interval is None:
        return "–"
    low, high = interval["ci95"]
    return f"{interval['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _table(rows: list[dict]) -> list[str]:
    clicks = any(row["click_auc"] for row in rows)
    header = "| method | structure | n | Dice [95% CI] | HD95 mm [95% CI] | NSD 2 mm [95% CI] | s / case |"
    lines = [header + (" click AUC [95% CI] | Dice after clicks 0..N |" if clicks else ""),
             "|" + "---|" * (header.count("|") - 1 + (2 if clicks else 0))]
    for row in rows:
        empty = f" ({row['empty_predictions']} empty)" if row["empty_predictions"] else ""
        line = (f"| {row['method']} | {row['structure']} | {row['evaluated']} | {_cell(row['dice'], 3)} | "
                f"{_cell(row['hd95_mm'], 2)}{empty} | {_cell(row['nsd'], 3)} | {row['seconds']['mean']:.2f} |")
        if clicks:
            curve = " ".join(f"{d:.3f}" for d in row.get("dice_after_click", []))
            line += f" {_cell(row['click_auc'], 3)} | {curve} |"
        lines.append(line)
    return lines


def _exceptions(records: list[Record]) -> list[str]:
    """Why some method/structure pairs have no numbers: one line per distinct reason."""
    reasons = Counter((r.method, r.status, r.reason) for r in records if r.status != "ok")
    return [f"- {method} {status}: {reason} ({count} structure{'s' if count > 1 else ''})"
            for (method, status, reason), count in reasons.items()]


def write_report(path: Path, run: dict, records: list[Record], summary: list[dict], figures: dict[str, list[Path]]) -> None:
    """Markdown: the run's facts, then per protocol variant a table per group and its figures."""
    lines = ["# WeakICL evaluation", "", f"- command: `{run['command']}`", f"- manifest: `{run['manifest']}`"]
    for method, details in run["methods"].items():
        shown = {key: value for key, value in details.items() if not isinstance(value, dict)}
        if shown:
            lines.append(f"- {method}: " + ", ".join(f"{key} = {value}" for key, value in shown.items()))
    skipped = run["skipped_structures"]
    lines += [f"- structures evaluated: {run['structures_evaluated']}; skipped (< {run['min_voxels']} voxels): {len(skipped)}"
              + (" (" + ", ".join(s["case"] + "/" + s["structure"] for s in skipped) + ")" if skipped else ""),
              f"- prompts: seed {run['settings']['seed']}; metrics: Dice, 95% Hausdorff (mm), normalised surface Dice at"
              f" {run['surface_tolerance_mm']:g} mm; means with 95% seeded bootstrap intervals over structures;"
              " HD95 is undefined for empty predictions (counted, left out of its mean). In interactive settings"
              " Dice, HD95 and NSD are those after the last click; s / case is the method's own time, all calls included.", ""]
    for setting in dict.fromkeys(r.setting for r in records):
        lines += [f"## {setting}", ""]
        in_setting = [r for r in records if r.setting == setting]
        for group in dict.fromkeys(r.structure.group for r in in_setting):
            rows = [row for row in summary if row["setting"] == setting and row["group"] == group and row["evaluated"]]
            lines += [f"### {group}", ""] + (_table(rows) if rows else ["No method was applicable (see below)."]) + [""]
        lines += _exceptions(in_setting) + [""]
        lines += [f"![{figure.stem}]({figure.parent.name}/{figure.name})" for figure in figures.get(setting, [])] + [""]
    write_atomically(path, "\n".join(lines))
