#!/usr/bin/env bash
# Set up mmjax in .venv at the repository root and run it on this machine.
#
#   bash launch/local.sh            set up, train configs/coca.py:size=tiny on the built-in
#                                   dataset into runs/coca_tiny, evaluate it, plot its
#                                   curves, print where the results are (extra args go to
#                                   mmjax.train)
#   bash launch/local.sh test       set up, run the test suite (extra args go to pytest)
#   bash launch/local.sh setup      set up only
#
# Environment: PYTHON (interpreter for the venv, default python3, needs >= 3.11),
# WORKDIR (training directory, default runs/coca_tiny).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode=train  # Also when the first argument is a flag for mmjax.train.
case "${1:-}" in
  test|setup|train) mode="$1"; shift ;;
esac

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: mmjax needs Python >= 3.11; $python is $("$python" --version 2>&1 || echo missing)." \
       "Set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
# Reinstall only when the package metadata changed (the stamp holds its hash).
stamp="$venv/.mmjax-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing mmjax and its dependencies into $venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
py="$venv/bin/python"
# The openclip extra (torch, open_clip) for mmjax.interop.open_clip's tests: open_clip_torch,
# torchvision and clip-benchmark without their dependencies, which would pull a multi-GB CUDA
# torch; and the tpu extra (libtpu) for the TPU topology compile tests.
openclip_pins="open_clip_torch==3.3.0 torchvision==0.28.0 transformers==4.46.3 clip-benchmark==1.6.2"
openclip_stamp="$venv/.mmjax-openclip"
openclip_want="$(printf '%s %s' "$want" "$openclip_pins" | sha256sum | cut -d' ' -f1)"
if [ "$mode" = test ] && { [ ! -f "$openclip_stamp" ] || [ "$(cat "$openclip_stamp")" != "$openclip_want" ]; }; then
  echo "[setup] installing the openclip extra (CPU torch, open_clip) into $venv"
  "$py" -m pip install --quiet -e ".[test,openclip,tpu]"
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet --no-deps $openclip_pins
  echo "$openclip_want" > "$openclip_stamp"
fi

case "$mode" in
  setup)
    "$py" -c 'import jax, mmjax; print(f"[setup] ready: jax {jax.__version__} on {jax.devices()}")'
    ;;
  test)
    # Two workers: XLA compilation is mostly single-threaded, so they overlap well.
    exec "$py" -m pytest -n 2 --dist loadfile --durations=15 "$@"
    ;;
  train)
    workdir="${WORKDIR:-runs/coca_tiny}"
    "$py" -m mmjax train --config configs/coca.py:size=tiny --workdir "$workdir" "$@"
    "$py" -m mmjax evaluate --workdir "$workdir"
    "$py" -m mmjax plot --workdir "$workdir"
    echo
    echo "Results:"
    echo "  metrics (one JSON per line): $workdir/metrics.jsonl"
    echo "  evaluation:                  $workdir/eval.json"
    echo "  training curves (PNG):       $workdir/curves.png"
    echo "  checkpoints (orbax):         $workdir/checkpoints/"
    echo "  TensorBoard:                 tensorboard --logdir $workdir/tensorboard"
    ;;
  *)
    echo "error: unknown mode '$mode'; allowed: (none)/train, test, setup" >&2
    exit 2
    ;;
esac
