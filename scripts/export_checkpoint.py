"""A training checkpoint's EMA weights as weights and model card, to judge a run at a checkpointed step (a
run writes its own weights only at its end):

    python scripts/export_checkpoint.py .cache/runs/v02g --out .cache/runs/v02g-step/weakicl.safetensors
    weakicl evaluate ... --weights .cache/runs/v02g-step/weakicl.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakicl.errors import WeakICLError
from weakicl.training.loop import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run's output folder holding checkpoint/")
    parser.add_argument("--out", type=Path, required=True, help="the weights file to write (.safetensors; its card beside it)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error("--out must end in .safetensors")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(export_checkpoint(args.checkpoint, args.out))
    except WeakICLError as error:
        print(f"export_checkpoint: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
