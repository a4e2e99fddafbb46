"""The `weakicl` command line: segment, demo, evaluate, train.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 internal error. Outputs are written
atomically, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .errors import InputError, WeakICLError

LABEL_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".nrrd")


def progress_bar(description: str):
    """A progress callback drawing one tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", leave=False, disable=None, file=sys.stderr)

    def update(fraction: float, message: str) -> None:
        bar.set_postfix_str(message, refresh=False)
        bar.n = int(round(100 * fraction))
        bar.refresh()

    return update


def _is_label_image(path: str) -> bool:
    return path.lower().endswith(LABEL_IMAGE_SUFFIXES) and not path.lower().endswith(".mrk.json")


def load_context(pairs: list[list[str]], modality: str):
    """[(image, prompts-or-label-image)] -> [(Volume, PromptSet | label array)]."""
    from .prompts import read_prompts
    from .volume import read_label_map, read_volume

    items = []
    for image_path, annotation_path in pairs:
        volume = read_volume(image_path, modality)
        if _is_label_image(annotation_path):
            items.append((volume, read_label_map(annotation_path, volume.geometry)))
        else:
            items.append((volume, read_prompts(annotation_path, volume.geometry)))
    return items


def label_values(items) -> list[int] | None:
    """The non-zero label values when every context is a label image, else None."""
    if not all(isinstance(annotation, np.ndarray) for _, annotation in items):
        return None
    return sorted(set(np.unique(np.concatenate([np.unique(a) for _, a in items]))) - {0})


def multi_label(items) -> bool:
    return len(label_values(items) or []) > 1


def build_task(segmenter, items, label: str, progress=None):
    """One class from weak prompts; one class per label value when every context is a label image."""
    from .session import TaskEmbedding

    values = label_values(items)
    if values is not None:
        if not values:
            raise InputError("the context label images are empty")
        if len(values) > 1:
            tasks = []
            for value in values:
                present = [(volume, annotation == value) for volume, annotation in items if np.any(annotation == value)]
                tasks.append(segmenter.encode_context(present, f"{label}_{value}", progress))
            return TaskEmbedding.stack(tasks)
        items = [(volume, annotation > 0) for volume, annotation in items]
    return segmenter.encode_context(items, label, progress)


def run_segment(args: argparse.Namespace) -> int:
    import time

    from .prompts import read_prompts
    from .session import Segmenter
    from .volume import check_output_path, read_volume, write_mask

    output = check_output_path(args.output)
    if output.exists() and not args.overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it")
    target = read_volume(args.target, args.modality)
    target_prompts = read_prompts(args.prompts, target.geometry) if args.prompts else None
    if args.context:
        context = load_context(args.context, args.modality)
    elif target_prompts is not None:
        context = [(target, target_prompts)]
    else:
        raise InputError("give --context IMAGE PROMPTS, or --prompts on the target to propagate within it")
    if target_prompts is not None and args.context and multi_label(context):
        raise InputError("--prompts apply to one class: give a context with a single label value")
    started = time.perf_counter()
    segmenter = Segmenter(args.weights, args.device)
    progress = progress_bar("weakicl")
    task = build_task(segmenter, context, args.label, progress)
    prediction = segmenter.segment(target, task, target_prompts=target_prompts, align_context=not args.no_align, progress=progress)
    labels = prediction.label_map()  # overlapping classes: each voxel goes to its most probable class
    masks = labels[None] == np.arange(1, len(prediction.names) + 1)[:, None, None, None]
    write_mask(output, masks, target.geometry, prediction.names)
    voxels = masks.reshape(len(prediction.names), -1).sum(axis=1)
    summary = ", ".join(f"{name}: {count} voxels" for name, count in zip(prediction.names, voxels))
    print(f"wrote {output} ({summary}) in {time.perf_counter() - started:.1f} s on {segmenter.device_name}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    return demo(Path(args.out), args.device, args.weights)


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="image to segment (NIfTI, NRRD, MHA)")
    parser.add_argument("--context", nargs=2, action="append", metavar=("IMAGE", "PROMPTS"),
                        help="reference image and its prompts (.mrk.json, voxel JSON) or label image; repeatable")
    parser.add_argument("--prompts", help="prompts on the target (.mrk.json or voxel JSON); alone, the target is its own context")
    parser.add_argument("--label", default="segment", help="segment name (default: segment)")
    parser.add_argument("--no-align", action="store_true",
                        help="do not register the context images to the target (by default, without --prompts, "
                             "each context's annotation is registered onto the target as a starting prior)")
    parser.add_argument("--output", required=True, help="output: .nii.gz, .nii, .nrrd (label map) or .seg.nrrd")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_model_arguments(parser)
    parser.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto", help="intensity normalisation (default: auto)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="weights .safetensors with its .json card (default: shipped weights)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (CUDA when available)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="weakicl", description="Weakly supervised in-context segmentation of 3D medical images.")
    parser.add_argument("--version", action="version", version=f"weakicl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment a volume from weak prompts or reference cases",
                                  description="Segment TARGET from reference images with weak prompts or masks, or propagate prompts drawn on TARGET itself.")
    add_segment_arguments(segment)
    segment.set_defaults(run=run_segment)
    demo = commands.add_parser("demo", help="run end to end on a bundled synthetic phantom",
                               description="Segment a synthetic phantom from three slice boxes; write the result and a PNG overlay.")
    demo.add_argument("--out", default="weakicl-demo", help="output folder (default: weakicl-demo)")
    add_model_arguments(demo)
    demo.set_defaults(run=run_demo)
    _add_optional_command(commands, "evaluate", "weakicl.evaluation.runner", "add_evaluate_arguments", "run_evaluate",
                          "evaluate methods on a manifest of labelled cases")
    _add_optional_command(commands, "train", "weakicl.training.loop", "add_train_arguments", "run_train",
                          "train or continue training the network")
    return parser


def _add_optional_command(commands, name: str, module_name: str, add_arguments: str, run: str, help_text: str) -> None:
    """Commands whose modules need extra dependencies are imported only to build their parser."""
    import importlib

    module = importlib.import_module(module_name)
    parser = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    getattr(module, add_arguments)(parser)
    parser.set_defaults(run=getattr(module, run))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except WeakICLError as error:
        print(f"weakicl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weakicl: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place where any failure becomes an exit code
        if os.environ.get("WEAKICL_DEBUG"):
            raise
        print(f"weakicl: internal error: {type(error).__name__}: {error} (set WEAKICL_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
