"""How far corrective clicks can take a result: the engine's own corrections beside a perfect editor's.

From the engine's propagation (3 slice boxes), protocol clicks (`simulation.corrective_click`) are answered
two ways, each on its own run of clicks: by the engine, through the evaluation's own interactive loop
(`evaluation.protocols.evaluate`), and by `simulation.ideal_local_fix`, which flips the click's error component within R mm of the click (and,
for reference, the whole component). The Model v0.2 issue asks +0.08 Dice from 5 clicks; this says how
local a correction may stay and still get there.

    python scripts/click_ceiling.py --group tuning-other --out reports/click-ceiling/tuning-other.json
    python scripts/click_ceiling.py --group unseen --out reports/click-ceiling/unseen.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from weakicl.evaluation.manifest import MIN_VOXELS, read_manifest, select_structures, structure_mask, tuning_structures
from weakicl.evaluation.methods import build_methods
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, build_trial, evaluate, structure_rng
from weakicl.simulation import corrective_click, ideal_local_fix

GROUPS = ("tuning-other", "tuning-hippocampus", "unseen")
ENGINE, WHOLE = "engine", "whole component"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="../shared/data/manifest.json")
    parser.add_argument("--group", choices=GROUPS, required=True)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--radii-mm", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cases, document = read_manifest(args.manifest)
    chosen = (tuning_structures(cases, document) if args.group.startswith("tuning")
              else select_structures(cases, document, None, unseen=True))
    structures = [s for s in chosen if s.group == args.group and structure_mask(s).sum() >= MIN_VOXELS]
    (method,) = build_methods(["model"], None, "cpu")
    settings = Settings("interactive", clicks=args.clicks)
    answers = [ENGINE] + [f"within {radius:g} mm" for radius in args.radii_mm] + [WHOLE]
    rows = []
    for structure in structures:
        trial, truth = build_trial(structure, settings, structures), structure_mask(structure)
        spacing_kji = np.asarray(trial.volume.geometry.spacing, dtype=float)[::-1]
        curves = {ENGINE: evaluate(method, structure, settings, structures).click_dice}
        start = np.asarray(method.segment(trial, [], None), dtype=bool)
        for answer, radius in zip(answers[1:], list(args.radii_mm) + [None]):
            prediction, curve = start, [dice(start, truth)]
            rng = structure_rng(settings, structure, stream=1)
            for _ in range(args.clicks):
                click = corrective_click(prediction, truth, 0.0, rng)
                if click is not None:
                    prediction = ideal_local_fix(prediction, truth, click, radius, spacing_kji)
                curve.append(dice(prediction, truth))
            curves[answer] = curve
        rows.append({"structure": structure.key, "name": structure.name, "dice_after_click": curves})
        print(structure.key, {answer: round(curve[-1] - curve[0], 3) for answer, curve in curves.items()}, flush=True)
    summary = {answer: {"start": float(np.mean([row["dice_after_click"][answer][0] for row in rows])),
                        "after_clicks": float(np.mean([row["dice_after_click"][answer][-1] for row in rows]))}
               for answer in answers}
    for answer, values in summary.items():
        values["gain"] = values["after_clicks"] - values["start"]
        print(f"{answer:>18}: {values['start']:.3f} -> {values['after_clicks']:.3f} ({values['gain']:+.3f})")
    command = f"python scripts/click_ceiling.py --group {args.group} --out {args.out.as_posix()}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "clicks": args.clicks, "structures": len(rows),
                                    "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
