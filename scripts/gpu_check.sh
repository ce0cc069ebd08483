#!/usr/bin/env bash
# One short command for a CUDA machine (also runs on a CPU-only one, printing CPU figures):
#   scripts/gpu_check.sh            the kernels_gpu tests (CUDA tests included when CUDA is present),
#                                   then kernel timings at Kimi K2 shapes as JSON on stdout.
# Extra arguments go to the timing script (python -m kernels_gpu.bench --help), e.g. --cpu-tps 800.
# Budget: about 2 minutes on a GPU machine. Exit status: non-zero when any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

echo "== device" >&2
"$PY" - >&2 <<'PYEOF'
import torch
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), f"{torch.cuda.mem_get_info()[1] / 1e9:.0f} GB")
else:
    print("no CUDA: CPU figures only; CUDA tests will be skipped")
PYEOF

echo "== tests: tests/test_kernels_gpu.py" >&2
"$PY" -m pytest tests/test_kernels_gpu.py -q -rs >&2

echo "== kernel timings (JSON on stdout)" >&2
"$PY" -m kernels_gpu.bench "$@"

# ==== ENGINE BENCH: append below this line ========================================================
# (kept for the engine's `bench --json` on a k2-slice checkpoint: decode tok/s, GPU-side and CPU-expert
#  ms per layer, overlap efficiency, CUDA graph on/off; print it as a second JSON object on stdout)
echo "== engine: kimi-hybrid bench --json on k2-slice (generated on first use, ~5 GB)" >&2
"$PY" -m hybrid.cli bench --json --runs 2 --prompt-tokens 64 --gen-tokens 16
echo "== engine: scheduler and expert-cache figures (MoE block vs kernel, cache overlap)" >&2
"$PY" scripts/bench_engine.py --tokens 16
# CUDA graph capture of the decode step is not wired into the engine yet (kernels_gpu.graphs has the
# helper); when it is, run the bench twice here, with and without it.
