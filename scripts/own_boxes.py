"""What a whole volume's second pass is worth: propagation from slice boxes drawn around what the first
pass is sure of (`weakicl.session.OWN_BOX_LEVEL`), kept where both passes agree (`OWN_BOX_AGREEMENT`).

    python scripts/own_boxes.py --manifest ../shared/data/manifest.json --out reports/own-boxes
    python scripts/own_boxes.py --manifest ../shared/data/manifest.json --validation --out reports/own-boxes-validation

Segments, the way `Segmenter.segment` does without target prompts, (1) the tuning hippocampi from
another tuning subject's 3 slice boxes (cross-weak k=1), (2) the tuning structures of the abdominal CT and
MR from the other modality's slice boxes (cross-weak) and label (cross-dense), and (3) the brain MR's four
cerebral white matter and cortex labels from their own slice boxes registered onto themselves. All are
training tasks: this is where the constants are chosen. Per trial it records the Dice of the first pass,
of the second pass alone, of their mean inside the second pass's frame (the engine's combination), and
the two masks' agreement; then, per agreement threshold, the summed Dice change over the first pass; and
the whole engine with 1 to 3 own-box rounds (`session.OWN_BOX_ROUNDS`) on 3 to 5 slices of the first
pass's extent (`session.OWN_BOX_SLICES`), `ENGINE_VARIANTS`.
`--validation` runs the hippocampus validation split's cross-weak trials instead (a check, not a choice).
Writes own_boxes.json and own_boxes.md to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from weakicl import session
from weakicl.evaluation.manifest import read_manifest, select_structures, structure_mask, tuning_structures
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import NotApplicable, Settings, build_trial
from weakicl.provenance import portable_command
from weakicl.session import Segmenter, TaskEmbedding, mean_in_frame, own_slice_boxes, pass_agreement
from window_overlap import brain_task

THRESHOLDS = (0.0, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 1.01)
USER_SLICES = 3  # the evaluation's slice boxes, as a user draws them
ENGINE_VARIANTS = {  # the engine is also run whole with these own-box rounds and slices (OWN_BOX_ROUNDS, OWN_BOX_SLICES)
    "engine, 1 round, 3 boxes": (1, USER_SLICES),
    "engine, 2 rounds, 3 boxes": (2, USER_SLICES),
    f"engine as shipped, {session.OWN_BOX_ROUNDS} rounds, {session.OWN_BOX_SLICES} boxes": (session.OWN_BOX_ROUNDS, session.OWN_BOX_SLICES),
    "engine, 2 rounds, 5 boxes": (2, 5),
    f"engine, 3 rounds, {session.OWN_BOX_SLICES} boxes": (3, session.OWN_BOX_SLICES),
}


@contextmanager
def session_constants(**values):
    """The session's module constants set to `values` for the duration, restored after."""
    saved = {name: getattr(session, name) for name in values}
    for name, value in values.items():
        setattr(session, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(session, name, value)


def trial_row(segmenter: Segmenter, group: str, name: str, target, task: TaskEmbedding, truth: np.ndarray) -> dict:
    """First pass, second pass and their combination for one single-class task on `target`."""
    with session_constants(OWN_BOX_LEVEL=None):
        first = segmenter.segment(target, task).probabilities[0]
    row = {"group": group, "structure": name, "first": dice(first >= 0.5, truth)}
    for label, (rounds, slices) in ENGINE_VARIANTS.items():  # the whole engine, own-box rounds and slices varied
        with session_constants(OWN_BOX_ROUNDS=rounds, OWN_BOX_SLICES=slices):
            row[label] = dice(segmenter.segment(target, task).masks[0], truth)
    with session_constants(OWN_BOX_SLICES=USER_SLICES):  # the columns of one second pass: as they were first chosen
        boxes = own_slice_boxes(first >= session.OWN_BOX_LEVEL, target.geometry.spacing)
    if boxes is None:
        return {**row, "second": None, "mean": None, "agreement": None}
    second = segmenter.segment(target, TaskEmbedding(task.tokens, task.names), boxes)
    combined = first.copy()
    mean_in_frame(combined, second.probabilities[0], second.changed_kji)
    return {**row, "second": dice(second.masks[0], truth), "mean": dice(combined >= 0.5, truth),
            "agreement": pass_agreement(first, second.probabilities[0])}


def cross_trials(segmenter: Segmenter, pool, settings: Settings, group: str):
    for structure in pool:
        try:
            trial = build_trial(structure, settings, pool)
        except NotApplicable:
            continue
        task = segmenter.encode_context(trial.context, structure.name)
        yield trial_row(segmenter, group, structure.key + " " + structure.name, trial.volume, task, structure_mask(structure))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--validation", action="store_true", help="the validation split's hippocampi instead (cross-weak k=1)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cases, document = read_manifest(args.manifest)
    segmenter = Segmenter(None, "cpu")
    rows = []
    if args.validation:
        pool = select_structures(cases, document, "validation", False)
        rows += cross_trials(segmenter, pool, Settings("cross-weak", k=1), "validation hippocampi, cross-weak")
    else:
        tuning = tuning_structures(cases, document)
        hippocampi = [s for s in tuning if s.group == "tuning-hippocampus"]
        other = [s for s in tuning if s.group == "tuning-other"]
        rows += cross_trials(segmenter, hippocampi, Settings("cross-weak", k=1), "tuning hippocampi, cross-weak")
        rows += cross_trials(segmenter, other, Settings("cross-weak", k=1, context_collection="other"), "CT <-> MR, cross-weak")
        rows += cross_trials(segmenter, other, Settings("cross-dense", k=1, context_collection="other"), "CT <-> MR, cross-dense")
        target, organs, task = brain_task(segmenter, args.manifest)
        for index, organ in enumerate(organs):
            single = TaskEmbedding(task.tokens[index:index + 1], [task.names[index]], [task.atlases[index]])
            rows.append(trial_row(segmenter, "brain MR, own boxes registered", task.names[index], target, single, organ))
        print(f"{len(rows)} trials", file=sys.stderr)
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    command = portable_command(["python", "scripts/own_boxes.py"] + sys.argv[1:])
    (args.out / "own_boxes.json").write_text(json.dumps({"command": command, "rows": rows, "summary": summary}, indent=1))
    (args.out / "own_boxes.md").write_text(markdown(command, rows, summary))
    print((args.out / "own_boxes.md").read_text())
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Per group and agreement threshold: mean Dice when the combination is kept at or above it."""
    summary = []
    for group in dict.fromkeys(row["group"] for row in rows):
        members = [row for row in rows if row["group"] == group]
        entry = {"group": group, "n": len(members), "first": float(np.mean([r["first"] for r in members])),
                 **{key: float(np.mean([r[key] for r in members])) for key in ENGINE_VARIANTS},
                 "second everywhere": float(np.mean([r["second"] if r["second"] is not None else r["first"] for r in members]))}
        for threshold in THRESHOLDS:
            kept = [r["mean"] if r["agreement"] is not None and r["agreement"] >= threshold else r["first"] for r in members]
            entry[f"mean kept at agreement >= {threshold:g}"] = float(np.mean(kept))
        summary.append(entry)
    return summary


def markdown(command: str, rows: list[dict], summary: list[dict]) -> str:
    columns = [key for key in summary[0] if key not in ("group", "n")]
    lines = ["# A whole volume's second pass: propagation from its own slice boxes", "", f"Command: `{command}`", "",
             "Mean Dice per group: the first pass alone, the second pass everywhere, and the engine's combination (the mean "
             "of both passes in the second pass's frame) kept where the masks agree at least at the threshold "
             "(1.01: never kept, the first pass); and the whole engine with 1 to 3 own-box rounds "
             "(`session.OWN_BOX_ROUNDS`: each round after the first kept where it agrees with the round before at least "
             f"`OWN_BOX_REFINE_AGREEMENT` = {session.OWN_BOX_REFINE_AGREEMENT}) on 3 to 5 slices of the first pass's extent "
             "(`session.OWN_BOX_SLICES`; 3: the evaluation's 25/50/75 %, where users' boxes lie).", "",
             "| group | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for entry in summary:
        lines.append(f"| {entry['group']} | {entry['n']} | " + " | ".join(f"{entry[c]:.3f}" for c in columns) + " |")
    lines += ["", "| group | structure | first | second | mean | agreement |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k]:.3f}" if row[k] is not None else "n/a" for k in ("first", "second", "mean", "agreement")]
        lines.append(f"| {row['group']} | {row['structure']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
