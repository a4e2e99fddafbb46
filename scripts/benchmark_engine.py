"""Engine speed, memory and click gains on synthetic CT volumes (not a test: it takes minutes).

    python scripts/benchmark_engine.py [--device cpu|cuda] [--threads 2] [--shapes 128x256x256 256x256x256]
                                       [--large] [--weights FILE] [--batch-volumes 3] [--no-growcut]
                                       [--cudnn-benchmark] [--channels-last] [--profile FILE] [--out benchmarks/engine_cpu.json]

Per volume shape (KJI): model load, context encoding (3 slice boxes), whole-volume segmentation of
another volume from the cached task (context registered onto it; with `--no-registration`, the task tokens
tuned on the reference instead, once, `weakicl.context_tuning`), in-volume propagation from the boxes,
and 5 corrections placed by the evaluation's click protocol with the boxes still on the target (median
seconds and Dice after each click), plus a batch of new volumes (each registered afresh). Slicer's GrowCut
(slicer-core) runs on the same volume, boxes and clicks in the same run as the reference, unless
`--no-growcut` (a GPU machine without slicer-core). `--large` also measures the peak
resident memory of propagation on a 512x512x300 CT in a fresh process. Times are wall-clock on this
machine: compare ratios within one run, not across machines. `--profile` appends the functions that take
the time of one whole volume from the cached task and of one correction (cProfile) to a text file;
`--cudnn-benchmark` lets cuDNN time its convolution algorithms per input shape, `--channels-last` keeps
the network's weights in channels-last order (so its 3D convolutions run channels-last, which tensor
cores favour under bf16): experiments, the engine sets neither.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from weakicl.evaluation.baselines import GrowCut
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Trial
from weakicl.prompts import PromptSet
from weakicl.session import Segmenter
from weakicl.simulation import corrective_click, slice_boxes
from weakicl.volume import Geometry, Volume

CLICKS = 5


def synthetic_ct(shape_kji: tuple[int, int, int], seed: int) -> tuple[Volume, np.ndarray]:
    """A body with a lobed organ whose boxes and clicks behave like a real one (not a perfect ellipsoid).
    Built slice by slice in float32, so the benchmark's own data adds little to the peak memory it measures."""
    rng = np.random.default_rng(seed)
    size = np.asarray(shape_kji, dtype=float)
    centre = size * np.array([0.5, 0.47, 0.55])
    radii = size * np.array([0.23, 0.16, 0.14])
    j, i = np.ogrid[: shape_kji[1], : shape_kji[2]]
    body = ((j - size[1] / 2) / (0.43 * size[1])) ** 2 + ((i - size[2] / 2) / (0.47 * size[2])) ** 2 <= 1.0
    image = np.empty(shape_kji, dtype=np.float32)
    organ = np.empty(shape_kji, dtype=bool)
    for k in range(shape_kji[0]):
        along = ((k - centre[0]) / radii[0]) ** 2
        organ[k] = (along + ((j - centre[1]) / radii[1]) ** 2 + ((i - centre[2]) / radii[2]) ** 2 <= 1.0) | (
            along + ((j - centre[1] - radii[1]) / (0.6 * radii[1])) ** 2 + ((i - centre[2] - radii[2]) / (0.6 * radii[2])) ** 2 <= 1.0)
        image[k] = np.where(body, 40.0, -1000.0) + 60.0 * organ[k] + rng.standard_normal(shape_kji[1:], dtype=np.float32) * 20
    geometry = Geometry((1.0, 1.0, 2.0 if shape_kji[0] < shape_kji[1] else 1.0), (0, 0, 0), np.eye(3), shape_kji)
    return Volume(image, geometry, "CT"), organ


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def interactive(segment, truth: np.ndarray, first: np.ndarray) -> tuple[list[float], list[float]]:
    """Seconds per correction and Dice after each, clicks by the evaluation's protocol."""
    prediction, clicks, seconds, scores = first, [], [], [dice(first, truth)]
    for _ in range(CLICKS):
        click = corrective_click(prediction, truth)
        if click is None:
            break
        clicks.append(click)
        prediction, took = timed(lambda: segment(list(clicks), prediction))
        seconds.append(took)
        scores.append(dice(prediction, truth))
    return seconds, scores


def new_volumes(base: Volume, count: int):
    """`count` volumes unlike each other to the engine's caches (a scalar shift per volume), made one at a time."""
    for number in range(1, count + 1):
        yield Volume(base.array + np.float32(number), base.geometry, base.modality)


def profiled(function, title: str, out: Path) -> None:
    """Append the 25 functions with the most cumulative time of one call of `function` to `out`."""
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(function)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).strip_dirs().sort_stats("cumulative").print_stats(25)
    with out.open("a") as file:
        file.write(f"== {title}: {time.perf_counter() - started:.3f} s\n{text.getvalue()}\n")


