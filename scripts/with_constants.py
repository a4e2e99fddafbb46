"""Run the `weakicl` command line with some of the engine's module constants set, for ablations that
the options do not reach (e.g. the engine before a change, with its switch off):

    python scripts/with_constants.py POINT_BOX_ROUNDS=0 DRAWN_BOXES_IN_CORRECTIONS=False -- \\
        evaluate --manifest ../shared/data/manifest.json --split validation --unseen --protocol propagate interactive \\
        --prompt-kind points --method model --device cpu --out reports/engine-0.9-points-off
    python scripts/with_constants.py context_tuning.SEARCH_TUNING_STEPS=0 -- evaluate ...

[MODULE.]NAME=VALUE sets `weakicl.MODULE.NAME` (MODULE `session` when not given) to the Python literal
VALUE; what follows `--` goes to `weakicl`. A constant another module imported by name is that module's
to set (`session.SEARCH_TUNING_MAX_SIDE`, not `context_tuning.SEARCH_TUNING_MAX_SIDE`).
"""

from __future__ import annotations

import ast
import importlib
import sys

from weakicl.cli import main

if __name__ == "__main__":
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    for item in sys.argv[1:split]:
        name, _, value = item.partition("=")
        module_name, _, constant = name.rpartition(".")
        try:
            module = importlib.import_module(f"weakicl.{module_name or 'session'}")
        except ImportError:
            raise SystemExit(f"weakicl has no module {module_name}") from None
        if not hasattr(module, constant):
            raise SystemExit(f"{module.__name__} has no constant {constant}")
        setattr(module, constant, ast.literal_eval(value))
    raise SystemExit(main(sys.argv[split + 1:]))
