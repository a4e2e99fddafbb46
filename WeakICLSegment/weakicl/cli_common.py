"""Helpers shared by the subcommands (`segment`, `demo`, `evaluate`, `train`, `batch`), so that none of
them imports another's module or `cli.py`."""

from __future__ import annotations

import argparse
import sys

from .devices import DEVICE_CHOICES, DEVICE_HELP


def progress_bar(description: str):
    """A progress callback drawing one tqdm line per phase on stderr ("encoding context", "segmenting
    window", ...), each from 0 to 100 %, rather than one bar that reaches 100 % and starts again.
    Silent under -q (the "weakicl" logger above INFO) and when stderr is not a terminal."""
    import re

    from tqdm import tqdm

    quiet = progress_hidden()
    current = {"phase": None, "bar": None}

    def update(fraction: float, message: str) -> None:
        phase = re.sub(r"\s*\d+/\d+", "", message).strip()  # "encoding context 2/3" -> "encoding context"
        # a phase's closing message ("context encoded" at 100 %) finishes its line instead of opening one
        if current["bar"] is None or (phase != current["phase"] and fraction < 1.0):
            if current["bar"] is not None:
                current["bar"].close()
            current["phase"] = phase
            current["bar"] = tqdm(total=100, desc=f"{description}: {phase}", unit="%", leave=True,
                                  disable=True if quiet else None, file=sys.stderr)
        bar = current["bar"]
        bar.set_postfix_str(message, refresh=False)
        bar.n = int(round(100 * fraction))
        bar.refresh()

    return update


def progress_hidden() -> bool:
    """True under -q: the "weakicl" logger is set above INFO, and progress bars stay silent with it."""
    import logging

    return not logging.getLogger("weakicl").isEnabledFor(logging.INFO)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="weights .safetensors with its .json card (default: shipped weights)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
