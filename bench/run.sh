#!/usr/bin/env bash
# The README's main command: set up (venv, install, build), show the walkthrough's comparison,
# then run the benchmark suite on the GPU if torch sees one, else on the CPU.
#   bash bench/run.sh                 # default grid of this device
#   bash bench/run.sh --quick         # any bench/bench.py arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
# shellcheck disable=SC1091
. .venv/bin/activate
echo
echo "== walkthrough: torch.nn.RNN vs rnn_ext.RNN vs the manual loop (same weights) =="
python bench/walkthrough.py
echo
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  device=cuda
else
  device=cpu
fi
# --device given by the caller wins (argparse keeps the last one).
echo "== benchmark suite on $device =="
exec python bench/bench.py --device "$device" "$@"
