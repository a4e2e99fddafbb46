"""The `weakicl` command line: segment, demo, evaluate, train.

Exit codes (weakicl.errors): 0 success, 1 internal error, 2 bad input or an existing output, 3 the output
could not be written (disk full, quota, permissions); every failure is one line on stderr. Outputs are
written through weakicl.atomic: verified, never clobbered without --overwrite, and a failed run leaves
nothing behind and any earlier output unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .cli_common import add_model_arguments, progress_bar
from .context import DEFAULT_LABEL, build_task, context_classes, context_names, load_context, multi_label, select_label_value
from .errors import InputError, WeakICLError
from .prompts import NEGATIVE_WORDS

NEGATIVE_POINTS_HELP = (
    "Points are negative (background: 'not here') when the file name, the point list's name or the point's label "
    f"starts with '-' or contains {', '.join(repr(word) for word in NEGATIVE_WORDS)} (e.g. negative.mrk.json, "
    "label '-1'); in voxel JSON when \"positive\": false; all others are positive")


def run_segment(args: argparse.Namespace) -> int:
    import time

    from .prompts import read_prompts
    from .dicom import check_seg_target
    from .provenance import provenance
    from .session import Segmenter
    from .volume import check_output_path, read_volume, write_mask

    output = check_output_path(args.output, args.overwrite)
    refuse_input_as_output(output, [("target image", args.target), ("prompt file", args.prompts)]
                           + [(role, path) for pair in args.context or () for role, path in zip(("context image", "context annotation"), pair)])
    target = read_volume(args.target, args.modality, args.series_uid)
    check_seg_target(output, target.geometry)
    target_prompts = read_prompts(args.prompts, target.geometry) if args.prompts else None
    if args.context:
        context = load_context(args.context, args.modality)
    elif target_prompts is not None:
        context = [(target, target_prompts)]
    else:
        raise InputError("give --context IMAGE PROMPTS, or --prompts on the target to propagate within it")
    if args.label_value is not None:
        context = select_label_value(context if args.context else [], args.label_value)
    if target_prompts is not None and args.context and multi_label(context):
        raise InputError("--prompts apply to one class and the context label images hold several values: pick one with --label-value N")
    names = context_names(args.context or ())
    classes = context_classes(context, args.label, names)
    started = time.perf_counter()
    segmenter = Segmenter(args.weights, args.device)
    progress = progress_bar("weakicl")
    task = build_task(segmenter, context, args.label, progress, names)
    prediction = segmenter.segment(target, task, target_prompts=target_prompts, align_context=not args.no_align, progress=progress)
    labels = prediction.label_map()  # overlapping classes: each voxel goes to its most probable class
    masks = labels[None] == np.arange(1, len(prediction.names) + 1)[:, None, None, None]
    record = provenance(segmenter.card, args.target, target_prompts, args.prompts, args.context or (), prediction.names)
    write_mask(output, masks, target.geometry, prediction.names, values=[value for _, value in classes],
               overwrite=args.overwrite, provenance=record)
    voxels = masks.reshape(len(prediction.names), -1).sum(axis=1)
    summary = ", ".join(f"{name}: {count} voxels" for name, count in zip(prediction.names, voxels))
    print(f"wrote {output} ({summary}) in {time.perf_counter() - started:.1f} s on {segmenter.device_name}")
    return 0


def refuse_input_as_output(output: Path, inputs: list[tuple[str, str | None]]) -> None:
    """--output must never name an input: with --overwrite it would replace the image being segmented."""
    for role, path in inputs:
        if path and _same_file(output, Path(path)):
            relation = "lies in" if Path(path).is_dir() else "is"
            raise InputError(f"--output {output} {relation} the {role}; choose another file name")


def _same_file(first: Path, second: Path) -> bool:
    """`first` is `second`, or an existing file of the folder `second` (a DICOM series)."""
    if first.exists() and second.is_dir():
        return first.resolve().is_relative_to(second.resolve())
    if first.exists() and second.exists():
        return os.path.samefile(first, second)  # links and other spellings of one file included
    return first.resolve() == second.resolve()


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    return demo(Path(args.out), args.device, args.weights)


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="image to segment (NIfTI, NRRD, MHA), or a DICOM series: its folder, one of its files or a DICOMDIR")
    parser.add_argument("--series-uid", metavar="UID", help="SeriesInstanceUID of the target where its DICOM folder holds several series")
    parser.add_argument("--context", nargs=2, action="append", metavar=("IMAGE", "PROMPTS"),
                        help="reference image and its prompts (.mrk.json, voxel JSON) or label image; repeatable. "
                             + NEGATIVE_POINTS_HELP)
    parser.add_argument("--prompts", help="prompts on the target (.mrk.json: ROI = box, point list = points; or voxel "
                                          "JSON); alone, the target is its own context. " + NEGATIVE_POINTS_HELP)
    parser.add_argument("--label", help=f"segment name (default: the segment's name in a .seg.nrrd context, else {DEFAULT_LABEL}; "
                                         f"with several label values, NAME_VALUE)")
    parser.add_argument("--label-value", type=int, metavar="N",
                        help="segment only label value N of the context label images (label values are kept in the output: "
                             "a context with values 5 and 29 gives 5 and 29)")
    parser.add_argument("--no-align", action="store_true",
                        help="do not register the context images to the target (by default, without --prompts, "
                             "each context's annotation is registered onto the target as a starting prior)")
    parser.add_argument("--output", required=True, help="output: .nii.gz, .nii, .nrrd, .mha (label map), .seg.nrrd (Slicer) "
                                                        "or .dcm (DICOM SEG referencing the target series; DICOM targets only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_model_arguments(parser)
    parser.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto", help="intensity normalisation (default: auto)")


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
    _add_optional_command(commands, "batch", "weakicl.batch", "add_batch_arguments", "run_batch",
                          "segment every volume of a folder, DICOM study or manifest with one context (resumable)")
    add_verbosity_arguments(parser)
    for command in commands.choices.values():  # accepted after the command too: `weakicl segment ... -q`
        add_verbosity_arguments(command, argparse.SUPPRESS)
    return parser


def add_verbosity_arguments(parser: argparse.ArgumentParser, default=None) -> None:
    """-v / -q; a command's own copy defaults to SUPPRESS so it does not reset the main parser's value."""
    parser.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                        help="more messages (debug details)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False if default is None else default,
                        help="only warnings and errors: no progress bars, no device line")


def configure_logging(verbose: int, quiet: bool) -> None:
    """Messages of the "weakicl" logger on stderr: INFO by default (device, phases), -v DEBUG, -q WARNING."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to sys.stderr as it is at each message (tests and embedding programs replace it)."""

        def emit(self, record: logging.LogRecord) -> None:
            self.stream = sys.stderr
            super().emit(record)

    handler = CurrentStderr()
    handler.setFormatter(logging.Formatter("weakicl: %(message)s"))
    logger = logging.getLogger("weakicl")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


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
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.run(args) or 0)
    except WeakICLError as error:
        print(f"weakicl: error: {error}", file=sys.stderr)
        return error.exit_code
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
