"""`weakicl batch`: one task (the context encoded once) applied to every volume of a folder, a DICOM
study or a manifest, one output per input.

Resumable by construction: each output has a fixed name (`output_name`, the rule the Slicer module's
batch uses too) and is published atomically, so an output that exists is complete and is skipped on
the next run; a killed run leaves at most a temporary file, removed when the batch starts again.
With `--scheduler` the volumes run as tasks of a Dask cluster, with the same names and the same skipping.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InputError, OutputExists, WeakICLError
from .progress import ProgressCallback

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
OUTPUT_FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}
_STEM_SUFFIXES = (".seg.nrrd", ".dcm") + IMAGE_SUFFIXES
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]+')


def image_stem(name: str) -> str:
    """A file, series or node name without its image extension ("ct.nii.gz" -> "ct")."""
    for suffix in _STEM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_name(input_name: str, segment_name: str, suffix: str = ".seg.nrrd") -> str:
    """`<image stem> <segment><suffix>`: the one naming rule of batch results (command line and Slicer),
    fixed so that a rerun finds what an earlier run finished; characters no file system takes become "_"."""
    return _UNSAFE.sub("_", f"{image_stem(input_name)} {segment_name}".strip()) + suffix


@dataclass(frozen=True)
class BatchInput:
    """One volume to segment: a file or a DICOM series, the name its output is named after, and the
    folder "next to it" where its output goes without --out."""

    name: str
    path: Path
    folder: Path
    series_uid: str | None = None
    modality: str = "auto"

    @property
    def is_dicom(self) -> bool:
        return self.series_uid is not None

    def read(self):
        from .volume import read_volume

        return read_volume(self.path, self.modality, self.series_uid)


def find_inputs(source: str | os.PathLike, segment_name: str, suffix: str, modality: str = "auto",
                split: str | None = None) -> list[BatchInput]:
    """The volumes of a manifest (.json), of a folder (its image files, not recursive; the outputs of
    this rule left out), or of a DICOM study (a DICOMDIR, or a folder without image files: every series)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        return _manifest_inputs(source, modality, split)
    if source.is_file() and source.name.upper() == "DICOMDIR":
        return _dicom_inputs(source.parent, modality)
    if not source.is_dir():
        raise InputError(f"batch input not found: {source} (give a folder, a DICOM study folder or DICOMDIR, or a manifest .json)")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))
    outputs = {output_name(p.name, segment_name, suffix) for p in files}
    inputs = [BatchInput(image_stem(p.name), p, source, modality=modality) for p in files
              if p.name not in outputs and not p.name.lower().endswith(".seg.nrrd")]
    return inputs or _dicom_inputs(source, modality)


def _dicom_inputs(root: Path, modality: str) -> list[BatchInput]:
    from .dicom import find_series

    series = find_series(root)
    if not series:
        raise InputError(f"{root} holds no images (.nii.gz, .nii, .nrrd, .mha) and no DICOM series")
    names = [" ".join(part for part in (s.description or s.modality or "series", str(s.number or "")) if part) for s in series]
    repeated = {name for name in names if names.count(name) > 1}
    return sorted((BatchInput(f"{name} {s.uid[-8:]}" if name in repeated else name, root, root, s.uid, modality)
                   for name, s in zip(names, series)), key=lambda item: item.name)


