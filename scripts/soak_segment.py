"""Soak test of the write path (issue 12), not part of the test suite: N `weakicl segment` runs at once
into one folder, then every output is checked.

    python scripts/soak_segment.py --runs 8 [--weights W] [--out FOLDER] [--keep]

Runs, all started together on a synthetic phantom (weakicl.demo):
* `--runs` runs, each to its own output (formats in turn: .nii.gz, .nii, .nrrd, .seg.nrrd): each must
  exit 0 and its file must read back on the image's grid with the values {0, 1} and a non-empty mask;
* `--collide` runs to one shared new path without --overwrite: exactly one exits 0, the others exit 2
  with one line ("exists" or "appeared while this run was writing");
* `--replace` runs to one path with --overwrite: all exit 0 and the file is one complete result.
Afterwards no temporary file (`.weakicl-*`) may be left in the folder. Exit status 0 when all held.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from weakicl.atomic import TEMPORARY_PREFIX
from weakicl.demo import make_phantom
from weakicl.simulation import slice_boxes
from weakicl.volume import read_label_map, read_volume, write_volume

FORMATS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def segment(image: Path, prompts: Path, output: Path, weights: str | None, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "weakicl.cli", "segment", str(image), "--prompts", str(prompts), "--output", str(output),
               "--device", "cpu", "-q", *extra] + (["--weights", weights] if weights else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_output(path: Path, image: Path) -> str | None:
    """None when `path` is a complete result on the image's grid, else what is wrong."""
    try:
        labels = read_label_map(path, read_volume(image).geometry)
    except Exception as error:  # a soak reports every failure rather than stopping at the first
        return f"unreadable: {error}"
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1} or 1 not in values:
        return f"label values {sorted(values)}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="runs with their own output (default 8)")
    parser.add_argument("--collide", type=int, default=3, help="runs to one shared new path without --overwrite (default 3)")
    parser.add_argument("--replace", type=int, default=3, help="runs to one path with --overwrite (default 3)")
    parser.add_argument("--weights", help="weights (default: the shipped weights)")
    parser.add_argument("--out", help="folder for inputs and outputs (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder afterwards")
    args = parser.parse_args()

    folder = Path(args.out or tempfile.mkdtemp(prefix="weakicl-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    volume, truth = make_phantom()
    image = write_volume(folder / "phantom.nrrd", volume)
    prompts = folder / "boxes.json"
    prompts.write_text(json.dumps(slice_boxes(truth, (0.25, 0.5, 0.75)).to_voxel_json()))

    started = time.perf_counter()
    own = [(folder / f"own_{n}{FORMATS[n % len(FORMATS)]}") for n in range(args.runs)]
    shared, replaced = folder / "shared.seg.nrrd", folder / "replaced.nii.gz"
    runs = [("own", path, segment(image, prompts, path, args.weights)) for path in own]
    runs += [("collide", shared, segment(image, prompts, shared, args.weights)) for _ in range(args.collide)]
    runs += [("replace", replaced, segment(image, prompts, replaced, args.weights, "--overwrite")) for _ in range(args.replace)]
    results = [(kind, path, process.wait(), process.stderr.read().strip()) for kind, path, process in runs]
    seconds = time.perf_counter() - started

    failures = []
    for kind, path, code, error in results:
        if kind == "collide":
            continue
        if code != 0:
            failures.append(f"{path.name} ({kind}): exit {code}: {error}")
    collided = [(code, error) for kind, _, code, error in results if kind == "collide"]
    if collided:
        winners = [code for code, _ in collided if code == 0]
        losers = [(code, error) for code, error in collided if code != 0]
        if len(winners) != 1:
            failures.append(f"{shared.name}: {len(winners)} of {len(collided)} colliding runs succeeded (expected exactly 1)")
        for code, error in losers:
            if code != 2 or len(error.splitlines()) != 1 or not ("exists" in error or "appeared while" in error):
                failures.append(f"{shared.name}: a losing run gave exit {code}: {error}")
    for path in sorted(set(own + ([shared] if collided else []) + ([replaced] if args.replace else []))):
        problem = check_output(path, image)
        if problem:
            failures.append(f"{path.name}: {problem}")
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMPORARY_PREFIX))
    if leftovers:
        failures.append(f"temporary files left: {', '.join(leftovers)}")

    total = len(results)
    print(f"{total} concurrent runs in {seconds:.1f} s into {folder}: "
          f"{args.runs} own outputs, {args.collide} to one new path, {args.replace} replacing one path")
    for line in failures:
        print(f"FAIL {line}")
    print("all outputs complete, no result clobbered, nothing left behind" if not failures else f"{len(failures)} failures")
    if not args.keep and not args.out:
        shutil.rmtree(folder)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
