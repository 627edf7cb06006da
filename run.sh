#!/usr/bin/env bash
# NeuroAtrophy: set everything up and run the demo or the tests.
#
#   bash run.sh demo [OUT]   # virtual environment + package, then the demo (default OUT: demo-output)
#   bash run.sh test         # virtual environment + package + test tools, then the test suite
#
# Python 3.10-3.12 is needed (PYTHON=python3.12 bash run.sh test to choose one).
set -euo pipefail
cd "$(dirname "$0")"

command="${1:-}"
case "$command" in
  demo|test) ;;
  *) echo "usage: bash run.sh demo [OUT] | bash run.sh test" >&2; exit 64 ;;
esac

PYTHON="${PYTHON:-python3}"
VENV="${NEUROATROPHY_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Debian's mricron-data holds the real Colin27 T1 with AAL labels on the same grid (the thalamus
# demo and tests use them).
if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  echo "==> installing the Debian package mricron-data (Colin27 T1 + AAL labels)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q mricron-data >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q mricron-data >/dev/null; }
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get install -y -q mricron-data >/dev/null || { sudo apt-get update -q >/dev/null && sudo apt-get install -y -q mricron-data >/dev/null; }
  else
    echo "run.sh: the Debian package mricron-data is needed (/usr/share/mricron/templates/ch2.nii.gz); install it with apt-get install mricron-data" >&2
    exit 1
  fi
fi
echo "==> installing neuroatrophy and its dependencies"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# slicer-core gives the real MRML scene without Qt: the demo writes a Slicer scene with it.
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
# leaspy 2.1 (disease-course model; it imports lifelines) and deepbet 1.0 (skull stripping, weights in the
# wheel) pin old torch/numpy/pandas or a GUI toolkit they do not need here: install them without their pins (their real
# runtime dependencies are in pyproject.toml).
"$VENV/bin/python" -m pip install --quiet --no-deps "leaspy==2.1.0" "lifelines==0.30.3" "deepbet==1.0.2"

if [ "$command" = demo ]; then
  out="${2:-demo-output}"
  exec "$VENV/bin/neuroatrophy" demo --out "$out"
else
  exec "$VENV/bin/python" -m pytest Testing -q
fi