def _manifest_inputs(path: Path, modality: str, split: str | None) -> list[BatchInput]:
    """`{"cases": [{"id"?, "image", "modality"?}], "splits"?: {name: [ids]}}` (the evaluation manifest
    format, labels not needed) or a JSON list of image paths; paths relative to the manifest's folder."""
    try:
        document = json.loads(path.read_text())
        cases = [{"image": entry} if isinstance(entry, str) else dict(entry)
                 for entry in (document if isinstance(document, list) else document["cases"])]
        if split is not None:
            if isinstance(document, list) or split not in document.get("splits", {}):
                raise InputError(f"{path.name} has no split {split!r}")
            wanted = set(document["splits"][split])
            cases = [case for case in cases if case.get("id") in wanted]
        inputs = []
        for case in cases:
            image = path.parent / case["image"]
            case_modality = case.get("modality", modality) if modality == "auto" else modality
            inputs.append(BatchInput(str(case.get("id") or image_stem(image.name)), image, image.parent,
                                     modality=case_modality if case_modality in ("CT", "MR") else "auto"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path.name} is not valid JSON: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{path.name}: malformed manifest ({type(error).__name__}: {error})") from None
    if not inputs:
        raise InputError(f"{path.name} lists no images")
    return inputs


@dataclass
class Job:
    """One input, its output path and, once run, what happened."""

    input: BatchInput
    output: Path
    status: str = "pending"  # pending, done, skipped (finished earlier), failed
    detail: str = ""
    seconds: float = 0.0


def plan_jobs(inputs: Sequence[BatchInput], segment_name: str, suffix: str, out: Path | None = None,
              overwrite: bool = False) -> list[Job]:
    """Output paths by `output_name`, checked before any work; finished outputs marked skipped, and those
    whose provenance sidecar remains without them (removed by hand) failed, as it is not replaced without
    `overwrite`."""
    from .atomic import remove_stale_temporaries
    from .volume import check_output_path

    jobs = [Job(item, (out or item.folder) / output_name(item.name, segment_name, suffix)) for item in inputs]
    if len({job.output for job in jobs}) != len(jobs):
        raise InputError("two inputs would write the same output name; give them distinct file names or ids")
    if suffix == ".dcm" and not all(job.input.is_dicom for job in jobs):
        raise InputError("DICOM SEG output needs DICOM inputs: " + ", ".join(job.input.name for job in jobs if not job.input.is_dicom))
    for folder in {job.output.parent for job in jobs}:
        remove_stale_temporaries(folder)  # the temporary files of a killed run
    for job in jobs:
        if job.output.exists() and not overwrite:
            check_output_path(job.output)
            job.status, job.detail = "skipped", "finished earlier"
            continue
        try:
            check_output_path(job.output, overwrite)
        except OutputExists as error:
            job.status, job.detail = "failed", str(error)
    return jobs


def segment_one(segmenter, task, item: BatchInput, output: Path, classes: Sequence[tuple[str, int]],
                align_context: bool = True, overwrite: bool = False, record: dict | None = None,
                progress: ProgressCallback | None = None) -> tuple[str, str]:
    """(status, detail) of one input: done, skipped (published meanwhile by another run) or failed (bad input)."""
    from .dicom import check_seg_target
    from .volume import write_mask

    names, values = [name for name, _ in classes], [value for _, value in classes]
    try:
        target = item.read()
        check_seg_target(output, target.geometry)
        prediction = segmenter.segment(target, task, align_context=align_context, progress=progress)
        masks = prediction.label_map()[None] == np.arange(1, len(names) + 1)[:, None, None, None]
        write_mask(output, masks, target.geometry, names, values=values, overwrite=overwrite, provenance=record)
    except OutputExists:
        return "skipped", "written meanwhile by another run"
    except WeakICLError as error:
        return "failed", str(error)
    voxels = masks.reshape(len(names), -1).sum(axis=1)
    return "done", ", ".join(f"{name}: {count} voxels" for name, count in zip(names, voxels))


def run_jobs(segmenter, task, jobs: Sequence[Job], classes: Sequence[tuple[str, int]], align_context: bool = True,
             overwrite: bool = False, record: Callable[[BatchInput, list[str]], dict] | None = None,
             progress_for: Callable[[str], ProgressCallback] | None = None) -> list[Job]:
    """Segment every pending job in turn with one task; a bad input fails its job, not the batch."""
    pending = [job for job in jobs if job.status == "pending"]
    names = [name for name, _ in classes]
    started = time.perf_counter()
    for number, job in enumerate(pending, 1):
        begin = time.perf_counter()
        job.status, job.detail = segment_one(
            segmenter, task, job.input, job.output, classes, align_context, overwrite,
            record(job.input, names) if record else None,
            progress_for(f"{number}/{len(pending)} {job.input.name}") if progress_for else None)
        job.seconds = time.perf_counter() - begin
        _log_progress(job, number, len(pending), started)
    return list(jobs)


def connect(address: str, timeout: float = 20.0):
    """A Dask client of the scheduler at `address`, made before any work so a wrong address fails at once."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError("--scheduler needs Dask: pip install 'weakicl[dask]'") from None
    try:
        return Client(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as error:
        raise InputError(f"cannot reach the Dask scheduler at {address}: {error}") from None


def run_jobs_on_cluster(client, weights: str | None, device: str, task, jobs: Sequence[Job],
                        classes: Sequence[tuple[str, int]], align_context: bool = True, overwrite: bool = False,
                        record: Callable[[BatchInput, list[str]], dict] | None = None) -> list[Job]:
    """The pending jobs as tasks of a Dask cluster (`connect`): the task embedding is sent once to every
    worker, each worker loads the weights once; workers must see the inputs, outputs and weights at the same paths."""
    from distributed import as_completed

    pending = [job for job in jobs if job.status == "pending"]
    names = [name for name, _ in classes]
    with client:
        shared = client.scatter(task, broadcast=True)
        futures = {client.submit(_cluster_job, weights, device, shared, job.input, job.output, list(classes), align_context,
                                 overwrite, record(job.input, names) if record else None, pure=False): job
                   for job in pending}
        started = time.perf_counter()
        for number, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            job.status, job.detail, job.seconds = future.result()
            _log_progress(job, number, len(pending), started)
    return list(jobs)


@functools.lru_cache(maxsize=2)
def _worker_segmenter(weights: str | None, device: str):
    from .session import Segmenter

    return Segmenter(weights, device)


def _cluster_job(weights, device, task, item, output, classes, align_context, overwrite, record) -> tuple[str, str, float]:
    begin = time.perf_counter()
    status, detail = segment_one(_worker_segmenter(weights, device), task, item, output, classes, align_context, overwrite, record)
    return status, detail, time.perf_counter() - begin


def _log_progress(job: Job, number: int, total: int, started: float) -> None:
    remaining = (time.perf_counter() - started) / number * (total - number)
    log.info("[%d/%d] %s: %s in %.1f s; about %s left", number, total, job.input.name, job.status, job.seconds, _duration(remaining))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def summary_table(jobs: Sequence[Job]) -> str:
    """A plain-text table: input, status, seconds, output, detail."""
    rows = [("input", "status", "seconds", "output", "detail")]
    rows += [(job.input.name, job.status, f"{job.seconds:.1f}" if job.status in ("done", "failed") else "-",
              job.output.name, job.detail) for job in jobs]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_common import add_model_arguments

    parser.add_argument("input", help="a folder of images (.nii.gz, .nii, .nrrd, .mha), a DICOM study (folder or DICOMDIR: "
                                      "every series) or a manifest .json ({\"cases\": [{\"id\", \"image\"}]} or a list of paths)")
    parser.add_argument("--context", nargs=2, action="append", metavar=("IMAGE", "ANNOTATION"), required=True,
                        help="reference image and its prompts (.mrk.json, voxel JSON) or label image (.seg.nrrd included); "
                             "repeatable; encoded once for the whole batch")
    parser.add_argument("--label", help="segment name, also used in the output names (default: the context's segment name, else segment)")
    parser.add_argument("--label-value", type=int, metavar="N", help="segment only label value N of the context label images")
    parser.add_argument("--out", help="folder for every output (default: next to each input; for a DICOM study, the study folder)")
    parser.add_argument("--output-format", choices=tuple(OUTPUT_FORMATS), default="seg.nrrd",
                        help="seg.nrrd (Slicer, default), nii.gz, nrrd, mha (label maps) or dicom-seg (.dcm, DICOM inputs only); "
                             "each output is named '<input> <segment>.<format>'")
    parser.add_argument("--split", help="with a manifest: only the cases of this split")
    parser.add_argument("--no-align", action="store_true", help="do not register the context images to each target")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that exist (default: skip them, so a rerun resumes)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run the volumes on a Dask cluster (e.g. tcp://host:8786); its workers must "
                                                               "see the inputs, outputs and weights at the same paths (pip install 'weakicl[dask]')")
    add_model_arguments(parser)
    parser.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto", help="intensity normalisation (default: auto)")


def run_batch(args: argparse.Namespace) -> int:
    from .cli_common import progress_bar
    from .context import DEFAULT_LABEL, build_task, context_classes, context_names, load_context, select_label_value
    from .provenance import provenance

    out = Path(args.out) if args.out else None
    if out is not None and not out.is_dir():
        raise InputError(f"output folder does not exist: {out}")
    context = load_context(args.context, args.modality)
    if args.label_value is not None:
        context = select_label_value(context, args.label_value)
    names = context_names(args.context)
    classes = context_classes(context, args.label, names)
    segment_name = args.label or (classes[0][0] if len(classes) == 1 else DEFAULT_LABEL)
    suffix = OUTPUT_FORMATS[args.output_format]
    inputs = find_inputs(args.input, segment_name, suffix, args.modality, args.split)
    jobs = plan_jobs(inputs, segment_name, suffix, out, args.overwrite)
    pending = sum(job.status == "pending" for job in jobs)
    log.info("%d volumes: %d finished earlier, %d to segment", len(jobs), len(jobs) - pending, pending)
    if pending:
        from .session import Segmenter

        client = connect(args.scheduler) if args.scheduler else None
        segmenter = Segmenter(args.weights, args.device)
        task = build_task(segmenter, context, args.label, progress_bar("weakicl"), names)

        def record(item: BatchInput, segments: list[str]) -> dict:
            return provenance(segmenter.card, item.path, None, None, args.context, segments)

        if client is not None:
            run_jobs_on_cluster(client, args.weights, args.device, task, jobs, classes, not args.no_align, args.overwrite, record)
        else:
            run_jobs(segmenter, task, jobs, classes, not args.no_align, args.overwrite, record, progress_bar)
    print(summary_table(jobs))
    failed = [job for job in jobs if job.status == "failed"]
    if failed:
        raise InputError(f"{len(failed)} of {len(jobs)} volumes failed (see the table); a rerun retries them and skips the rest")
    return 0
