#!/usr/bin/env bash
# One short command for a CUDA machine (also runs on a CPU-only one, printing CPU figures):
#   scripts/gpu_check.sh            the kernels_gpu and decode-step tests (CUDA tests included when
#                                   CUDA is present), kernel timings at Kimi K2 shapes, then the engine
#                                   bench on k2-slice with the decode step as one CUDA graph per token,
#                                   a graph per segment, and no graphs: JSON on stdout.
# Extra arguments go to the timing script (python -m hybrid.bench.gpu_kernels --help), e.g. --cpu-tps 800.
# Budget: about 5 minutes on a GPU machine (k2-slice, ~5 GB, is generated on first use in ~1 minute).
# Exit status: non-zero when any step fails. On the lent H200 (no .venv, no network; its python3 has
# torch, numba, tiktoken, jinja2, click, rich, psutil, safetensors, pytest and hypothesis, and nothing
# here imports fastapi): `PYTHON=python3 PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh`.
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

echo "== tests: kernels_gpu and the decode step (CUDA tests included when CUDA is present)" >&2
"$PY" -m pytest tests/test_kernels_gpu.py tests/test_int4_gpu.py tests/test_decode_step.py -q -rs >&2

echo "== kernel timings (JSON on stdout)" >&2
"$PY" -m hybrid.bench.gpu_kernels "$@"

# ==== engine: decode tok/s, GPU-side and CPU-expert ms per MoE layer, overlap efficiency, with the
# decode step as one CUDA graph per token (on), a graph per segment (segments) and without graphs
# (off); settings.decode_graphs says which ran; one JSON line each.
# --hot-experts 0: a big GPU holds all of k2-slice's experts, and the point is the CPU-expert hybrid.
for graphs in on segments off; do
  echo "== engine: kimi-hybrid bench --json on k2-slice, --decode-graphs $graphs (k2-slice is generated on first use, ~5 GB)" >&2
  "$PY" -m hybrid.cli bench --json --runs 2 --prompt-tokens 64 --gen-tokens 16 --decode-graphs "$graphs" --hot-experts 0
done
echo "== engine: the same with the plan's hot experts on the GPU (all of them, on a big GPU)" >&2
"$PY" -m hybrid.cli bench --json --runs 2 --prompt-tokens 64 --gen-tokens 16 --decode-graphs on
echo "== engine: int8 GPU-side weights (the Triton GEMV in each decode step), one CUDA graph per token" >&2
"$PY" -m hybrid.cli bench --json --runs 2 --prompt-tokens 64 --gen-tokens 16 --decode-graphs on --hot-experts 0 \
  --gpu-precision int8
echo "== engine: scheduler and expert-cache figures (MoE block vs kernel, cache overlap)" >&2
"$PY" scripts/bench_engine.py --tokens 16
