"""The README's liver example, scored: 3 slice boxes on the liver of the TotalSegmentator abdomen CT.

    python scripts/liver_example.py [--data ../shared/data] [--weights FILE]

Segments exactly as `weakicl segment CT --prompts examples/liver_boxes.json --label liver` does (the
target is its own context) and prints the Dice against the case's liver label (value 5), beside the
evaluation's GrowCut and box interpolation from the same boxes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakicl.evaluation.baselines import BoxInterpolation, GrowCut
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Trial
from weakicl.prompts import read_prompts
from weakicl.session import Segmenter
from weakicl.volume import read_label_map, read_volume

LIVER = 5
PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "liver_boxes.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the shared data folder (default ../shared/data)")
    parser.add_argument("--weights", default=None)
    args = parser.parse_args(argv)
    data = Path(args.data)
    volume = read_volume(data / "ct" / "totalseg_ct_abdomen_image.nii.gz", "CT")
    truth = read_label_map(data / "ct" / "totalseg_ct_abdomen_label.nii.gz", volume.geometry) == LIVER
    prompts = read_prompts(PROMPTS, volume.geometry)
    segmenter = Segmenter(args.weights, "cpu")
    task = segmenter.encode_context([(volume, prompts)], "liver")
    mask = segmenter.segment(volume, task, prompts).masks[0]
    print(f"liver Dice {dice(mask, truth):.3f} ({int(mask.sum())} voxels predicted, {int(truth.sum())} in the label)")
    trial = Trial(None, volume, prompts, [(volume, prompts)])
    for baseline in (GrowCut(), BoxInterpolation()):
        print(f"{baseline.name} from the same boxes: Dice {dice(baseline.segment(trial, [], None), truth):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
