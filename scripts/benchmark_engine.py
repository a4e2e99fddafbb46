"""Engine speed and memory on a 256x256x128 volume (not a test: it takes a minute or more).

    python scripts/benchmark_engine.py [--device cpu] [--weights FILE] [--out benchmarks/engine_cpu.json]

Times model load, context encoding (3 slice boxes), whole-volume segmentation of another volume with
that context (affine registration of the context onto it, then sliding window; no target prompts),
in-volume propagation from the boxes, and one corrective click; reports peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from weakicl.prompts import Point, PromptSet
from weakicl.session import Segmenter
from weakicl.simulation import slice_boxes
from weakicl.volume import Geometry, Volume

SHAPE_KJI = (128, 256, 256)
SPACING_IJK = (1.0, 1.0, 2.0)


def synthetic_ct(seed: int) -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: SHAPE_KJI[0], : SHAPE_KJI[1], : SHAPE_KJI[2]]
    organ = ((k - 64) / 30.0) ** 2 + ((j - 120) / 40.0) ** 2 + ((i - 140) / 35.0) ** 2 <= 1.0
    body = ((j - 128) / 110.0) ** 2 + ((i - 128) / 120.0) ** 2 <= 1.0
    image = np.where(body, 40.0, -1000.0) + 60.0 * organ + rng.normal(0, 20, SHAPE_KJI)
    return Volume(image.astype(np.float32), Geometry(SPACING_IJK, (0, 0, 0), np.eye(3), SHAPE_KJI), "CT"), organ


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights")
    parser.add_argument("--out", default="benchmarks/engine_cpu.json")
    args = parser.parse_args()
    reference, reference_truth = synthetic_ct(0)
    target, _ = synthetic_ct(1)
    boxes = slice_boxes(reference_truth)
    segmenter, load_seconds = timed(lambda: Segmenter(args.weights, args.device))
    task, encode_seconds = timed(lambda: segmenter.encode_context([(reference, boxes)]))
    whole, whole_seconds = timed(lambda: segmenter.segment(target, task))
    propagated, propagate_seconds = timed(lambda: segmenter.segment(reference, task, target_prompts=boxes))
    click = PromptSet(points=[Point((140.0, 120.0, 90.0), positive=True)])
    _, correct_seconds = timed(lambda: segmenter.segment(reference, task, target_prompts=boxes + click, previous=propagated.masks[0]))
    results = {
        "command": "python " + " ".join(sys.argv),
        "volume_kji": SHAPE_KJI,
        "spacing_ijk_mm": SPACING_IJK,
        "device": segmenter.device_name,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "seconds": {
            "model_load": round(load_seconds, 2),
            "context_encoding": round(encode_seconds, 2),
            "whole_volume_segmentation": round(whole_seconds, 2),
            "propagation_from_boxes": round(propagate_seconds, 2),
            "correction_click": round(correct_seconds, 2),
        },
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
