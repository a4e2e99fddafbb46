"""Evaluation harness: protocols, baselines, metrics and reports behind `weakicl evaluate`.

Layers, bottom up: `metrics` (Dice, HD95, surface Dice, bootstrap), `manifest` (which structures),
`protocols` (prompts, contexts, click loop, one record per method and structure), `baselines`
(model-free methods), `methods` (the network and the baselines by name), `report` and `figures`
(results.json, report.md, PNGs), `runner` (the command). Only names live here, so building the
`weakicl` parser stays cheap.
"""

PROTOCOLS = ("propagate", "cross-weak", "cross-dense", "interactive")
METHOD_NAMES = ("model", "box-interp", "growcut", "threshold", "atlas", "model-unaligned")
DEFAULT_METHODS = METHOD_NAMES[:5]  # model-unaligned (task tokens alone) is an ablation, asked for by name
PROMPT_KINDS = ("boxes", "points")
