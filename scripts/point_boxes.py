"""What slice boxes drawn around the engine's own pass are worth when the target's prompts hold no slice
box: the tuning structures (training tasks, where the constants are chosen) propagated from one central
point on each of 3 slices (`weakicl.session.POINT_BOX_ROUNDS`) or from a 3D box around the whole structure
(`--prompt-kind box3d`, `BOX3D_ROUNDS`), as `weakicl evaluate --prompt-kind` draws them, with 0 to 3 rounds.

    python scripts/point_boxes.py --manifest ../shared/data/manifest.json --out reports/point-boxes
    python scripts/point_boxes.py --manifest ../shared/data/manifest.json --prompt-kind box3d --out reports/box3d-boxes

Writes point_boxes.json and point_boxes.md to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from own_boxes import session_constants
from weakicl.evaluation.manifest import read_manifest, structure_mask, tuning_structures
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, build_trial
from weakicl.provenance import portable_command
from weakicl.session import Segmenter

ROUNDS = (0, 1, 2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--prompt-kind", choices=("points", "box3d"), default="points")
    args = parser.parse_args()
    cases, document = read_manifest(args.manifest)
    segmenter, settings = Segmenter(args.weights, "cpu"), Settings("propagate", prompt_kind=args.prompt_kind)
    constant = "POINT_BOX_ROUNDS" if args.prompt_kind == "points" else "BOX3D_ROUNDS"
    rows = []
    for structure in tuning_structures(cases, document):
        trial, truth = build_trial(structure, settings, []), structure_mask(structure)
        task = segmenter.encode_context(trial.context, structure.name)
        row = {"group": structure.group, "structure": structure.key}
        for rounds in ROUNDS:
            with session_constants(**{constant: rounds}):
                row[str(rounds)] = round(dice(segmenter.segment(trial.volume, task, trial.prompts).masks[0], truth), 4)
        rows.append(row)
        print(row, flush=True)
    summary = {group: {str(rounds): round(float(np.mean([row[str(rounds)] for row in rows if row["group"] == group])), 4)
                       for rounds in ROUNDS} for group in sorted({row["group"] for row in rows})}
    command = portable_command(["python", "scripts/point_boxes.py"] + sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "point_boxes.json").write_text(json.dumps({"command": command, "rows": rows, "summary": summary}, indent=1) + "\n")
    prompts = "one central point on each of 3 slices" if args.prompt_kind == "points" else "a 3D box around the whole structure"
    lines = [f"# {settings.label}: rounds of slice boxes drawn around the engine's own pass\n", f"`{command}`\n",
             f"Mean Dice of the tuning structures propagated from {prompts}, by the number of",
             f"rounds (`weakicl.session.{constant}`; 0: the prompts' own pass).\n",
             "| group | n | " + " | ".join(f"{rounds} rounds" for rounds in ROUNDS) + " |", "|---|---|" + "---|" * len(ROUNDS)]
    for group, means in summary.items():
        count = sum(row["group"] == group for row in rows)
        lines.append(f"| {group} | {count} | " + " | ".join(f"{means[str(rounds)]:.3f}" for rounds in ROUNDS) + " |")
    lines += ["", "| structure | " + " | ".join(str(rounds) for rounds in ROUNDS) + " |", "|---|" + "---|" * len(ROUNDS)]
    lines += [f"| {row['structure']} | " + " | ".join(f"{row[str(rounds)]:.3f}" for rounds in ROUNDS) + " |" for row in rows]
    (args.out / "point_boxes.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
