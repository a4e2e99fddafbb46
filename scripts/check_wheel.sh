#!/usr/bin/env bash
# Build the wheel, install it in a fresh virtual environment and run `weakicl demo` there, away from the
# checkout: proves that the wheel alone carries the code, the weights, their card and their licence.
#
#   scripts/check_wheel.sh [PYTHON]        (TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build)
#
# Output recorded in docs/PACKAGING.md. Paths are printed relative to the temporary folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"  # nothing below may come from the checkout
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither" >&2); }  # local index mirrors warn per missing package

quiet_pip "$python" -m pip wheel --no-deps -q -w dist "$root"
wheel="$(ls dist/weakicl-*.whl)"
echo "built $wheel ($(du -k "$wheel" | cut -f1) kB); data files inside:"
"$python" -m zipfile -l "$wheel" | awk '$1 ~ /_weights|py.typed|licenses/ {print "  " $1}'

"$python" -m venv venv  # a plain venv: no system site-packages, so no editable checkout either
quiet_pip venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
quiet_pip venv/bin/python -m pip install -q "$wheel"
venv/bin/python - <<'PY'
import sys
from pathlib import Path

import weakicl
from weakicl.weights import default_weights_path, load_weights

package = Path(weakicl.__file__).resolve().parent
weights = default_weights_path()
assert weights.parent == package / "_weights", f"weights not from the wheel: {weights}"
model, card = load_weights()  # checks the sha256 against the card
print(f"python {sys.version.split()[0]}; weakicl {weakicl.__version__} from {package.parent.name}/{package.name}")
print(f"weights: {weights.relative_to(package.parent)} (sha256 {card['sha256'][:12]}..., checked)")
for name in ("LICENSE.md", "README.md", weights.with_suffix('.json').name):
    assert (weights.parent / name).is_file(), name
print("licence and model card beside them: LICENSE.md, README.md, " + weights.with_suffix('.json').name)
PY
venv/bin/weakicl demo --out demo --device cpu
venv/bin/weakicl --version
