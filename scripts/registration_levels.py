"""What skipping fine registration levels costs: the MNI152 template registered onto the brain MR of
`../shared/data`, its white and grey matter carried along (the atlas prior), with every usable level and
with levels above `registration.FINEST_LEVEL_MAX_VOXELS` skipped.

    python scripts/registration_levels.py [--data ../shared/data] [--out reports/registration-levels/registration_levels.json]

Records, per setting, the shrink factors, the seconds of both registrations (one per label, no cache) and
the prior's Dice (>= 0.5) against the brain MR's cerebral white matter (aseg 2, 41) and cortex (3, 42).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from weakicl import registration
from weakicl.evaluation.metrics import dice
from weakicl.volume import read_label_map, read_volume

LABELS = {"white_matter": (2, (2, 41)), "grey_matter": (1, (3, 42))}  # MNI label, aseg labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="reports/registration-levels/registration_levels.json")
    args = parser.parse_args(argv)
    brain = Path(args.data) / "brain"
    target = read_volume(brain / "brain_t1_aseg_image.nii.gz", "MR")
    target_labels = read_label_map(brain / "brain_t1_aseg_label.nii.gz", target.geometry)
    moving = read_volume(brain / "mni152_image.nii.gz", "MR")
    moving_labels = read_label_map(brain / "mni152_label.nii.gz", moving.geometry)
    default = registration.FINEST_LEVEL_MAX_VOXELS
    rows = []
    for cap in (None, default):
        registration.FINEST_LEVEL_MAX_VOXELS = cap
        started, scores = time.perf_counter(), {}
        for name, (mni_label, aseg_labels) in LABELS.items():
            item = registration.AtlasItem(moving.array.astype(np.float32), moving.geometry,
                                          (moving_labels == mni_label).astype(np.float32), "mni152")
            prior = registration.atlas_prior([item], target.array.astype(np.float32), target.geometry, "brain")
            scores[name] = round(dice(prior >= 0.5, np.isin(target_labels, aseg_labels)), 4)
        rows.append({"finest_level_max_voxels": cap, "shrink_factors": registration.shrink_factors(target.array.shape),
                     "seconds": round(time.perf_counter() - started, 2), "prior_dice": scores})
        print(json.dumps(rows[-1]))
    registration.FINEST_LEVEL_MAX_VOXELS = default
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python scripts/registration_levels.py", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
