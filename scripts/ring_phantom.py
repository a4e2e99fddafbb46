"""A known failure, measured: a ring whose box centre is another structure (a myocardium around its blood pool).

    python scripts/ring_phantom.py [--weights FILE] [--out reports/ring-phantom/ring_phantom.json]

A cine-MR-like short-axis phantom (1.5 mm pixels, 8 mm slices): a bright blood pool inside a dark ring, a
bright crescent beside it (a right ventricle), mid-grey tissue around, noise. Each of the three structures
is propagated from 3 tight slice boxes (the evaluation's prompts), then corrected by 5 clicks of the
evaluation's protocol (`benchmark_engine.interactive`); Slicer's GrowCut (slicer-core, else scikit-image's random walker) and box
interpolation from the same boxes are the references. Nothing here is tuned on it: it documents what the
engine does where the centre of a box is not the structure, which the evaluation data barely hold
(reports/wide-look) and a cardiac MR does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmark_engine import interactive  # this folder: the benchmark's protocol click loop
from weakicl.evaluation.baselines import BoxInterpolation, GrowCut
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Trial
from weakicl.prompts import PromptSet
from weakicl.session import Segmenter
from weakicl.simulation import slice_boxes
from weakicl.volume import Geometry, Volume

SPACING_IJK_MM = (1.5, 1.5, 8.0)


def short_axis_phantom(seed: int = 0) -> tuple[Volume, dict[str, np.ndarray]]:
    """The image and the masks of its myocardium, blood pool and right ventricle (KJI)."""
    rng = np.random.default_rng(seed)
    shape = (12, 128, 128)
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING_IJK_MM[::-1])), indexing="ij")
    taper = np.clip(1 - ((k - 40.0) / 45.0) ** 2, 0, 1)  # base to apex
    inner, radius = 22 * np.sqrt(taper), np.hypot(j - 96.0, i - 100.0)
    present = taper > 0.05
    pool = present & (radius < inner)
    ring = present & (radius >= inner) & (radius < inner + 9)
    ventricle = (np.hypot(j - 96.0, i - 62.0) < 28) & (radius >= inner + 11) & (taper > 0.15) & (np.abs(k - 40.0) < 38)
    image = np.where(np.hypot(j - 96.0, i - 96.0) < 90, 300.0, 20.0)
    image[np.hypot(j - 60.0, i - 150.0) < 25] = 60.0  # a lung-like dark blob
    image[pool], image[ventricle], image[ring] = 700.0, 650.0, 180.0
    image = ndimage.gaussian_filter(image + rng.normal(0, 30, shape), (0.3, 1.0, 1.0))
    volume = Volume(image.astype(np.float32), Geometry.identity(shape, SPACING_IJK_MM), "MR")
    return volume, {"myocardium": ring, "blood pool": pool, "right ventricle": ventricle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/ring-phantom/ring_phantom.json"))
    args = parser.parse_args(argv)
    volume, structures = short_axis_phantom()
    segmenter = Segmenter(args.weights, "cpu")
    rows = []
    for name, truth in structures.items():
        boxes = slice_boxes(truth)
        task = segmenter.encode_context([(volume, boxes)], name)
        mask = segmenter.segment(volume, task, boxes).masks[0]
        trial = Trial(None, volume, boxes, [(volume, boxes)])
        row = {"structure": name, "voxels": int(truth.sum()),
               "network_only": round(dice(segmenter.segment(volume, task, boxes, network_only=True).masks[0], truth), 3),
               "growcut": round(dice(GrowCut().segment(trial, [], None), truth), 3),
               "box_interpolation": round(dice(BoxInterpolation().segment(trial, [], None), truth), 3),
               "model": round(dice(mask, truth), 3)}

        def correct(clicks, previous):
            return segmenter.segment(volume, task, boxes + PromptSet(points=clicks), previous,
                                     new_prompts=PromptSet(points=clicks[-1:])).masks[0]

        row["model_after_each_click"] = [round(score, 3) for score in interactive(correct, truth, mask)[1]]
        rows.append(row)
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python scripts/ring_phantom.py " + " ".join(argv or sys.argv[1:]),
                                    "spacing_ijk_mm": SPACING_IJK_MM, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
