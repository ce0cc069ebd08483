"""Int8 weight-only linear layers for the GPU side when the planner picks gpu_precision 'int8'.

Owns symmetric per-output-row quantisation (int8 codes, one bf16 scale per row, as placement.py
sizes it) and the matmul over it. Activations stay in the compute dtype; nothing is quantised at
run time. Pure functions on tensors; imports nothing from hybrid/.
Letters: O out features, I in features.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

log = logging.getLogger(__name__)
_FUSED_WORKS: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> aten op usable, learned once
_TRITON_WORKS: dict[torch.device, bool] = {}  # device -> the Triton GEMV ran there (False after it failed)
BLOCK_ROWS = 8192  # output rows the plain path dequantises at a time (K2's lm_head: 117 MB, not 2.3 GB, of bf16)


def _ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """Positive finite fp32 -> the smallest bf16 >= x (so that |w| / scale <= 127 holds after rounding)."""
    bits = x.float().contiguous().view(torch.int32)
    up = (bits + 0xFFFF) & ~0xFFFF  # drop the low 16 bits, rounding the magnitude up
    return up.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] (bf16/fp16/fp32) -> (qweight int8 [O, I], scale bf16 [O]); w ~ qweight * scale[:, None].

    scale = absmax(row) / 127 rounded up to bf16, codes = round(w / scale) in [-127, 127], so each
    weight is off by at most scale / 2 (an all-zero row gets scale 1 and codes 0).
    """
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = _ceil_bf16(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)))
    q = torch.round(w32 / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


KERNELS = ("aten", "triton", "plain")


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
                kernel: str | None = None, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """x [..., I] -> x @ (qweight * scale[:, None]).T [..., O], in x's dtype on x's device.

    kernel: None picks, per call: on a CPU 'aten' where it runs for this dtype (tried once, then
    remembered), on CUDA 'triton' for one row (a decode step) when Triton imports, else 'plain'.
    - 'aten': aten._weight_int8pack_mm, which reads the codes without a dequantised copy. Not on
      CUDA by default: its CUDA build walks I serially per output and has returned fp32 for bf16.
    - 'triton': kernels_gpu.int8_triton.int8_gemv, the decode GEMV: 1 byte per weight read, up to
      int8_triton.MAX_TOKENS rows (Triton's interpreter on a CPU tensor, for tests). Its one-row
      form keeps the products in registers across the reduction; with more rows it reduces every
      step, so only one row is picked by default until a GPU run says otherwise.
    - 'plain': dequantise block_rows output rows at a time to x's dtype and matmul, then apply the
      per-row scale to the output ((x @ q.T) * s is the same product; |q| <= 127 converts to bf16
      exactly). About 5 bytes of traffic per weight, but any number of rows, and the temporary
      copy stays bounded whatever the layer's size.
    """
    if kernel not in (None, *KERNELS):
        raise ValueError(f"int8_linear: kernel must be one of {', '.join(KERNELS)} or None, got {kernel!r}")
    rows = math.prod(x.shape[:-1])
    auto = kernel is None
    if auto:
        kernel = pick_kernel(x.device.type, x.dtype, rows)
        if kernel == "triton" and not _TRITON_WORKS.get(x.device, True):
            kernel = "plain"
    if kernel == "triton":
        from kernels_gpu.int8_triton import int8_gemv  # ImportError without Triton: only an explicit ask gets here then
        try:
            return int8_gemv(x.reshape(rows, x.shape[-1]), qweight, scale).view(*x.shape[:-1], qweight.shape[0])
        except torch.cuda.OutOfMemoryError:
            raise  # passing, and the dequantising path needs more memory, not less
        except Exception as e:  # a GPU or toolchain Triton cannot target: compile or launch errors of every kind
            if not auto:
                raise
            _TRITON_WORKS[x.device] = False
            log.warning("the Triton int8 GEMV failed on %s (%s: %s); int8 linears dequantise from now on",
                        x.device, type(e).__name__, e)
            kernel = "plain"
    if kernel == "aten":
        key = (x.device.type, x.dtype)
        try:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), qweight, scale.to(x.dtype))
            _FUSED_WORKS[key] = True
            return y.view(*x.shape[:-1], qweight.shape[0]).to(x.dtype)
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            if not auto:
                raise
            _FUSED_WORKS[key] = False
            log.info("aten._weight_int8pack_mm unavailable for %s %s (%s); dequantising instead", *key, e)
    O = qweight.shape[0]
    if O <= block_rows:
        return (x @ qweight.to(x.dtype).T) * scale.to(x.dtype)
    y = torch.empty(*x.shape[:-1], O, dtype=x.dtype, device=x.device)
    for o in range(0, O, block_rows):
        y[..., o:o + block_rows] = x @ qweight[o:o + block_rows].to(x.dtype).T
    return y.mul_(scale.to(x.dtype))


def pick_kernel(device_type: str, dtype: torch.dtype, rows: int) -> str:
    """int8_linear's choice when it is given none (see there)."""
    if device_type == "cpu":
        return "aten" if _FUSED_WORKS.get((device_type, dtype), True) else "plain"
    if device_type == "cuda" and rows == 1 and _triton_imports():  # a decode step, batch 1
        return "triton"
    return "plain"


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    """Whether int8_triton imports (asked once: a failed import is not retried per call)."""
    try:
        from kernels_gpu import int8_triton  # noqa: F401
    except ImportError:
        log.info("Triton does not import: int8 linears dequantise on the GPU (about 5 bytes read per weight, not 1)")
        return False
    return True
