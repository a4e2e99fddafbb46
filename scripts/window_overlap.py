"""What the sliding window's minimum overlap changes in a whole volume's output, and what it costs.

    python scripts/window_overlap.py --overlaps 16 24 48 --out reports/window-overlap
    python scripts/window_overlap.py --manifest ../shared/data/manifest.json --overlaps 16 24 48 --out reports/window-overlap-brain

The overlap decides the window count only on axes of more than two windows (two windows always sit at
both ends), so neither the evaluation's frames (at most 128 voxels a side) nor the registered-context
whole volumes of `../shared/data` (their search regions are at most two windows a side) change with it.
Whole volumes without a registration cover every window, and there the minimum decides: 256 voxels take
3 windows of 96 at 16 voxels, 4 at 24 or a fixed quarter. So the benchmark's 256³ synthetic CT
(`scripts/benchmark_engine.py`) is segmented whole from the task of the other phantom's slice boxes at
each minimum overlap; against the largest overlap's output: the mean absolute change of the
probabilities, the agreement (Dice) of the masks, and each mask's Dice with the phantom's organ. The
network finds little in the phantom without a registration, so its masks are unstable under any change;
with `--manifest`, the whole brain MR of `../shared/data` is segmented instead, for its four cerebral
white matter and cortex labels (training tasks; 130-180 voxels long, so their search regions span 2-3
windows a side), from a task of its own slice boxes registered onto itself (the Dice is the engine's
best case; what matters is how it moves with the overlap). Since whole volumes take a coarse first pass
(a search region larger than one window is seen as one window, `Segmenter._first_pass`), the overlap no
longer changes that pass in `--manifest` mode, and its seconds include the second pass from the volume's
own slice boxes; reports/window-overlap-brain was made before. Writes window_overlap.json and
window_overlap.md to `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchmark_engine import synthetic_ct

from weakicl import session
from weakicl.evaluation.manifest import Structure, load_case, read_manifest
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, structure_rng, target_prompts
from weakicl.session import Segmenter, TaskEmbedding
from weakicl.simulation import slice_boxes


BRAIN_CASE, BRAIN_LABELS = "brain_t1_aseg", (2, 3, 41, 42)  # left and right cerebral white matter and cortex


def brain_task(segmenter: Segmenter, manifest: str):
    """The brain MR, its BRAIN_LABELS masks, and their task from its own seeded slice boxes (the evaluation's)."""
    cases, document = read_manifest(manifest)
    case = next(c for c in cases if c.id == BRAIN_CASE)
    volume, labels = load_case(case)
    settings = Settings("propagate")
    names = dict(case.labels)
    organs = [labels == value for value in BRAIN_LABELS]
    task = TaskEmbedding.stack([
        segmenter.encode_context([(volume, target_prompts(organ, settings, structure_rng(settings, Structure(case, value, names[value], "brain"))))],
                                 names[value])
        for value, organ in zip(BRAIN_LABELS, organs)])
    return volume, organs, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overlaps", type=int, nargs="+", default=[16, 24, 48], help="MIN_WINDOW_OVERLAP_VOXELS values")
    parser.add_argument("--size", type=int, default=256, help="the phantom's side in voxels")
    parser.add_argument("--manifest", help="segment the brain MR of this manifest instead of the phantom")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    segmenter = Segmenter(device=args.device)
    if args.manifest:
        target, organs, task = brain_task(segmenter, args.manifest)
    else:
        shape = (args.size,) * 3
        reference, reference_organ = synthetic_ct(shape, 0)
        target, organ = synthetic_ct(shape, 1)
        organs, task = [organ], segmenter.encode_context([(reference, slice_boxes(reference_organ))])
    overlaps = sorted(args.overlaps, reverse=True)  # the largest first: the others are compared with it
    rows, largest = [], None
    for overlap in overlaps:
        session.MIN_WINDOW_OVERLAP_VOXELS = overlap
        said: list[str] = []
        started = time.perf_counter()
        probabilities = segmenter.segment(target, task, align_context=bool(args.manifest),
                                          progress=lambda fraction, message: said.append(message)).probabilities
        seconds = time.perf_counter() - started
        largest = probabilities if largest is None else largest
        masks = probabilities > 0.5
        rows.append({"min_overlap_voxels": overlap, "windows": int([m for m in said if m.startswith("segmenting window")][-1].split("/")[-1]),
                     "seconds": round(seconds, 2), "mean_probability_change": float(f"{np.abs(probabilities - largest).mean():.2e}"),
                     "mask_agreement": round(float(np.mean([dice(m, l > 0.5) for m, l in zip(masks, largest)])), 4),
                     "organ_dice": round(float(np.mean([dice(m, o) for m, o in zip(masks, organs)])), 4),
                     "foreground_voxels": int(masks.sum())})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/window_overlap.py " + " ".join(
        (["--manifest", args.manifest] if args.manifest else ["--size", str(args.size)])
        + ["--overlaps", *map(str, args.overlaps), "--device", args.device, "--out", args.out])
    (out / "window_overlap.json").write_text(json.dumps({"command": command, "device": args.device, "rows": rows}, indent=1) + "\n")
    lines = ["# Sliding-window overlap on a whole volume", "", f"`{command}`", "",
             f"| min overlap (voxels) | windows | seconds | mean probability change vs {overlaps[0]} | mask agreement | organ Dice | foreground voxels |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['min_overlap_voxels']} | {r['windows']} | {r['seconds']} | {r['mean_probability_change']:.1e} | "
              f"{r['mask_agreement']:.4f} | {r['organ_dice']:.4f} | {r['foreground_voxels']} |" for r in rows]
    (out / "window_overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
