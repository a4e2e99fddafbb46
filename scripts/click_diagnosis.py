"""What each protocol click changes, on the tuning structures (never validation or unseen ones): the share of
the error component it sits in that the correction fixes, and the voxels it changes elsewhere for the
better and for the worse. Writes one row per click to OUT (JSON) and prints a summary:

    python scripts/click_diagnosis.py --group tuning-other --out reports/click-diagnosis/tuning-other.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from weakicl.evaluation.manifest import read_manifest, structure_mask, tuning_structures
from weakicl.evaluation.methods import build_methods
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, build_trial, structure_rng
from weakicl.simulation import FULL_CONNECTIVITY, corrective_click


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="../shared/data/manifest.json")
    parser.add_argument("--group", default="tuning-other", choices=["tuning-other", "tuning-hippocampus"])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cases, document = read_manifest(args.manifest)
    (method,) = build_methods(["model"], None, "cpu")
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
            voxel = tuple(int(round(v)) for v in click.ijk[::-1])
            error = (truth & ~prediction) if click.positive else (prediction & ~truth)
            components, _ = ndimage.label(error, FULL_CONNECTIVITY)
            component = components == components[voxel]
            clicks.append(click)
            corrected = method.segment(trial, clicks, prediction)
            changed = corrected != prediction
            rows.append({"structure": f"{structure.case.id}/{structure.name}", "click": number, "positive": bool(click.positive),
                         "component_voxels": int(component.sum()), "fixed_in_component": int((component & changed).sum()),
                         "better_elsewhere": int((changed & ~component & (corrected == truth)).sum()),
                         "worse_elsewhere": int((changed & ~component & (corrected != truth)).sum()),
                         "dice_before": float(dice(prediction, truth)), "dice_after": float(dice(corrected, truth))})
            print(json.dumps(rows[-1]), flush=True)
            prediction = corrected
    share = np.array([row["fixed_in_component"] / row["component_voxels"] for row in rows])
    summary = {"clicks": len(rows), "mean_share_of_component_fixed": float(share.mean()),
               "median_share_of_component_fixed": float(np.median(share)),
               "voxels_fixed_in_components": int(sum(row["fixed_in_component"] for row in rows)),
               "voxels_better_elsewhere": int(sum(row["better_elsewhere"] for row in rows)),
               "voxels_worse_elsewhere": int(sum(row["worse_elsewhere"] for row in rows))}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python scripts/click_diagnosis.py --group " + args.group, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
