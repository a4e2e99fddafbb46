"""Inference-time ablations of the engine: what each choice is worth, with and without it.

    python scripts/ablations.py --manifest ../shared/data/manifest.json --validation 30 --out reports/ablations
    python scripts/ablations.py --manifest ../shared/data/manifest.json --tuning \
        --variants engine geodesic-8 geodesic-16 geodesic-24 geodesic-48 no-geodesic core-0.3 core-0.4 core-0.65 --out reports/tuning-geodesic
    python scripts/make_thick_slices.py --manifest ../shared/data/manifest.json --out .cache/thick6
    python scripts/ablations.py --manifest .cache/thick6/manifest.json --validation 24 \
        --variants engine no-geodesic anisotropy-1.5 anisotropy-2 anisotropy-3 kept-slices --out reports/ablations-thick6

Propagation from 3 box slices with the evaluation's seeded prompts (`weakicl evaluate --protocol
propagate` gives the same Dice for `engine`), model only, on the first `--validation` validation
structures and every unseen structure. Each variant runs in a fresh Segmenter (caches hold grids and
tasks made under one variant). `--tuning` runs on the tuning structures instead (training tasks only,
`weakicl.evaluation.manifest.TUNING_STRUCTURES`), where the engine's constants are chosen. Writes ablations.json and
ablations.md to `--out`. Retraining ablations
are not affordable on a CPU: these are all choices made at inference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from weakicl import adaptation, prompts, session
from weakicl.evaluation.manifest import load_case, read_manifest, select_structures, structure_mask, tuning_structures
from weakicl.evaluation.metrics import dice
from weakicl.evaluation.protocols import Settings, structure_rng, target_prompts
from weakicl.session import Segmenter, TaskEmbedding
from weakicl.weights import default_weights_path

TUNING_STEPS, TUNING_LR = 6, 0.05


def _patched(module, name: str, value):
    @contextmanager
    def patch():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, saved)
    return patch


def _unchanged():
    @contextmanager
    def patch():
        yield
    return patch


VARIANTS = {  # name: (module constant patched, frame settings changed, what it is)
    "engine": (_unchanged(), {}, "as shipped: isotropic frames, box hull 0.6 gap past the outer boxes (to the image edge "
               "within a gap, and on past it), box centres' seeds of a typical intensity only, appearance probe 0.5, "
               "geodesic seed competition 12, components off the prompts dropped, on CT no density the box centres lack"),
    "no-appearance-probe": (_patched(session, "APPEARANCE_WEIGHT", 0.0), {}, "without the test-time appearance probe"),
    "appearance-probe-1": (_patched(session, "APPEARANCE_WEIGHT", 1.0), {}, "appearance probe at weight 1"),
    "hull-not-extended": (_patched(session, "HULL_EXTENSION_GAPS", 0.0), {}, "box hull only between the outer boxes"),
    "components-kept": (_patched(session, "_drop_components_off", lambda values, support, level: None), {},
                        "every component kept, also those nowhere near the boxes"),
    "no-geodesic": (_patched(session, "GEODESIC_WEIGHT", 0.0), {}, "without the geodesic seed competition"),
    "geodesic-8": (_patched(session, "GEODESIC_WEIGHT", 8.0), {}, "geodesic seed competition at weight 8"),
    "geodesic-16": (_patched(session, "GEODESIC_WEIGHT", 16.0), {}, "geodesic seed competition at weight 16"),
    "geodesic-24": (_patched(session, "GEODESIC_WEIGHT", 24.0), {}, "geodesic seed competition at weight 24"),
    "geodesic-48": (_patched(session, "GEODESIC_WEIGHT", 48.0), {}, "geodesic seed competition at weight 48"),
    "core-0.3": (_patched(adaptation, "CORE_FRACTION", 0.3), {}, "the central 30 % of a slice box as structure seeds (the engine: 50 %)"),
    "core-0.4": (_patched(adaptation, "CORE_FRACTION", 0.4), {}, "the central 40 % of a slice box as structure seeds"),
    "core-0.65": (_patched(adaptation, "CORE_FRACTION", 0.65), {}, "the central 65 % of a slice box as structure seeds"),
    "hull-extended-1-gap": (_patched(session, "HULL_EXTENSION_GAPS", 1.0), {}, "box hull a whole gap past the outer boxes"),
    "hull-not-to-edge": (_patched(prompts, "EDGE_REACH_GAPS", -1.0), {}, "box hull not carried on to an image edge within a gap"),
    "hull-ends-at-edge": (_patched(session, "CONTINUING_CHANNELS", []), {}, "prompt channels padded with zeros past the image edge"),
    "edge-reach-any-gap": (_patched(prompts, "MIN_EDGE_REACH_GAP", 0.0), {}, "box hull on to an image edge within a gap, however few slices the gap"),
    "whole-box-centre": (_patched(adaptation, "CORE_TYPICALITY", None), {},
                         "the whole central half of each slice box as structure seeds, whatever its intensity"),
    "core-typicality-0.4": (_patched(adaptation, "CORE_TYPICALITY", 0.4), {}, "box centres' seeds where an intensity's inside share is at least 0.4 (the engine: 0.6)"),
    "core-typicality-0.5": (_patched(adaptation, "CORE_TYPICALITY", 0.5), {}, "box centres' seeds where an intensity's inside share is at least 0.5"),
    "core-typicality-0.7": (_patched(adaptation, "CORE_TYPICALITY", 0.7), {}, "box centres' seeds where an intensity's inside share is at least 0.7"),
    "anisotropy-1.5": (_unchanged(), {"max_anisotropy": 1.5}, "thick slices interpolated to 1.5x the pixel size"),
    "anisotropy-2": (_unchanged(), {"max_anisotropy": 2.0}, "thick slices interpolated to 2x the pixel size"),
    "anisotropy-3": (_unchanged(), {"max_anisotropy": 3.0}, "thick slices interpolated to 3x the pixel size"),
    "kept-slices": (_unchanged(), {"max_anisotropy": 1e6}, "slice thickness kept (the engine before)"),
    "no-support": (_patched(adaptation, "SUPPORT_QUANTILE", None), {}, "without the CT intensity support (engine 0.14)"),
    "support-any-modality": (_patched(session, "SUPPORT_MODALITIES", ("CT", "MR")), {}, "the intensity support on MR too"),
    "support-margin-25hu": (_patched(session, "SUPPORT_MARGIN_HU", 25.0), {}, "the intensity support widened by 25 HU each side"),
    "support-quantile-0.002": (_patched(adaptation, "SUPPORT_QUANTILE", 0.002), {}, "the support leaving out 0.2 % of each tail (the engine: 0.5 %)"),
    "support-quantile-0.01": (_patched(adaptation, "SUPPORT_QUANTILE", 0.01), {}, "the support leaving out 1 % of each tail"),
    "support-any-run": (_patched(adaptation, "SUPPORT_MIN_REGION_VOXELS", 1), {}, "every voxel outside the support, lone ones too (the engine: runs of 4)"),
    "support-no-cavities": (_patched(adaptation, "SUPPORT_SPARES_ENCLOSED", False), {}, "the support rule also in cavities the structure encloses"),
    "token-tuning": (_unchanged(), {}, f"task tokens tuned {TUNING_STEPS} Adam steps (lr {TUNING_LR}) against the box constraints"),
}


def tuned_task(segmenter: Segmenter, volume, task: TaskEmbedding, prompts) -> TaskEmbedding:
    """Iris-style in-context tuning: offsets of the task tokens fitted so that, on the annotated slices,
    nothing is predicted outside the boxes (1 voxel tolerance), their central half is foreground and
    every row and column of a box holds foreground (a tight box touches the structure)."""
    import torch
    import torch.nn.functional as F

    from weakicl.preprocess import pad_to_multiple

    prepared = segmenter._prepare(volume)
    frame = segmenter._frame(volume, prompts, None)
    multiple, patch = segmenter.config.downsampling, segmenter.config.patch_size
    image, _ = pad_to_multiple(frame.sample(prepared.normalized), multiple, patch)
    channels, _ = pad_to_multiple(segmenter._frame_channels(frame, prompts, None), multiple, patch, mode="constant")
    outside, core, lines = np.zeros(image.shape, bool), np.zeros(image.shape, bool), []
    for box in frame.prompts_to_frame(prompts).boxes:
        lo, hi = np.asarray(box.lo_ijk)[::-1], np.asarray(box.hi_ijk)[::-1]
        flat = int(np.argmin(hi - lo))
        plane = [a for a in range(3) if a != flat]
        index = [slice(None)] * 3
        index[flat] = int(round((lo[flat] + hi[flat]) / 2))
        if not 0 <= index[flat] < image.shape[flat]:
            continue
        low = np.floor(lo[plane]).astype(int) - 1
        high = np.ceil(hi[plane]).astype(int) + 2
        keep = np.ones([image.shape[a] for a in plane], bool)
        keep[max(low[0], 0):high[0], max(low[1], 0):high[1]] = False
        outside[tuple(index)] |= keep
        centre, half = (lo[plane] + hi[plane]) / 2, (hi[plane] - lo[plane]) / 4
        inner = np.zeros_like(keep)
        inner[int(np.ceil(centre[0] - half[0])):int(np.floor(centre[0] + half[0])) + 1,
              int(np.ceil(centre[1] - half[1])):int(np.floor(centre[1] + half[1])) + 1] = True
        core[tuple(index)] |= inner
        for along in (0, 1):
            across = 1 - along
            for row in range(int(np.ceil(lo[plane[across]])) + 1, int(np.floor(hi[plane[across]]))):
                line = list(index)
                line[plane[across]] = row
                line[plane[along]] = slice(max(low[along], 0), high[along])
                lines.append(tuple(line))
    model = segmenter.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        features = model.encode_image(torch.from_numpy(image[None, None].astype(np.float32)))
    prompt_tensor = torch.from_numpy(channels[None].astype(np.float32))
    outside_t, core_t = torch.from_numpy(outside), torch.from_numpy(core)
    offset = torch.zeros_like(task.tokens, requires_grad=True)
    optimiser = torch.optim.Adam([offset], lr=TUNING_LR)
    for _ in range(TUNING_STEPS):
        logits = model.decode(features, task.tokens + offset, prompt_tensor)[0, 0]
        loss = F.softplus(logits[outside_t]).mean() + F.softplus(-logits[core_t]).mean()
        if lines:
            loss = loss + F.softplus(-torch.stack([logits[line].max() for line in lines])).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return TaskEmbedding(task.tokens + offset.detach(), task.names, task.atlases)


def run_variant(name: str, structures: list, weights: Path) -> dict:
    patch, framing, _ = VARIANTS[name]
    settings = Settings("propagate")
    scores: dict[str, list[float]] = {}
    started = time.perf_counter()
    with patch():
        segmenter = Segmenter(weights, "cpu")
        segmenter.framing = dataclasses.replace(segmenter.framing, **framing)
        for structure in structures:
            volume, _ = load_case(structure.case)
            truth = structure_mask(structure)
            prompts = target_prompts(truth, settings, structure_rng(settings, structure))
            task = segmenter.encode_context([(volume, prompts)], structure.name)
            if name == "token-tuning":
                task = tuned_task(segmenter, volume, task, prompts)
            mask = segmenter.segment(volume, task, prompts).masks[0]
            scores.setdefault(structure.group, []).append(float(dice(mask, truth)))
    return {"variant": name, "what": VARIANTS[name][2], "seconds": time.perf_counter() - started,
            "dice": {group: {"mean": float(np.mean(values)), "n": len(values)} for group, values in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--validation", type=int, default=30, help="validation structures (the first N; default 30)")
    parser.add_argument("--variants", nargs="+", default=["engine", "no-geodesic", "no-appearance-probe", "appearance-probe-1", "hull-not-extended",
                                                          "hull-extended-1-gap", "hull-not-to-edge", "hull-ends-at-edge", "whole-box-centre", "components-kept", "token-tuning"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--tuning", action="store_true", help="the tuning structures (training tasks) instead of validation and unseen")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cases, document = read_manifest(args.manifest)
    if args.tuning:
        structures = tuning_structures(cases, document)
    else:
        structures = select_structures(cases, document, "validation", True)
        structures = [s for s in structures if s.group != "validation"] + [s for s in structures if s.group == "validation"][: args.validation]
    weights = Path(args.weights) if args.weights else default_weights_path()
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, structures, weights))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "ablations.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    groups = sorted({group for row in rows for group in row["dice"]})
    lines = ["# Inference-time ablations (propagate from 3 box slices, model only)", "", f"    {command}", "",
             "| variant | what | " + " | ".join(f"{g} Dice (n)" for g in groups) + " | seconds |",
             "|---|---|" + "---|" * len(groups) + "---|"]
    for row in rows:
        cells = [f"{row['dice'][g]['mean']:.3f} ({row['dice'][g]['n']})" if g in row["dice"] else "" for g in groups]
        lines.append(f"| {row['variant']} | {row['what']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'ablations.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
