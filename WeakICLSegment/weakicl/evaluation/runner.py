"""`weakicl evaluate`: every method under every asked protocol on every structure of a manifest,
then results.json, report.md and figures in the output folder.

Imported when the `weakicl` parser is built, so heavy modules are imported inside `run_evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from ..errors import InputError, OutputExists
from . import DEFAULT_METHODS, METHOD_NAMES, PROMPT_KINDS, PROTOCOLS, SLICE_AXES

PATH_ARGUMENTS = ("manifest", "out", "weights")
RESULTS, REPORT = "results.json", "report.md"  # what a run writes in --out, with figures/


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_common import add_model_arguments

    parser.add_argument("--manifest", required=True, help="manifest JSON of cases (image, label, labels, modality, splits)")
    parser.add_argument("--split", help="evaluate the cases of this split of the manifest (e.g. validation)")
    parser.add_argument("--unseen", action="store_true", help="also evaluate the manifest's unseen_labels structures")
    parser.add_argument("--tuning", action="store_true", help="evaluate only the tuning structures (training tasks where "
                        "the engine's constants are chosen; see evaluation.manifest.TUNING_STRUCTURES)")
    parser.add_argument("--protocol", nargs="+", default=["propagate"], metavar="P",
                        help=f"one or more of {', '.join(PROTOCOLS)} (default: propagate)")
    parser.add_argument("--method", nargs="+", default=list(DEFAULT_METHODS), metavar="M",
                        help=f"one or more of {', '.join(METHOD_NAMES)} (default: all but model-unaligned)")
    parser.add_argument("--slices", type=int, default=3, help="annotated slices per structure (default: 3, at 25/50/75%%)")
    parser.add_argument("--slice-axis", choices=SLICE_AXES, default="k",
                        help="the IJK axis the annotated slices cut across (default k: axial in axially acquired scans; "
                             "j and i: coronal and sagittal there)")
    parser.add_argument("--prompt-kind", choices=PROMPT_KINDS, default="boxes", help="box or one interior point per slice, or one 3D box around the whole structure (box3d)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3], help="context subjects for cross protocols (default: 1 3)")
    parser.add_argument("--start", choices=("propagate", "cross-weak"), default="propagate", help="first prediction of interactive")
    parser.add_argument("--clicks", type=int, default=5, help="corrective clicks in interactive (default: 5)")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="move each box side by up to this fraction of the box (0.1: loose or tight by a few voxels, "
                             "as people draw) and place corrective clicks off-centre (0.1: anywhere in the deeper half "
                             "of the error); default 0: tight boxes, clicks at the error's deepest voxel")
    parser.add_argument("--context-collection", choices=("same", "other"), default="same",
                        help="cross protocols: context subjects from the same collection (default) or from another "
                             "one with the same structure name (e.g. the abdominal CT as context for the abdominal MR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, context choice and bootstrap (default: 0)")
    parser.add_argument("--limit", type=int, help="only the first N cases of each group (quick checks; N >= 1)")
    parser.add_argument("--out", required=True, help="output folder for results.json, report.md and figures/")
    parser.add_argument("--overwrite", action="store_true", help="replace the results.json, report.md and figures/ of an earlier run in --out")
    add_model_arguments(parser)


def expand_settings(args: argparse.Namespace) -> list:
    """One Settings per protocol, times each k where other subjects form the context."""
    from .protocols import Settings

    unknown = [p for p in args.protocol if p not in PROTOCOLS]
    if unknown:
        raise InputError(f"unknown protocol {unknown[0]!r} (choose from {', '.join(PROTOCOLS)})")
    if args.slices < 1 or args.clicks < 0 or min(args.k) < 1:
        raise InputError("--slices and --k must be at least 1 and --clicks at least 0")
    if not 0.0 <= args.jitter < 0.5:
        raise InputError("--jitter must be in [0, 0.5)")
    settings = []
    for protocol in dict.fromkeys(args.protocol):
        base = Settings(protocol, args.slices, args.prompt_kind, args.k[0], args.start, args.clicks, args.seed, args.jitter,
                        args.context_collection, args.slice_axis)
        if base.uses_context_subjects:
            settings += [dataclasses.replace(base, k=k) for k in dict.fromkeys(args.k)]
        else:
            settings.append(base)
    return settings


def first_cases(structures: list, limit: int | None) -> list:
    """The structures of the first `limit` cases of each group."""
    if limit is None:
        return structures
    kept: dict[str, list[str]] = {}
    for structure in structures:
        cases = kept.setdefault(structure.group, [])
        if structure.case.id not in cases and len(cases) < limit:
            cases.append(structure.case.id)
    return [s for s in structures if s.case.id in kept[s.group]]


def check_evaluation_output(out: Path, overwrite: bool) -> None:
    """Refuse, before hours of work, to replace an earlier run's results without --overwrite."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for results.json, report.md and figures/")
    earlier = [name for name in (RESULTS, REPORT) if os.path.lexists(out / name)]
    if earlier and not overwrite:
        raise OutputExists(f"{out} holds an earlier evaluation ({', '.join(earlier)}); pass --overwrite to replace it")


