"""The README's liver example, scored: 3 slice boxes on the liver of the TotalSegmentator abdomen CT.

    python scripts/liver_example.py [--data ../shared/data] [--weights FILE] [--errors]

Segments exactly as `weakicl segment CT --prompts examples/liver_boxes.json --label liver` does (the
target is its own context) and prints the Dice against the case's liver label (value 5), beside the
evaluation's GrowCut and box interpolation from the same boxes. `--errors` also says where the wrong
voxels lie: the structures of the case's label map the result takes, how far from the liver, and how deep
in the liver what it misses lies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from weakicl.evaluation.baselines import BoxInterpolation, GrowCut
from weakicl.evaluation.manifest import read_manifest
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Trial
from weakicl.prompts import read_prompts
from weakicl.session import Segmenter
from weakicl.volume import read_label_map, read_volume

LIVER = 5
CASE = "totalseg_ct_abdomen"
DISTANCE_BANDS_VOXELS = (1, 2, 3, 5, 8)  # upper ends of the bands the wrong voxels are counted in
PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "liver_boxes.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the shared data folder (default ../shared/data)")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--errors", action="store_true", help="also say where the wrong voxels lie")
    args = parser.parse_args(argv)
    data = Path(args.data)
    volume = read_volume(data / "ct" / "totalseg_ct_abdomen_image.nii.gz", "CT")
    labels = read_label_map(data / "ct" / "totalseg_ct_abdomen_label.nii.gz", volume.geometry)
    truth = labels == LIVER
    prompts = read_prompts(PROMPTS, volume.geometry)
    segmenter = Segmenter(args.weights, "cpu")
    task = segmenter.encode_context([(volume, prompts)], "liver")
    mask = segmenter.segment(volume, task, prompts).masks[0]
    print(f"liver Dice {dice(mask, truth):.3f} ({int(mask.sum())} voxels predicted, {int(truth.sum())} in the label)")
    if args.errors:
        print_errors(mask, truth, labels, data)
    trial = Trial(None, volume, prompts, [(volume, prompts)])
    for baseline in (GrowCut(), BoxInterpolation()):
        print(f"{baseline.name} from the same boxes: Dice {dice(baseline.segment(trial, [], None), truth):.3f}")
    return 0


def print_errors(mask: np.ndarray, truth: np.ndarray, labels: np.ndarray, data: Path) -> None:
    """Wrong voxels by the structure of the label map they belong to and by their distance (voxels) to
    the liver's border: look-alike neighbours taken whole, or a boundary a voxel off."""
    cases, _ = read_manifest(data / "manifest.json")
    names = dict(next(case for case in cases if case.id == CASE).labels) | {0: "unlabelled tissue"}
    extra, missed = mask & ~truth, truth & ~mask
    values, counts = np.unique(labels[extra], return_counts=True)
    taken = ", ".join(f"{names.get(int(v), f'label {v}')} {c}" for v, c in sorted(zip(values, counts), key=lambda vc: -vc[1])[:8])
    print(f"taken wrongly: {int(extra.sum())} voxels ({taken})")
    components, count = ndimage.label(mask, np.ones((3, 3, 3), dtype=bool))
    largest = int(np.bincount(components.ravel())[1:].max()) if count else 0
    print(f"the result has {count} connected component(s), the largest of {largest} voxels")
    edges = (0,) + DISTANCE_BANDS_VOXELS + (np.inf,)
    bands = [f"{lo}-{hi}" if np.isfinite(hi) else f">{lo}" for lo, hi in zip(edges[:-1], edges[1:])]
    for name, wrong, distance in (("taken wrongly", extra, ndimage.distance_transform_edt(~truth)),
                                  ("missed", missed, ndimage.distance_transform_edt(truth))):
        counts = np.histogram(distance[wrong], [edge + 0.01 for edge in edges[:-1]] + [np.inf])[0]
        print(f"{name}, by voxels from the liver's border: " + ", ".join(f"{b}: {c}" for b, c in zip(bands, counts)))


if __name__ == "__main__":
    sys.exit(main())
