"""A wide look for failures: every other label of the training collections' non-hippocampus cases.

    python scripts/wide_look.py --manifest ../shared/data/manifest.json --out reports/wide-look

The evaluation's tuning, validation and unseen structures are a few dozen blobs and tubes; the same
cases hold many more labels (lung lobes at the edge of an abdominal CT, the colon, veins, ribs, fat and
muscle compartments, brain sheets and lesions) that the network saw only as training tasks and no
engine constant was chosen on. Each one with at least `--min-voxels` voxels is propagated from the
evaluation's 3 slice boxes by the engine (`model`), the network alone (`model-network-only`) and box
interpolation (`box-interp`), as `weakicl evaluate --protocol propagate` runs them (the engine also
with 5 corrective clicks, as `--protocol interactive` places them), beside the share
of the engine's structure seeds (`weakicl.adaptation.appearance_labels`) that lie in the structure and
the network's own mean probability at them.
Writes wide_look.json and wide_look.md (worst first) to `--out`: leads for what boxes alone cannot say,
not a result to tune on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from weakicl import adaptation
from weakicl.evaluation.manifest import read_manifest, select_structures, structure_mask, tuning_structures
from weakicl.evaluation.methods import build_methods
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, build_trial, evaluate
from weakicl.preprocess import normalize_intensity
from weakicl.provenance import portable_command

METHODS = ("model", "model-network-only", "box-interp")


def other_labels(cases, document, min_voxels: int) -> list:
    """Labels of the non-hippocampus cases that are neither tuning nor unseen structures."""
    known = {(s.case.id, s.value) for s in tuning_structures(cases, document) + select_structures(cases, document, None, True)}
    return [s for s in select_structures(cases, document, None, False)
            if s.case.collection != "msd_hippocampus" and (s.case.id, s.value) not in known
            and np.count_nonzero(structure_mask(s)) >= min_voxels]


def seeds_row(trial, truth: np.ndarray, segmenter) -> dict:
    """The engine's structure seeds of the slice boxes (on the normalised image): the share in the
    structure, and the network's own mean probability there (would it tell bad seeds?)."""
    image = normalize_intensity(trial.volume.array, trial.volume.modality)
    seeds = adaptation.appearance_labels(trial.prompts, image) == 1
    if not seeds.any():
        return {"seed_purity": None, "network_at_seeds": None}
    task = segmenter.encode_context(trial.context, trial.structure.name)
    network = segmenter.segment(trial.volume, task, trial.prompts, network_only=True).probabilities[0]
    return {"seed_purity": float(truth[seeds].mean()), "network_at_seeds": float(network[seeds].mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--min-voxels", type=int, default=200, help="smallest structure (default 200 voxels)")
    parser.add_argument("--weights", default=None, help="weights .safetensors (default: shipped)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cases, document = read_manifest(args.manifest)
    methods = build_methods(list(METHODS), args.weights, "cpu")
    settings = Settings("propagate")
    structures = other_labels(cases, document, args.min_voxels)
    rows = []
    for number, structure in enumerate(structures, 1):
        trial = build_trial(structure, settings, [])
        truth = structure_mask(structure)
        row = {"structure": f"{structure.case.id}/{structure.value} {structure.name}", "voxels": int(truth.sum())}
        row |= seeds_row(trial, truth, methods[0].segmenter)
        row |= {method.name: dice(method.segment(trial, [], None), truth) for method in methods[1:]}
        curve = evaluate(methods[0], structure, Settings("interactive"), []).click_dice  # as the harness clicks
        row |= {"model": curve[0], "model_after_clicks": curve[-1]}
        rows.append(row)
        print(f"{number}/{len(structures)} {row['structure']}: " + " ".join(f"{m} {row[m]:.3f}" for m in METHODS), file=sys.stderr)
    rows.sort(key=lambda row: row["model"] - row["box-interp"])
    means = {method: float(np.mean([row[method] for row in rows])) for method in METHODS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = portable_command(["python", "scripts/wide_look.py"] + list(argv if argv is not None else sys.argv[1:]))
    (out / "wide_look.json").write_text(json.dumps({"command": command, "means": means, "structures": rows}, indent=1) + "\n")
    below = [row for row in rows if row["model"] < row["box-interp"]]
    lines = ["# A wide look: the other labels of the training collections, propagated from 3 slice boxes", "",
             f"    {command}", "",
             f"{len(rows)} structures; mean Dice: engine {means['model']:.3f}, network alone {means['model-network-only']:.3f}, "
             f"box interpolation {means['box-interp']:.3f}. The engine is below the boxes on {len(below)}. Seed purity: the "
             "share of the engine's structure seeds (the typical part of each box's central half) inside the structure; "
             "network at seeds: the network's own mean probability there; 5 clicks: the engine after 5 corrective clicks "
             f"of the evaluation's protocol (mean {np.mean([row['model_after_clicks'] for row in rows]):.3f}).", "",
             "| structure | voxels | engine | engine, 5 clicks | network alone | box interpolation | seed purity | network at seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = ["n/a" if row[key] is None else f"{row[key]:.2f}" for key in ("seed_purity", "network_at_seeds")]
        lines.append(f"| {row['structure']} | {row['voxels']} | {row['model']:.3f} | {row['model_after_clicks']:.3f} | {row['model-network-only']:.3f} | "
                     f"{row['box-interp']:.3f} | {' | '.join(seeds)} |")
    (out / "wide_look.md").write_text("\n".join(lines) + "\n")
    print(out / "wide_look.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
