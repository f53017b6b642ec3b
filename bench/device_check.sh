#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H200): the gpu test tier, then decode/prefill figures
# of moeserve (CUDA graphs and --enforce-eager) and transformers on the full DeepSeek-V2-Lite shape.
# Prints a summary and writes $OUT/device_check.json (plus logs); finishes inside 8 minutes.
#
#   bash bench/device_check.sh                  # on the GPU machine
#   bash bench/device_check.sh --cpu-rehearsal  # the same steps on the CPU, tiny preset
#
# Needs only Python 3.10+ with torch, triton and transformers installed; pytest comes from
# bench/wheels when missing, and moeserve is imported from this checkout (no pip install).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/device_check.py "$@"
