"""Average the weights of networks fine-tuned from one checkpoint (a "model soup"): one network, no
extra inference time, often better than each of its sources when they share a starting point.

    python scripts/average_weights.py model_weights/weakicl-0.1.safetensors RUN_A/weakicl.safetensors \\
        RUN_B/weakicl.safetensors --out .cache/soup/weakicl-soup.safetensors

Every source must have the same architecture in its card (checked); the card written beside the output
is the first source's, with `averaged_from` naming each source by file name and sha256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakicl.errors import WeightsError
from weakicl.weights import load_weights, save_weights, sha256_of


def average(paths: list[Path], out: Path) -> Path:
    models, cards = zip(*(load_weights(path) for path in paths))
    if any(card["architecture"] != cards[0]["architecture"] for card in cards):
        raise WeightsError("the weights to average have different architectures in their cards")
    states = [model.state_dict() for model in models]
    averaged = {name: (sum(state[name] for state in states) / len(states)).to(tensor.dtype)
                if tensor.is_floating_point() else tensor for name, tensor in states[0].items()}
    models[0].load_state_dict(averaged)
    card = {key: value for key, value in cards[0].items() if key not in ("architecture", "parameters", "sha256")}
    card["averaged_from"] = [{"file": path.name, "sha256": sha256_of(path)} for path in paths]
    return save_weights(models[0], out, card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", type=Path, help="two or more .safetensors files with their cards")
    parser.add_argument("--out", type=Path, required=True, help="the averaged weights (.safetensors); the card goes beside it")
    args = parser.parse_args(argv)
    if len(args.weights) < 2:
        parser.error("give at least two weights files to average")
    if args.out.suffix != ".safetensors":
        parser.error("--out must end in .safetensors")
    try:
        print(average(args.weights, args.out))
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
