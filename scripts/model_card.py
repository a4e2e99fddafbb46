"""Write the shipped model card from the training card and evaluation results.

    python scripts/model_card.py model_weights/weakicl-0.1.safetensors reports/engine-0.15/results.json \
        reports/engine-0.6-network-only/results.json reports/engine-0.10-cross/results.json \
        reports/engine-0.15-points/results.json reports/engine-0.15-box3d/results.json

Adds an `evaluation` section (mean over structures per setting, group and method, with the command
that produced it) to the JSON card beside the weights, and renders from that card
`model_weights/README.md` (the model card, intended use and limitations included) and
`model_weights/LICENSE.md` (the weights' licence and attributions; both ship inside the wheel).
The JSON card is the one copy of these facts. The weights file itself is not touched, so its sha256
in the card stays valid. Commands are recorded as typed (`weakicl ...`), never with absolute paths.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from weakicl.provenance import portable_command
from weakicl.weights import card_path, read_card

PROPAGATE, INTERACTIVE = "propagate (3 box slices)", "interactive (propagate, 3 box slices, 5 clicks)"
CC_BY_SA = "https://creativecommons.org/licenses/by-sa/4.0/legalcode"


def overall_rows(results: dict) -> list[dict]:
    """One row per (setting, group, method) over all structures; not-applicable rows left out."""
    rows = []
    for row in results["summary"]:
        if row["structure"] != "all" or not row["dice"] or row["dice"].get("mean") is None:
            continue
        rows.append({
            "setting": row["setting"], "group": row["group"], "method": row["method"], "n": row["dice"]["n"],
            "dice": round(row["dice"]["mean"], 3), "dice_ci95": [round(v, 3) for v in row["dice"]["ci95"]],
            "hd95_mm": None if row["hd95_mm"]["mean"] is None else round(row["hd95_mm"]["mean"], 2),
            "nsd_2mm": round(row["nsd"]["mean"], 3),
            "click_auc": None if not row.get("click_auc") else round(row["click_auc"]["mean"], 3),
            "command": portable(results["command"]),
        })
    return rows


def portable(command: str) -> str:
    """A recorded command with the program by name and no absolute paths (older results hold them)."""
    return portable_command(shlex.split(command))


def _dice(rows: list[dict], setting: str, group: str, method: str) -> float | None:
    return next((row["dice"] for row in rows if (row["setting"], row["group"], row["method"]) == (setting, group, method)), None)


def limitations(rows: list[dict]) -> list[str]:
    """Intended use and the limitations the evaluation shows, with its numbers (none when rows lack them)."""
    lines = [
        "## Intended use and limitations",
        "",
        "- **Research use only. Not a medical device**: not cleared or approved for diagnosis, treatment or any "
        "clinical decision; a qualified person must review every mask before it is used for anything.",
        "- Intended use: semi-automatic 3D segmentation of CT and MR structures for research (annotation, "
        "volumetry, dataset building) from a few slice boxes or points, or from labelled reference cases.",
        "- Trained mostly on MR hippocampus (Medical Segmentation Decathlon) and synthetic shapes, with a few "
        "brain and CT label maps (see Data): \"universal\" is the aim of the method, not a property of these weights.",
    ]
    model, growcut = _dice(rows, PROPAGATE, "unseen", "model"), _dice(rows, PROPAGATE, "unseen", "growcut")
    unseen = _count(rows, PROPAGATE, "unseen")
    if model is not None and growcut is not None:
        verdict = ("it loses to GrowCut" if model < growcut else "the engine built on it is ahead of GrowCut")
        advice = " For such structures, Slicer's Grow from seeds is the better tool for now." if model < growcut else ""
        lines.append(f"- On anatomy it never saw in training ({unseen} CT, MR and brain structures, each measured once) "
                     f"{verdict}: Dice {model:.3f} against {growcut:.3f} from the same 3 slice boxes.{advice}")
    gains = [(group, _dice(rows, PROPAGATE, group, "model"), _dice(rows, INTERACTIVE, group, "model"))
             for group in ("validation", "unseen")]
    gains = [(group, before, after) for group, before, after in gains if before is not None and after is not None]
    if gains:
        small = min(after - before for _, before, after in gains) < 0.03
        lines.append(f"- Corrective clicks {'help little' if small else 'help'}: 5 simulated clicks (each seeded on its side) "
                     "move the mean Dice from " + " and from ".join(f"{before:.3f} to {after:.3f} ({group})"
                                                                    for group, before, after in gains) + ".")
    alone = _dice(rows, INTERACTIVE, "unseen", "model-network-only")
    lines.append("- These are the engine's numbers: with target prompts, the network's logits are joined by a test-time "
                 "appearance probe and a geodesic seed competition from the same prompts (GrowCut's idea, "
                 "`weakicl.geodesic`), and on CT densities the box centres never show (fat, bone) are left out "
                 "(`adaptation.outside_support`)" + (f"; the network alone reaches {alone:.3f} on unseen structures after 5 clicks "
                                         "(`model-network-only`)." if alone is not None else "."))
    lines += [
        "- Segmenting other subjects from references relies on registering them onto the target (on by default); "
        "its boundaries are less exact than within-volume propagation (see HD95 below). Without registration "
        "(`--no-align`) the task tokens, tuned on the references to find the structure alone, must find it "
        "(`model-unaligned` below); across modalities they find nothing.",
        "- A slice box around a ring (a myocardium around its blood pool) is taken for what the ring encloses: the engine "
        "segments the pool, below the boxes themselves. A positive click on the wall and a negative one in the pool "
        "then mean those compartments (0.03 -> 0.94 after 5 clicks on `scripts/ring_phantom.py`), but propagation "
        "from boxes alone does not find a ring. "
        "Where a box lies on every slice of a small structure on 9-10 mm slices, the result is no better than the "
        "boxes (reports/engine-0.11-thick10).",
        f"- Evaluated on one public collection with a fixed split and {unseen or 'no'} unseen structures: no pathology, "
        "children, other scanners or sites were tested. Expect lower quality on data unlike the training data.",
        "",
    ]
    return lines


def _count(rows: list[dict], setting: str, group: str) -> int | None:
    return next((row["n"] for row in rows if (row["setting"], row["group"]) == (setting, group)), None)


def licence_markdown(card: dict) -> str:
    """The weights' licence file: what applies to them and whom to credit."""
    lines = [
        f"# Licence of the weights `{card.get('file', 'weakicl.safetensors')}`",
        "",
        "The code of weakicl is Apache-2.0 (LICENSE at the top of the source tree). These weights are a "
        "separate work, trained on the data below.",
        "",
        "## Attribution of the training data",
        "",
    ]
    for source in card.get("data", []):
        credit = f" {source['attribution']}" if source.get("attribution") else ""
        lines.append(f"- {source['name']}: {source['licence']}.{credit}")
    lines += ["", card.get("licence_note", ""), "",
              f"CC-BY-SA 4.0 legal code: {CC_BY_SA}. Changes: the data were resampled, normalised and cropped, "
              "then used to train these weights; no image or label is contained in them."]
    return "\n".join(lines) + "\n"


