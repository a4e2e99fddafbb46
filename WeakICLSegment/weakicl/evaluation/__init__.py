"""Evaluation harness: protocols, baselines, metrics and reports behind `weakicl evaluate`.

Layers, bottom up: `metrics` (Dice, HD95, surface Dice, bootstrap), `manifest` (which structures),
`protocols` (prompts, contexts, click loop, one record per method and structure), `baselines`
(model-free methods), `methods` (the network and the baselines by name), `report` and `figures`
(results.json, report.md, PNGs), `runner` (the command). Only names live here, so building the
`weakicl` parser stays cheap.
"""

PROTOCOLS = ("propagate", "cross-weak", "cross-dense", "interactive")
METHOD_NAMES = ("model", "box-interp", "growcut", "threshold", "atlas", "model-unaligned", "model-network-only")
# ablations asked for by name: model-unaligned (task tokens alone), model-network-only (clicks not seeded)
DEFAULT_METHODS = METHOD_NAMES[:5]
PROMPT_KINDS = ("boxes", "points", "box3d")
SLICE_AXES = ("k", "j", "i")  # IJK axis the annotated slices cut across; in array (KJI) order, so its index is the array axis
