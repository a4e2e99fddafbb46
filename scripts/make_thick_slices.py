"""A thick-slice copy of a manifest's cases, to measure how the engine does on anisotropic scans.

    python scripts/make_thick_slices.py --manifest ../shared/data/manifest.json --thickness-mm 6 \
        --validation 12 --out .cache/thick6
    weakicl evaluate --manifest .cache/thick6/manifest.json --split validation --unseen --out reports/...
    python scripts/make_thick_slices.py --manifest ../shared/data/manifest.json --tuning --out .cache/thick6-tuning
    weakicl evaluate --manifest .cache/thick6-tuning/manifest.json --tuning --out ...

Clinical MR and older CT often come as 0.7-1 mm pixels on 4-10 mm slices (brain tumours, stroke, cine
cardiac MR), while the data in ../shared are near-isotropic. Each volume's array axis k (the axial axis,
the one the evaluation draws its boxes on) is reduced by a factor, the whole number of its slices
nearest to `--thickness-mm` (at least 2): an image slice is the mean of that many neighbouring slices (a
thick slice integrates its slab), a label slice is the label at the slab's centre. The copy keeps the manifest's splits and unseen labels, for the first `--validation`
validation cases and every case with unseen labels; with `--tuning`, the cases of the tuning structures
instead (`weakicl evaluate --tuning` on the copy: where thick-slice constants are chosen).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from weakicl.evaluation.manifest import load_case, read_manifest, tuning_structures
from weakicl.volume import Geometry, Volume, write_volume


def thick_slices(volume: Volume, labels: np.ndarray, factor: int) -> tuple[Volume, np.ndarray]:
    """Slabs of `factor` slices along k averaged (image) or sampled at their centre (labels)."""
    slabs = volume.array.shape[0] // factor
    image = volume.array[: slabs * factor].astype(np.float32).reshape(slabs, factor, *volume.array.shape[1:]).mean(axis=1)
    centre = (factor - 1) / 2.0
    thick_labels = labels[int(np.floor(centre)): slabs * factor: factor]
    geometry = volume.geometry
    spacing = (geometry.spacing[0], geometry.spacing[1], geometry.spacing[2] * factor)
    # the slab centre of slab 0 lies `centre` original slices along k from the original origin
    origin = np.asarray(geometry.origin) + geometry.direction[:, 2] * geometry.spacing[2] * centre
    thick = Geometry(spacing, tuple(origin), geometry.direction, (slabs,) + tuple(geometry.shape_kji[1:]))
    return Volume(image.astype(np.float32), thick, volume.modality), thick_labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="folder for the copy's images, labels and manifest.json")
    parser.add_argument("--thickness-mm", type=float, default=6.0, help="slice thickness to simulate (default 6 mm)")
    parser.add_argument("--validation", type=int, default=12, help="validation cases to copy (default 12)")
    parser.add_argument("--tuning", action="store_true", help="copy the tuning structures' cases instead")
    args = parser.parse_args(argv)
    cases, document = read_manifest(args.manifest)
    unseen = document.get("unseen_labels", {}).get("cases", {})
    validation = document.get("splits", {}).get("validation", [])[: args.validation]
    splits = {"validation": validation}
    if args.tuning:
        wanted = {structure.case.id for structure in tuning_structures(cases, document)}
        cases = [case for case in cases if case.id in wanted]
        splits = {"train": document["splits"]["train"]}  # whole: the tuning takes every 21st of it
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        if not args.tuning and case.id not in validation and case.id not in unseen:
            continue
        volume, labels = load_case(case)
        factor = max(2, int(round(args.thickness_mm / volume.geometry.spacing[2])))
        thick, thick_labels = thick_slices(volume, labels, factor)
        image_name, label_name = f"cases/{case.id}_image.nii.gz", f"cases/{case.id}_label.nii.gz"
        write_volume(out / image_name, thick)
        write_volume(out / label_name, Volume(thick_labels.astype(np.uint16), thick.geometry))
        entries.append({"id": case.id, "collection": case.collection, "modality": case.modality, "image": image_name,
                        "label": label_name, "labels": {str(value): name for value, name in case.labels}})
        print(f"{case.id}: {volume.geometry.shape_kji} -> {thick.geometry.shape_kji}, spacing {thick.geometry.spacing}",
              file=sys.stderr)
    copy = {"description": f"{Path(args.manifest).name} with {args.thickness_mm:g} mm slices along k (scripts/make_thick_slices.py)",
            "splits": splits, "unseen_labels": document.get("unseen_labels", {}), "cases": entries}
    (out / "manifest.json").write_text(json.dumps(copy, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