def markdown(card: dict, rows: list[dict]) -> str:
    training = card.get("training", {})
    lines = [
        f"# Model card: {card.get('name', 'weakicl')}",
        "",
        f"- file: `{card.get('file', 'weakicl.safetensors')}` (safetensors), sha256 `{card['sha256']}`",
        f"- architecture: WeakICLNet, channels {card['architecture']['channels']}, {card['parameters'] / 1e6:.2f} M parameters, "
        f"training patch {card['architecture']['patch_size']}, isotropic working grid of at least {card['architecture']['working_spacing_mm']} mm",
        f"- training: {training.get('steps')} steps ({training.get('episodes')} episodes), "
        f"{(training.get('wall_time_s') or 0) / 60:.0f} min wall time on {training.get('hardware', 'unknown hardware')}",
        f"- {card.get('weights', '')}; continue training with `--resume model_weights/checkpoint` (docs/TRAINING.md)",
        "- licence: CC-BY-SA 4.0 for the weights (LICENSE.md beside them, with the attributions); the code is Apache-2.0",
        "",
    ] + limitations(rows) + [
        "## Evaluation (mean over structures, 95 % bootstrap interval)",
        "",
        "| setting | group | method | n | Dice [95% CI] | HD95 mm | NSD 2 mm | click AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        auc = "" if row["click_auc"] is None else f"{row['click_auc']:.3f}"
        hd95 = "" if row["hd95_mm"] is None else f"{row['hd95_mm']:.2f}"
        lines.append(f"| {row['setting']} | {row['group']} | {row['method']} | {row['n']} | {row['dice']:.3f} "
                     f"[{row['dice_ci95'][0]:.3f}, {row['dice_ci95'][1]:.3f}] | {hd95} | {row['nsd_2mm']:.3f} | {auc} |")
    lines += ["", "Commands that produced these numbers:", ""]
    lines += [f"    {command}" for command in dict.fromkeys(row["command"] for row in rows)]
    lines += ["", "## Data and licences", ""]
    for source in card.get("data", []):
        lines.append("- " + "; ".join(f"{key}: {value}" for key, value in source.items()))
    if card.get("licence_note"):
        lines += ["", card["licence_note"] + " See LICENSE.md."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("results", nargs="+")
    args = parser.parse_args()
    card = read_card(args.weights)
    rows = [row for path in args.results for row in overall_rows(json.loads(Path(path).read_text()))]
    card["evaluation"] = rows
    card["file"] = Path(args.weights).name
    card_path(args.weights).write_text(json.dumps(card, indent=2) + "\n")
    folder = Path(args.weights).parent
    (folder / "README.md").write_text(markdown(card, rows))
    (folder / "LICENSE.md").write_text(licence_markdown(card))
    print(f"updated {card_path(args.weights)}, {folder / 'README.md'} and {folder / 'LICENSE.md'} with {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
