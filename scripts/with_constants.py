"""Run the `weakicl` command line with some of the engine's module constants set, for ablations that
the options do not reach (e.g. the engine before a change, with its switch off):

    python scripts/with_constants.py POINT_BOX_ROUNDS=0 DRAWN_BOXES_IN_CORRECTIONS=False -- \\
        evaluate --manifest ../shared/data/manifest.json --split validation --unseen --protocol propagate interactive \\
        --prompt-kind points --method model --device cpu --out reports/engine-0.9-points-off

NAME=VALUE sets `weakicl.session.NAME` to the Python literal VALUE; what follows `--` goes to `weakicl`.
"""

from __future__ import annotations

import ast
import sys

from weakicl import session
from weakicl.cli import main

if __name__ == "__main__":
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    for item in sys.argv[1:split]:
        name, _, value = item.partition("=")
        if not hasattr(session, name):
            raise SystemExit(f"weakicl.session has no constant {name}")
        setattr(session, name, ast.literal_eval(value))
    raise SystemExit(main(sys.argv[split + 1:]))