def benchmark_shape(shape_kji, device: str, weights: str | None, batch_volumes: int, with_growcut: bool, align: bool,
                    profile: Path | None = None, channels_last: bool = False) -> dict:
    reference, truth = synthetic_ct(shape_kji, 0)
    boxes = slice_boxes(truth)
    segmenter, load_seconds = timed(lambda: Segmenter(weights, device))
    if channels_last:
        import torch

        segmenter.model.to(memory_format=torch.channels_last_3d)
    task, encode_seconds = timed(lambda: segmenter.encode_context([(reference, boxes)]))
    other = synthetic_ct(shape_kji, 1)[0]
    whole, whole_seconds = timed(lambda: segmenter.segment(other, task, align_context=align))
    _, cached_seconds = timed(lambda: segmenter.segment(other, task, align_context=align))  # registration or tuned tokens cached
    _, batch_seconds = timed(lambda: [segmenter.segment(volume, task, align_context=align) for volume in new_volumes(other, batch_volumes)])
    propagated, propagate_seconds = timed(lambda: segmenter.segment(reference, task, target_prompts=boxes))
    first = propagated.masks[0]

    def correct(clicks, previous):
        prompts = boxes + PromptSet(points=clicks)
        return segmenter.segment(reference, task, prompts, previous, new_prompts=PromptSet(points=clicks[-1:])).masks[0]

    model_seconds, model_dice = interactive(correct, truth, first)
    if profile is not None:
        name = "x".join(str(n) for n in shape_kji)
        profiled(lambda: segmenter.segment(other, task, align_context=align), f"{name} whole volume, cached task", profile)
        click = corrective_click(first, truth)
        if click is not None:
            profiled(lambda: correct([click], first), f"{name} first correction", profile)
    growcut_seconds, growcut_click_seconds, growcut_dice = None, [], []
    if with_growcut:
        growcut = GrowCut()
        trial = Trial(None, reference, boxes, [(reference, boxes)])
        growcut_first, growcut_seconds = timed(lambda: growcut.segment(trial, [], None))
        growcut_click_seconds, growcut_dice = interactive(lambda clicks, previous: growcut.segment(trial, clicks, previous), truth, growcut_first)
    return {
        "volume_kji": list(shape_kji),
        "spacing_ijk_mm": list(reference.geometry.spacing),
        "seconds": {
            "model_load": round(load_seconds, 2),
            "context_encoding": round(encode_seconds, 2),
            "whole_volume_with_registration" if align else "whole_volume_with_token_tuning": round(whole_seconds, 2),
            "whole_volume_cached_task": round(cached_seconds, 2),
            f"batch_of_{batch_volumes}_new_volumes": round(batch_seconds, 2),
            "per_new_volume": round(batch_seconds / max(batch_volumes, 1), 3),
            "propagation_from_boxes": round(propagate_seconds, 2),
            "correction_median": round(statistics.median(model_seconds), 3) if model_seconds else None,
            "corrections": [round(s, 3) for s in model_seconds],
            "growcut_propagation": None if growcut_seconds is None else round(growcut_seconds, 2),
            "growcut_correction_median": round(statistics.median(growcut_click_seconds), 3) if growcut_click_seconds else None,
        },
        "dice_after_each_click": {"model": [round(d, 4) for d in model_dice], "growcut": [round(d, 4) for d in growcut_dice]},
        "whole_volume_dice": round(dice(whole.masks[0], synthetic_ct(shape_kji, 1)[1]), 4),
    }


def large_ct_peak_mb(device: str, weights: str | None) -> float:
    """Peak resident memory (MB) of reading prompts and propagating on a 512x512x300 CT, in a fresh process."""
    code = (
        "import resource, sys; sys.path.insert(0, %r); from benchmark_engine import synthetic_ct;"
        "from weakicl.session import Segmenter; from weakicl.simulation import slice_boxes;"
        "v, t = synthetic_ct((300, 512, 512), 0); b = slice_boxes(t); del t;"
        "s = Segmenter(%r, %r); task = s.encode_context([(v, b)]); s.segment(v, task, target_prompts=b);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    ) % (str(Path(__file__).parent), weights, device)
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return round(float(output.split()[-1]), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, a laptop)")
    parser.add_argument("--shapes", nargs="+", default=["128x256x256"], help="volume shapes KxJxI")
    parser.add_argument("--large", action="store_true", help="also the peak memory of a 512x512x300 CT")
    parser.add_argument("--weights")
    parser.add_argument("--batch-volumes", type=int, default=3, help="new volumes segmented one after another from the cached task")
    parser.add_argument("--no-growcut", action="store_true", help="skip the GrowCut reference (no slicer-core here)")
    parser.add_argument("--no-registration", action="store_true",
                        help="whole volumes from the task tokens alone, tuned once on the reference, every window (no SimpleITK here)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--channels-last", action="store_true", help="the network's weights in channels-last order")
    parser.add_argument("--profile", type=Path, help="append cProfile tables of a whole volume and a correction to this file")
    parser.add_argument("--out", default="benchmarks/engine_cpu.json")
    args = parser.parse_args()
    import torch

    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    # first, while this process is small: Linux carries a parent's resident size into a forked child's peak
    large_peak = large_ct_peak_mb(args.device, args.weights) if args.large else None
    results = {
        "command": "python scripts/benchmark_engine.py " + " ".join(sys.argv[1:]),
        "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "runs": [],
        "registration": not args.no_registration,
        "cudnn_benchmark": args.cudnn_benchmark,
        "channels_last": args.channels_last,
    }
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    for shape in shapes:  # written after each shape: a run cut short keeps what it measured
        results["runs"].append(benchmark_shape(shape, args.device, args.weights, args.batch_volumes, not args.no_growcut, not args.no_registration,
                                               args.profile, args.channels_last))
        results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if args.device.startswith("cuda"):
            results["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if large_peak is not None:
            results["peak_memory_mb_512x512x300_propagation"] = large_peak
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
