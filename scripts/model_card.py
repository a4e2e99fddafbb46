"""Write the shipped model card from the training card and evaluation results.

    python scripts/model_card.py model_weights/weakicl-0.1.safetensors reports/v0.1/results.json reports/v0.1-unaligned/results.json

Adds an `evaluation` section (mean over structures per setting, group and method, with the command
that produced it) to the JSON card beside the weights, and renders `model_weights/README.md`.
The weights file itself is not touched, so its sha256 in the card stays valid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weakicl.weights import card_path, read_card


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
            "command": results["command"],
        })
    return rows


def markdown(card: dict, rows: list[dict]) -> str:
    training = card.get("training", {})
    lines = [
        f"# Model card: {card.get('name', 'weakicl')}",
        "",
        f"- file: `{card.get('file', 'weakicl.safetensors')}` (safetensors), sha256 `{card['sha256']}`",
        f"- architecture: WeakICLNet, channels {card['architecture']['channels']}, {card['parameters'] / 1e6:.2f} M parameters, "
        f"training patch {card['architecture']['patch_size']}, working spacing >= {card['architecture']['working_spacing_mm']} mm",
        f"- training: {training.get('steps')} steps ({training.get('episodes')} episodes), "
        f"{(training.get('wall_time_s') or 0) / 60:.0f} min wall time on {training.get('hardware', 'unknown hardware')}",
        f"- {card.get('weights', '')}; continue training with `--resume model_weights/checkpoint` (docs/TRAINING.md)",
        "",
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
        lines += ["", card["licence_note"]]
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
    (Path(args.weights).parent / "README.md").write_text(markdown(card, rows))
    print(f"updated {card_path(args.weights)} and {Path(args.weights).parent / 'README.md'} with {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
