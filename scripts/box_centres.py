"""How much of a slice box's centre is the structure: the seeds the engine takes from the boxes.

    python scripts/box_centres.py --manifest ../shared/data/manifest.json --out reports/box-centres

For the tuning structures (training tasks), the validation split's first `--validation` structures and
every unseen structure, draws the evaluation's 3 slice boxes and labels them as the engine does
(`weakicl.adaptation.appearance_labels`, on the image normalised as the engine normalises it), once with
the whole central half of each box as structure (`CORE_TYPICALITY = None`) and once as shipped (only
central voxels of an intensity typical of the boxes' inside). Per structure: the share of those
structure seeds that are the structure (purity) and the share of the central half kept. Writes
box_centres.json and box_centres.md to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from weakicl import adaptation
from weakicl.evaluation.manifest import load_case, read_manifest, select_structures, structure_mask, tuning_structures
from weakicl.evaluation.protocols import Settings, structure_rng, target_prompts
from weakicl.preprocess import normalize_intensity
from weakicl.provenance import portable_command


def seeds(prompts, image: np.ndarray, typicality: float | None) -> np.ndarray:
    """The structure seeds (label 1) of `appearance_labels` with CORE_TYPICALITY set to `typicality`."""
    saved = adaptation.CORE_TYPICALITY
    adaptation.CORE_TYPICALITY = typicality
    try:
        return adaptation.appearance_labels(prompts, image) == 1
    finally:
        adaptation.CORE_TYPICALITY = saved


def structure_row(structure) -> dict:
    volume, _ = load_case(structure.case)
    truth = structure_mask(structure)
    settings = Settings("propagate")
    prompts = target_prompts(truth, settings, structure_rng(settings, structure))
    image = normalize_intensity(volume.array, volume.modality)
    whole, typical = seeds(prompts, image, None), seeds(prompts, image, adaptation.CORE_TYPICALITY)
    return {"group": structure.group, "structure": f"{structure.case.id}/{structure.value} {structure.name}",
            "purity_whole_centre": float(truth[whole].mean()) if whole.any() else None,
            "purity_typical": float(truth[typical].mean()) if typical.any() else None,
            "kept": float(typical.sum() / max(whole.sum(), 1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--validation", type=int, default=30, help="validation structures (the first N; default 30)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cases, document = read_manifest(args.manifest)
    structures = (tuning_structures(cases, document)
                  + select_structures(cases, document, "validation", False)[:args.validation]
                  + select_structures(cases, document, None, True))
    rows = []
    for number, structure in enumerate(structures, 1):
        rows.append(structure_row(structure))
        print(f"{number}/{len(structures)} {rows[-1]['structure']}", file=sys.stderr)
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    summary = {group: {key: float(np.mean([r[key] for r in members if r[key] is not None]))
                       for key in ("purity_whole_centre", "purity_typical", "kept")} | {"n": len(members)}
               for group, members in groups.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = portable_command(["python", "scripts/box_centres.py"] + list(argv if argv is not None else sys.argv[1:]))
    (out / "box_centres.json").write_text(json.dumps({"command": command, "core_typicality": adaptation.CORE_TYPICALITY,
                                                      "summary": summary, "structures": rows}, indent=1))
    lines = ["# How much of a slice box's centre is the structure", "", f"`{command}`", "",
             "Structure seeds of the evaluation's 3 slice boxes: the whole central half of each box, or (the engine, "
             f"`CORE_TYPICALITY = {adaptation.CORE_TYPICALITY}`) its voxels of an intensity typical of the boxes' inside. "
             "Purity: the share of the seeds inside the structure; kept: the share of the central half that stays a seed.", "",
             "| group | n | purity, whole centre | purity, typical intensity | kept |", "|---|---|---|---|---|"]
    for group, values in summary.items():
        lines.append(f"| {group} | {values['n']} | {values['purity_whole_centre']:.3f} | {values['purity_typical']:.3f} | {values['kept']:.2f} |")
    lines += ["", "| group | structure | purity, whole centre | purity, typical intensity | kept |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[key]:.2f}" if row[key] is not None else "n/a" for key in ("purity_whole_centre", "purity_typical", "kept")]
        lines.append(f"| {row['group']} | {row['structure']} | " + " | ".join(cells) + " |")
    (out / "box_centres.md").write_text("\n".join(lines) + "\n")
    print(out / "box_centres.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
