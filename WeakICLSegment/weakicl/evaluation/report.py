"""Summaries with bootstrap intervals, `results.json` (every number) and `report.md` (a plain
one-page summary first, then the tables and figures).

`report.md` is made from what `results.json` holds, so a change of layout is applied to an existing
run without evaluating again: `python -m weakicl.evaluation.report reports/engine-0.3`.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..atomic import atomic_path
from ..provenance import portable_command, portable_path
from .metrics import bootstrap_mean
from .protocols import Record

ALL_STRUCTURES = "all"
MODEL = "model"
PROTOCOL_WORDS = {  # what each protocol gives a method, in plain words
    "propagate": "boxes drawn on a few slices of the structure itself; the method outlines it in 3D",
    "cross-weak": "k other subjects with boxes on the structure as examples; nothing drawn on the target",
    "cross-dense": "k other subjects with full masks as examples; nothing drawn on the target",
    "interactive": "as propagate, then simulated corrective clicks where the result is most wrong",
}
GROUP_WORDS = {"validation": "held-out cases of the training collections", "unseen": "anatomy never used in training",
               "all": "every labelled structure"}
OVERLAY_LEGEND = ("Overlays: green outline = truth, red outline with yellow fill = prediction; rows are the best, "
                  "median and worst structure by the model's Dice (the first method when there is no model).")
BARS_LEGEND = "Bars: mean Dice per structure and method; whiskers: 95 % bootstrap interval (none where n = 1)."
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
            honoured = [h for r in done for h in r.clicks_honoured]
            if honoured:  # how clicks count: on their side, and nothing changed far from them
                row["clicks_honoured_fraction"] = float(np.mean(honoured))
                row["far_dice_change_mean"] = float(np.mean([c for r in done for c in r.far_dice_change]))
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
    """Mean [95 % interval]; the mean alone for a single structure, where an interval means nothing."""
    if interval is None:
        return "–"
    if interval.get("n", 2) < 2:
        return f"{interval['mean']:.{digits}f}"
    low, high = interval["ci95"]
    return f"{interval['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _table(rows: list[dict]) -> list[str]:
    clicks = any(row["click_auc"] for row in rows)
    header = "| method | structure | n | Dice [95% CI] | HD95 mm [95% CI] | NSD 2 mm [95% CI] | s / case |"
    lines = [header + (" click AUC [95% CI] | Dice after clicks 0..N | clicks on their side | Dice change > 20 mm from a click |"
                       if clicks else ""),
             "|" + "---|" * (header.count("|") - 1 + (4 if clicks else 0))]
    for row in rows:
        empty = f" ({row['empty_predictions']} empty)" if row["empty_predictions"] else ""
        line = (f"| {row['method']} | {row['structure']} | {row['evaluated']} | {_cell(row['dice'], 3)} | "
                f"{_cell(row['hd95_mm'], 2)}{empty} | {_cell(row['nsd'], 3)} | {row['seconds']['mean']:.2f} |")
        if clicks:
            curve = " ".join(f"{d:.3f}" for d in row.get("dice_after_click", []))
            honoured = row.get("clicks_honoured_fraction")
            far = row.get("far_dice_change_mean")
            line += (f" {_cell(row['click_auc'], 3)} | {curve} | {'–' if honoured is None else f'{100 * honoured:.0f} %'} |"
                     f" {'–' if far is None else f'{far:+.4f}'} |")
        lines.append(line)
    return lines


def _exceptions(records: list[dict]) -> list[str]:
    """Why some method/structure pairs have no numbers: one line per distinct reason."""
    reasons = Counter((r["method"], r["status"], r.get("reason", "")) for r in records if r["status"] != "ok")
    return [f"- {method} {status}: {reason} ({count} structure{'s' if count > 1 else ''})"
            for (method, status, reason), count in reasons.items()]


def plain_summary(run: dict, summary: list[dict]) -> list[str]:
    """The first page: per setting and group, the model's Dice against the best other method, in words."""
    overall = [row for row in summary if row["structure"] == ALL_STRUCTURES and row["dice"]]
    lines = ["## Summary", "",
             "How well each method outlines anatomical structures in 3D images, measured by Dice: the overlap of "
             "the outline with the reference outline of the data set, from 0 (none) to 1 (identical). "
             f"{run['structures_evaluated']} structures were evaluated; n is the number of structures behind a number.", "",
             "| setting | structures | n | model Dice | best other method | Dice | in short |", "|---|---|---|---|---|---|---|"]
    for setting, group in dict.fromkeys((row["setting"], row["group"]) for row in overall):
        rows = sorted((row for row in overall if (row["setting"], row["group"]) == (setting, group)),
                      key=lambda row: row["dice"]["mean"], reverse=True)
        model = next((row for row in rows if row["method"] == MODEL), None)
        other = next((row for row in rows if row["method"] != MODEL), None)
        if model and other:
            gap = model["dice"]["mean"] - other["dice"]["mean"]
            verdict = ("the model is better" if gap > 0.01 else f"{other['method']} is better" if gap < -0.01
                       else "about the same")
        else:
            verdict = ""
        n = (model or other)["dice"]["n"]
        lines.append(f"| {setting} | {group} ({GROUP_WORDS.get(group, group)}) | {n} | "
                     f"{_cell(model['dice'], 3) if model else 'not run'} | {other['method'] if other else '–'} | "
                     f"{_cell(other['dice'], 3) if other else '–'} | {verdict} |")
    protocols = dict.fromkeys(row["setting"].split(" ")[0] for row in overall)
    lines += [""] + [f"- **{protocol}**: {PROTOCOL_WORDS[protocol]}." for protocol in protocols if protocol in PROTOCOL_WORDS]
    lines += ["- Brackets are 95 % bootstrap intervals over structures; a structure measured once has none.",
              "- These numbers hold for these data and prompts only. Research use; not a medical device.",
              "- How the protocols, baselines and metrics work: docs/EVALUATION.md in the source tree.", ""]
    return lines


