"""What other subjects as context (cross-weak k=1, hippocampi) would reach with better own slice boxes: the
engine's result beside propagations from boxes that borrow from the truth, so the next person knows whether
the slices' positions or the boxes' sizes hold the result back:

    python scripts/own_box_ceiling.py --group tuning --out reports/own-box-ceiling/tuning.json
    python scripts/own_box_ceiling.py --group validation --out reports/own-box-ceiling/validation.json

Per structure, Dice of: the engine (`Segmenter.segment` without target prompts: registered context, first
pass, own-box rounds); its first pass alone (`session.OWN_BOX_LEVEL` None); propagation from
`session.OWN_BOX_SLICES` slice boxes drawn as the engine draws its own, (a) around the truth, (b) on the
truth's slices around the engine's result (the engine's sizes), (c) on the engine's slices around the truth
(the truth's sizes), (d) around the engine's result grown by GROWN_VOXELS a side (a loose box), and (e) from
tight boxes around that loose box's result. Oracles (a-c) are bounds, not methods.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from weakicl import session
from weakicl.evaluation.manifest import read_manifest, select_structures, structure_mask, tuning_structures
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, build_trial
from weakicl.prompts import Box, PromptSet, widened_slice_box
from weakicl.session import Segmenter, _box_axis_kji
from weakicl.simulation import slice_fractions, slice_positions

GROWN_VOXELS = 1
COLUMNS = ("engine", "first pass", "truth's boxes", "truth's slices, engine's sizes", "engine's slices, truth's sizes",
           f"engine's boxes grown {GROWN_VOXELS} voxel", "tight boxes around the grown boxes' result")


def boxes_on(slices_of: np.ndarray, around: np.ndarray, axis_kji: int, grow: int = 0) -> PromptSet:
    """Slice boxes on the slices `own_slice_boxes` would pick for `slices_of`, drawn around `around` there
    (grown by `grow` voxels a side, within the image); a slice where `around` is empty gets none."""
    boxes = []
    for position in slice_positions(slices_of, slice_fractions(session.OWN_BOX_SLICES), axis_kji):
        section = np.take(around, position, axis=axis_kji)
        if not section.any():
            continue
        rows, cols = np.nonzero(section)
        limit = np.array(section.shape) - 1
        lo = np.clip([rows.min() - grow, cols.min() - grow], 0, limit).astype(float)
        hi = np.clip([rows.max() + grow, cols.max() + grow], 0, limit).astype(float)
        lo_kji, hi_kji = np.insert(lo, axis_kji, position), np.insert(hi, axis_kji, position)
        boxes.append(widened_slice_box(Box(tuple(lo_kji[::-1]), tuple(hi_kji[::-1])), 2 - axis_kji, np.array(around.shape)[::-1]))
    return PromptSet(boxes=boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="../shared/data/manifest.json")
    parser.add_argument("--group", choices=["tuning", "validation"], required=True)
    parser.add_argument("--weights", default=None, help="network weights (.safetensors; default: the shipped ones)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cases, document = read_manifest(args.manifest)
    chosen = tuning_structures(cases, document) if args.group == "tuning" else select_structures(cases, document, "validation", False)
    structures = [s for s in chosen if s.case.collection == "msd_hippocampus"]
    settings = Settings(protocol="cross-weak", k=1)
    segmenter = Segmenter(args.weights, "cpu")
    rows = []
    for structure in structures:
        trial, truth = build_trial(structure, settings, structures), structure_mask(structure)
        task = segmenter.encode_context(trial.context, structure.name)
        level, session.OWN_BOX_LEVEL = session.OWN_BOX_LEVEL, None
        try:
            first = segmenter.segment(trial.volume, task).masks[0]
        finally:
            session.OWN_BOX_LEVEL = level
        engine = segmenter.segment(trial.volume, task).masks[0]
        axis = _box_axis_kji(np.array(engine.shape), trial.volume.geometry.spacing)

        def propagated(boxes: PromptSet) -> np.ndarray:
            return segmenter.segment(trial.volume, task, boxes).masks[0] if boxes.boxes else np.zeros_like(truth)

        grown = propagated(boxes_on(engine, engine, axis, GROWN_VOXELS))
        masks = (engine, first, propagated(boxes_on(truth, truth, axis)), propagated(boxes_on(truth, engine, axis)),
                 propagated(boxes_on(engine, truth, axis)), grown, propagated(boxes_on(grown, grown, axis)))
        rows.append({"structure": f"{structure.case.id}/{structure.name}",
                     "dice": {name: dice(mask, truth) for name, mask in zip(COLUMNS, masks)},
                     "volume_ratio": {name: float(mask.sum() / truth.sum()) for name, mask in zip(COLUMNS, masks)}})
        print(json.dumps(rows[-1]), flush=True)
    summary = {name: {"dice": float(np.mean([row["dice"][name] for row in rows])),
                      "volume_ratio": float(np.mean([row["volume_ratio"][name] for row in rows]))} for name in COLUMNS}
    print(json.dumps(summary, indent=1))
    command = f"python scripts/own_box_ceiling.py --group {args.group}" + (f" --weights {args.weights}" if args.weights else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "structures": len(rows), "own_box_slices": session.OWN_BOX_SLICES,
                                    "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
