"""What each protocol click changes, on the tuning structures (never validation or unseen ones): the share of
the error component it sits in that the correction fixes, the voxels it changes for the better and for the
worse, and how deep the click sits (face steps to the previous result's other side; 1 is on its border).
Writes one row per click to OUT (JSON) and prints a summary, overall and for border and deeper clicks:

    python scripts/click_diagnosis.py --group tuning-other --out reports/click-diagnosis/tuning-other.json
    python scripts/click_diagnosis.py --group tuning-hippocampus --recompute-border-clicks \
        --out reports/click-diagnosis/tuning-hippocampus-recomputed.json

`--recompute-border-clicks` turns `session.BORDER_CLICKS_LOCAL` off: every click runs the network over its
neighbourhood, the engine before border clicks became local (the evidence for that rule).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from weakicl import session
from weakicl.adaptation import nearest_voxel_kji
from weakicl.evaluation.manifest import read_manifest, structure_mask, tuning_structures
from weakicl.evaluation.methods import build_methods
from weakicl.evaluation.metrics import click_effect, dice
from weakicl.evaluation.protocols import Settings, build_trial, structure_rng
from weakicl.simulation import corrective_click

BORDER_DEPTH = 1  # face steps: the session's border-click rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="../shared/data/manifest.json")
    parser.add_argument("--group", default="tuning-other", choices=["tuning-other", "tuning-hippocampus"])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recompute-border-clicks", action="store_true", help="turn session.BORDER_CLICKS_LOCAL off")
    parser.add_argument("--weights", default=None, help="network weights (.safetensors; default: the shipped ones)")
    args = parser.parse_args()
    session.BORDER_CLICKS_LOCAL = not args.recompute_border_clicks
    cases, document = read_manifest(args.manifest)
    (method,) = build_methods(["model"], args.weights, "cpu")
    settings = Settings("interactive")
    rows = []
    for structure in [s for s in tuning_structures(cases, document) if s.group == args.group]:
        trial, truth = build_trial(structure, settings, []), structure_mask(structure)
        prediction, clicks = method.segment(trial, [], None), []
        rng = structure_rng(settings, structure, stream=1)
        for number in range(1, args.clicks + 1):
            click = corrective_click(prediction, truth, 0.0, rng)
            if click is None:
                break
            clicks.append(click)
            corrected = method.segment(trial, clicks, prediction)
            voxel = tuple(nearest_voxel_kji(click))  # the click's voxel as the session reads it
            effect = click_effect(prediction, corrected, truth, voxel, click.positive)
            rows.append({"structure": f"{structure.case.id}/{structure.name}", "click": number, "positive": bool(click.positive),
                         **asdict(effect), "dice_before": dice(prediction, truth), "dice_after": dice(corrected, truth)})
            print(json.dumps(rows[-1]), flush=True)
            prediction = corrected
    summary = {"all": summarise(rows),
               "border": summarise([row for row in rows if row["depth_voxels"] is not None and row["depth_voxels"] <= BORDER_DEPTH]),
               "deeper": summarise([row for row in rows if row["depth_voxels"] is None or row["depth_voxels"] > BORDER_DEPTH])}
    print(json.dumps(summary, indent=1))
    command = (f"python scripts/click_diagnosis.py --group {args.group}" + (" --recompute-border-clicks" if args.recompute_border_clicks else "")
               + (f" --weights {args.weights}" if args.weights else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "summary": summary, "rows": rows}, indent=1))


def summarise(rows: list[dict]) -> dict:
    """Totals over some clicks, split by side: a net-harmful kind of click has more wrong changes than right."""
    def totals(chosen: list[dict]) -> dict:
        share = [row["fixed_in_component"] / row["component_voxels"] for row in chosen if row["component_voxels"]]
        return {"clicks": len(chosen), "right_changes": sum(row["right_changes"] for row in chosen),
                "wrong_changes": sum(row["wrong_changes"] for row in chosen),
                "mean_dice_gain": float(np.mean([row["dice_after"] - row["dice_before"] for row in chosen])) if chosen else None,
                "mean_share_of_component_fixed": float(np.mean(share)) if share else None}
    return {"total": totals(rows), "positive": totals([row for row in rows if row["positive"]]),
            "negative": totals([row for row in rows if not row["positive"]])}


if __name__ == "__main__":
    main()