def write_report(path: Path, run: dict, records: list[dict], summary: list[dict], figures: dict[str, list[Path]]) -> None:
    """Markdown: a plain summary, the run's facts, then per protocol variant a table per group and its
    figures with their legends. `records` are as in results.json (`Record.as_dict`)."""
    lines = ["# WeakICL evaluation", ""] + plain_summary(run, summary)
    lines += ["## How this was run", "", f"- command: `{run['command']}`", f"- manifest: `{run['manifest']}`"]
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
    for setting in dict.fromkeys(r["setting"] for r in records):
        lines += [f"## {setting}", ""]
        in_setting = [r for r in records if r["setting"] == setting]
        for group in dict.fromkeys(r["group"] for r in in_setting):
            rows = [row for row in summary if row["setting"] == setting and row["group"] == group and row["evaluated"]]
            lines += [f"### {group}", ""] + (_table(rows) if rows else ["No method was applicable (see below)."]) + [""]
        lines += _exceptions(in_setting) + [""]
        for figure in figures.get(setting, []):
            legend = OVERLAY_LEGEND if figure.name.startswith("overlays-") else BARS_LEGEND if figure.name.startswith("dice-") else ""
            lines += [f"![{figure.stem}]({figure.parent.name}/{figure.name})", ""] + ([f"*{legend}*", ""] if legend else [])
    write_atomically(path, "\n".join(lines))


def portable_record(value: Any, key: str = "") -> Any:
    """A copy of a results.json value with commands and absolute paths made portable (older runs hold them)."""
    if isinstance(value, dict):
        return {k: portable_record(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_record(v) for v in value]
    if isinstance(value, str) and key == "command":
        return portable_command(shlex.split(value))
    if isinstance(value, str) and value.startswith("/"):
        return portable_path(value)
    return value


def rewrite_report(folder: Path) -> Path:
    """Rebuild report.md and the summary figures of an evaluation folder from its results.json, without
    evaluating again; overlay figures need the images and are kept as they are. Recorded paths are made
    portable in results.json too (relative to the working folder: run it from the repository root)."""
    from .figures import draw_summary_figures

    results_path = folder / "results.json"
    document = json.loads(results_path.read_text())
    portable = {key: portable_record(value, key) for key, value in document.items() if key not in ("summary", "records")}
    if any(portable[key] != document[key] for key in portable):
        write_atomically(results_path, json.dumps({**document, **portable}, indent=1, allow_nan=False) + "\n")
    summary, records = document["summary"], document["records"]
    figures = draw_summary_figures(summary, folder / "figures")
    for setting in figures:
        overlay = folder / "figures" / f"overlays-{slug(setting)}.png"
        figures[setting] += [overlay] if overlay.is_file() else []
    write_report(folder / "report.md", portable, records, summary, figures)
    return folder / "report.md"


def slug(text: str) -> str:
    """File-name form of a setting label: "cross-weak (k=1)" -> "cross-weak-k-1"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    folders = [Path(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    for folder in folders:
        print(f"rewrote {rewrite_report(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