def run_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli_common import progress_hidden
    from ..provenance import portable_command, portable_path
    from .figures import draw_all
    from .manifest import MIN_VOXELS, load_case, read_manifest, select_structures, structure_mask, tuning_structures
    from .methods import build_methods
    from .metrics import SURFACE_TOLERANCE_MM
    from .protocols import evaluate
    from .report import summarise, write_report, write_results

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1 (cases per group), got {args.limit}")
    out = Path(args.out)
    check_evaluation_output(out, args.overwrite)
    settings = expand_settings(args)
    cases, document = read_manifest(args.manifest)
    chosen = tuning_structures(cases, document) if args.tuning else select_structures(cases, document, args.split, args.unseen)
    structures = first_cases(chosen, args.limit)
    methods = build_methods(args.method, args.weights, args.device)
    # Every volume stays loaded for the whole run: contexts reuse them, and the Segmenter's caches are
    # keyed by array identity, which must not be recycled by a freed array while they hold it.
    load_case.cache_clear()
    evaluable, skipped = [], []
    for structure in structures:
        (evaluable if structure_mask(structure).sum() >= MIN_VOXELS else skipped).append(structure)
    started = time.perf_counter()
    records = []
    for setting in settings:
        progress = tqdm(evaluable, desc=setting.label, unit="structure", file=sys.stderr, mininterval=2.0, disable=progress_hidden())
        for structure in progress:
            progress.set_postfix_str(structure.key, refresh=False)
            records += [evaluate(method, structure, setting, evaluable) for method in methods]
    load_case.cache_clear()
    summary = summarise(records, args.seed)
    # shipped reports record paths relative to the working folder, never this machine's absolute paths
    descriptions = {method.name: {key: portable_path(value) if key == "weights" else value
                                  for key, value in method.describe().items()} for method in methods}
    run = {
        "command": portable_command(sys.argv),
        "arguments": {key: portable_path(value) if key in PATH_ARGUMENTS and value else value
                      for key, value in vars(args).items() if key != "run"},
        "manifest": portable_path(args.manifest),
        "settings": {"slices": args.slices, "prompt_kind": args.prompt_kind, "k": args.k, "start": args.start,
                     "clicks": args.clicks, "seed": args.seed, "jitter": args.jitter, "context_collection": args.context_collection, "slice_axis": args.slice_axis},
        "methods": descriptions,
        "weights_sha256": descriptions.get("model", {}).get("weights_sha256"),
        "growcut_backend": descriptions.get("growcut", {}).get("backend"),
        "min_voxels": MIN_VOXELS,
        "surface_tolerance_mm": SURFACE_TOLERANCE_MM,
        "structures_evaluated": len(evaluable),
        "skipped_structures": [{"case": s.case.id, "label": s.value, "structure": s.name, "group": s.group} for s in skipped],
        "seconds_total": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / RESULTS, run, records, summary)
    write_report(out / REPORT, run, [r.as_dict() for r in records], summary, draw_all(records, summary, out / "figures"))
    print(f"evaluated {len(evaluable)} structures ({len(skipped)} skipped) in {run['seconds_total']:.0f} s; "
          f"report: {out / REPORT}")
    return 0
