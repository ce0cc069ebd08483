"""How the GPU side applies a weight to activations: one call for every storage it may have.

Owns linear (dense, int8 weight-only, bf16 widened under fp32 math; on a CPU the Numba GEMVs of
kernels_cpu.widen for a decode step, for a prompt blocks of rows widened to fp32 under oneDNN's fp32
GEMM, or MKL's), its fused forms linear_pair and swiglu (one Numba call each for
a decode step on the CPU) and fp32_linear (the router's fp32 product). Must not know the
model: model.py calls these with tensors, shapes [..., I] -> [..., O].
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numba import get_num_threads

from kernels_cpu import amx, amx_gemm, int8gemm
from kernels_cpu.heads import head_absorb, head_values
from kernels_cpu.int8dot import BLOCK as INT8_BLOCK
from kernels_cpu.int8dot import dequantize_rows
from kernels_cpu.int8tiles import TILE_ROWS, dequantize_tiles, int8_gemv_tiles, logical_shape, untile_into
from kernels_cpu.moe_step import swiglu_out
from kernels_cpu.widen import MAX_ROWS as MAX_WIDEN_ROWS
from kernels_cpu.widen import bf16_gemv, concurrent_parallel_ok, gemv_pair, int8_gemv, swiglu_gemv
from kernels_gpu.int8 import int8_linear
from kernels_gpu.mla import absorb_query

log = logging.getLogger(__name__)

Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # dense [O, I], or int8 weight-only (codes, row scales)


WIDEN_BLOCK_ROWS = 512  # weight rows widened to fp32 at a time for a GEMM (K2: 15 MB; 512 measured 0-20% over 256)


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [..., I] @ w.T; int8 weight-only weights go through kernels_gpu's int8 linear, bf16 weights
    under fp32 activations (the GPU side on the CPU) through widening_linear; a prompt's rows on the
    CPU in bf16 math where this thread's forward asked for it (prompt_math)."""
    if isinstance(w, tuple):
        if x.dtype == torch.float32 and x.device.type == "cpu":  # int8 asked for on a CPU ('int8w')
            if _bf16_rows(x):
                return _untiled(x, *w, _bf16_int8) if w[0].dim() == 4 else _bf16_int8(x, *w)
            return _int8_cpu(x, *w)
        return int8_linear(x, *w)
    if w.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu":
        return F.linear(x.bfloat16(), w).float() if _bf16_rows(x) else widening_linear(x, w)
    return x @ w.T


PROMPT_MATH = ("fp32", "bf16")
_math = threading.local()  # .bf16: this thread's forward computes its prompt products in bf16


@contextmanager
def prompt_math(mode: str) -> Iterator[None]:
    """Within the block, this thread's linears of more than MAX_WIDEN_ROWS rows on the CPU (a prompt)
    compute as `mode` says: 'fp32' (the weights widened) or 'bf16' (the activations rounded to bf16,
    oneDNN's bf16 product, fp32 sums rounded to bf16, then widened back). fp32_linear (the router)
    is never affected. The model's forward holds it around each pass."""
    bf16 = _is_bf16(mode)
    before = getattr(_math, "bf16", False)
    _math.bf16 = bf16
    try:
        yield
    finally:
        _math.bf16 = before


def check_prompt_math(mode: str, device: str) -> None:
    """Refuse bf16 prompt math where it does not apply: a GPU side on CUDA (bf16 there already), or a
    CPU without AVX512_BF16 or AMX, where torch emulates bf16 products slower than fp32 ones; and a
    mode that is neither 'fp32' nor 'bf16'."""
    if not _is_bf16(mode):
        return
    if device != "cpu":
        raise ValueError("cpu_prompt_math='bf16' is for a GPU side on the CPU (device='cpu'); on CUDA the GPU side "
                         "computes in bf16 already: leave it at 'fp32'")
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        raise ValueError("cpu_prompt_math='bf16' needs a CPU with AVX512_BF16 or AMX, and this one has neither "
                         "(bf16 products would be emulated, slower than fp32): leave it at 'fp32'")


def _is_bf16(mode: str) -> bool:
    if mode not in PROMPT_MATH:
        raise ValueError(f"prompt math must be one of {', '.join(PROMPT_MATH)}, got {mode!r}")
    return mode == "bf16"


def _bf16_rows(x: torch.Tensor) -> bool:
    """Whether x (fp32 on the CPU) is a prompt's rows under bf16 prompt math."""
    return getattr(_math, "bf16", False) and x.numel() // max(1, x.shape[-1]) > MAX_WIDEN_ROWS


def _bf16_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 prompt math over int8 codes [O, I] and bf16 row scales: the codes are exact in bf16, so
    each block of WIDEN_BLOCK_ROWS rows is converted, multiplied in bf16, and scaled in fp32."""
    x2 = x.reshape(-1, x.shape[-1]).bfloat16()
    O = q.shape[0]
    y = torch.empty(x2.shape[0], O)
    s32 = scale.float()
    for o in range(0, O, WIDEN_BLOCK_ROWS):
        n = min(WIDEN_BLOCK_ROWS, O - o)
        torch.mul(F.linear(x2, q[o:o + n].to(torch.bfloat16)), s32[o:o + n], out=y[:, o:o + n])
    return y.view(*x.shape[:-1], O)


UNTILE_BYTES = 32 << 20  # int8 codes untiled at a time for a prompt's product (a buffer kept per thread)


def _untiled(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor,
             product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """product(x, codes, scale) over int8 codes held as kernels_cpu.int8tiles' tiles, for the prompt paths that
    read rows only (int8gemm's integer tiles, bf16 prompt math): a block of rows at a time untiled into a
    buffer kept per thread (~5% of a k2-slice prefill where AMX took them too, before it read the tiles)."""
    x2 = x.reshape(-1, x.shape[-1])
    O, I = logical_shape(tiles)
    rows = max(TILE_ROWS, UNTILE_BYTES // I // 32 * 32)  # whole AMX tiles of rows where O allows
    buf = getattr(_widened, "codes", None)
    if buf is None or buf.numel() < min(rows, O) * I:
        with torch.inference_mode(False):
            buf = _widened.codes = torch.empty(min(rows, O) * I, dtype=torch.int8)
    y = torch.empty(x2.shape[0], O)
    for o in range(0, O, rows):
        n = min(rows, O - o)
        block = buf[:n * I].view(n, I)
        untile_into(tiles.numpy(), o, block.numpy())
        y[:, o:o + n] = product(x2, block, scale[o:o + n])
    return y.view(*x.shape[:-1], O)


def linear_pair(x: torch.Tensor, w1: Weight, w2: Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(x, w1), linear(x, w2)): for a decode step on the CPU one Numba call over both weights
    (kernels_cpu.widen.gemv_pair: one parallel region, one trip through Python), else two linears (int8
    tiles: each linear's GEMV gives the bits the fused step's pair gives)."""
    if (args := decode_weights(x, (w1, w2))) is not None and not _tiled(args):
        y1, y2 = gemv_pair(x.reshape(-1, x.shape[-1]).contiguous().numpy(), *args[0], *args[1])
        return (torch.from_numpy(y1).view(*x.shape[:-1], -1), torch.from_numpy(y2).view(*x.shape[:-1], -1))
    return linear(x, w1), linear(x, w2)


def swiglu(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
    """A SwiGLU MLP, down(SiLU(gate x) * up x): for a decode step on the CPU one Numba call
    (kernels_cpu.widen.swiglu_gemv; over int8 tiles, some or all, the fused decode step's SwiGLU and its
    bits), else three linears."""
    if (args := decode_weights(x, (gate, up, down))) is not None and swiglu_fits(args):
        xn = x.reshape(-1, x.shape[-1]).contiguous().numpy()
        y = swiglu_out(xn, tuple(a for p in args for a in p), get_num_threads()) if _tiled(args) else \
            swiglu_gemv(xn, *args[0], *args[1], *args[2])
        return torch.from_numpy(y).view(*x.shape[:-1], -1)
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def swiglu_fits(args: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether decode_weights' (gate, up, down) make one SwiGLU: gate and up [O, I], down [., O] (each as the
    products see it, rows or tiles)."""
    (O, I), up, (_, inner) = (logical_shape(a) for a, _ in args)
    return up == (O, I) and inner == O


def decode_weights(x: torch.Tensor, ws: tuple[Weight, ...]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The (weight, scales) arrays the fused Numba kernels read, when x is a decode step's fp32 rows on
    the CPU and every weight is held the same way (bf16, or int8 with bf16 row scales) and contiguous;
    else None (the caller falls back to linear)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not 1 <= x.numel() // x.shape[-1] <= MAX_WIDEN_ROWS \
            or not concurrent_parallel_ok():
        return None
    out = []
    for w in ws:
        if isinstance(w, tuple):
            q, scale = w
            if q.device.type != "cpu" or q.dtype != torch.int8 or scale.dtype != torch.bfloat16 \
                    or not (q.is_contiguous() and scale.is_contiguous()):
                return None
            out.append((q.numpy(), bf16_bits(scale)))
        elif w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.is_contiguous():
            out.append((bf16_bits(w), _NO_SCALES))
        else:
            return None
    if len({a.dtype for a, _ in out}) != 1:
        return None
    return out


_NO_SCALES = np.empty(0, np.uint16)


def _tiled(args: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether any of decode_weights' arrays holds int8 codes as tiles (4-D)."""
    return any(a.ndim == 4 for a, _ in args)


def widening_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x fp32 [..., I] @ w.T for bf16 w [O, I] on the CPU, in fp32, reading w as stored (2 bytes a weight).

    Up to kernels_cpu.widen.MAX_ROWS rows (decode): the Numba GEMV, which widens in registers. More
    rows (prefill, compute-bound): where the CPU has AMX-BF16, its tiles over the weights as stored and
    the activations split into three bf16 parts (kernels_cpu.amx_gemm); elsewhere an fp32 GEMM per
    WIDEN_BLOCK_ROWS weight rows, each block widened into a small buffer first. Every way the products
    are of the exact fp32 values of the bf16 weights, so the result equals the fp32 matmul up to
    summation order."""
    x2 = x.reshape(-1, x.shape[-1])
    if 1 <= x2.shape[0] <= MAX_WIDEN_ROWS:  # decode: the GEMV, straight
        return torch.from_numpy(bf16_gemv(x2.detach().contiguous().numpy(), bf16_bits(w))).view(*x.shape[:-1], w.shape[0])
    if x2.shape[0] > MAX_WIDEN_ROWS and _tiles_take(w):
        y = amx_gemm.gemm_bf16x3(x2.detach().contiguous().numpy(), bf16_bits(w))
        return torch.from_numpy(y).view(*x.shape[:-1], w.shape[0])
    return _cpu_product(x, w.shape[0], lambda a: bf16_gemv(a, bf16_bits(w)), lambda o, out: out.copy_(w[o:o + len(out)]))


def _tiles_take(w: torch.Tensor) -> bool:
    """Whether a prompt's product with w (bf16, or int8 codes as rows or as int8tiles' tiles) goes through AMX's
    bf16 tiles (amx_gemm): the CPU has them, the shape is whole tiles, and Numba may run this parallel region
    beside the experts' (as the decode GEMVs ask, widen.concurrent_parallel_ok)."""
    return w.is_contiguous() and amx_gemm.supported(*logical_shape(w)) and amx.available(bf16=True) \
        and concurrent_parallel_ok()


def _int8_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x fp32 [..., I] on the CPU over int8 codes [O, I] (rows, or kernels_cpu.int8tiles' tiles: 4-D) and bf16
    row scales [O]: the Numba GEMV for a decode step (1 byte read a weight); for a prompt, AMX's bf16 tiles
    where the CPU has them (the codes are exact in bf16; kernels_cpu.amx_gemm), on AVX2 without VNNI and up
    to int8gemm.MAX_ROWS rows integer tiles over the GEMV's own activation codes (kernels_cpu.int8gemm: each
    output the GEMV's, bit for bit; tiles untiled a block at a time for it), else a GEMM per block of rows
    dequantised to fp32 (aten's int8 kernel measured ~3 GB/s for one row here)."""
    x2 = x.reshape(-1, x.shape[-1])
    qn, par = q.numpy(), concurrent_parallel_ok()
    tiled = q.dim() == 4
    O, I = logical_shape(qn)
    if x2.shape[0] > MAX_WIDEN_ROWS and _tiles_take(q):
        y = amx_gemm.gemm_bf16x3(x2.detach().contiguous().numpy(), qn, scale.float().numpy())
        return torch.from_numpy(y).view(*x.shape[:-1], O)
    if MAX_WIDEN_ROWS < x2.shape[0] <= int8gemm.MAX_ROWS and par and int8gemm.available() \
            and I % INT8_BLOCK == 0 and q.is_contiguous():
        if tiled:
            return _untiled(x, q, scale, _int8_cpu)
        y = int8gemm.int8_gemm(x2.detach().contiguous().numpy(), qn, bf16_bits(scale), get_num_threads())
        return torch.from_numpy(y).view(*x.shape[:-1], O)
    s32 = scale.float().numpy()
    if tiled:
        return _cpu_product(x, O, lambda a: int8_gemv_tiles(a, qn, bf16_bits(scale)),
                            lambda o, out: dequantize_tiles(qn, s32, o, out.numpy(), par))
    return _cpu_product(x, O, lambda a: int8_gemv(a, qn, bf16_bits(scale)),
                        lambda o, out: dequantize_rows(qn[o:o + len(out)], s32[o:o + len(out)], out.numpy(), par))


_widened = threading.local()  # .block: this thread's fp32 buffer for widened weight rows (prefill GEMMs); .codes: int8


def _cpu_product(x: torch.Tensor, O: int, gemv: Callable[[np.ndarray], np.ndarray],
                 block: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x fp32 [..., I] @ W.T [..., O] on the CPU: gemv(x2) (a kernels_cpu.widen GEMV) for up to
    MAX_WIDEN_ROWS rows, else one fp32 GEMM (_block_gemm: oneDNN's, or MKL's) per block of rows of W,
    block(o, out) writing rows o..o+len(out)-1 in fp32 into out, a buffer kept per thread: the widened
    copy stays in cache whatever the layer's size, and is not allocated (and page-faulted) again for
    every block."""
    x2 = x.reshape(-1, x.shape[-1])
    if 1 <= x2.shape[0] <= MAX_WIDEN_ROWS:
        return torch.from_numpy(gemv(x2.detach().contiguous().numpy())).view(*x.shape[:-1], O)
    T, In = x2.shape
    gemm = _block_gemm()
    rows = WIDEN_BLOCK_ROWS if gemm is _mkl_block else max(ONEDNN_BLOCK_ROWS, ONEDNN_BLOCK_VALUES // In)
    buf = getattr(_widened, "block", None)
    if buf is None or buf.numel() < rows * In:
        with torch.inference_mode(False):  # a normal tensor: written in place under inference mode or not
            buf = _widened.block = torch.empty(rows * In)
    y = torch.empty(T, O, dtype=x2.dtype)
    x2 = x2.contiguous()
    for o in range(0, O, rows):
        n = min(rows, O - o)
        wb = buf[:n * In].view(n, In)
        block(o, wb)
        gemm(x2, wb, y[:, o:o + n])
    return y.view(*x.shape[:-1], O)


ONEDNN_BLOCK_ROWS = 256  # widened rows per oneDNN GEMM (K2 shapes, Zen 4: 256 at or above 512)
# ... or more where the rows are short, so that a block holds as many weights as 256 of K2's 7168-wide
# rows: each GEMM call has a fixed cost, and q_b_proj's 1536-wide rows, 256 at a time, ran at 133 against
# 164 GFLOP/s with 1024 (T=128, AVX2 code on a 2-core Xeon; 7168-wide rows level from 256 to 1024)
ONEDNN_BLOCK_VALUES = 256 * 7168


def _mkl_block(x2: torch.Tensor, wb: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, n] = x2 [T, I] @ wb.T through torch.mm (MKL's sgemm in torch's CPU builds), the block on
    the left as the engine has always multiplied it."""
    out.copy_(torch.mm(wb, x2.T).T)


def _onednn_block(x2: torch.Tensor, wb: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, n] = x2 [T, I] @ wb.T through torch's oneDNN fp32 linear (the op torch's compiler uses):
    on K2's prompt shapes 1.1-1.3x MKL's sgemm on a Zen 4 (oneDNN picks its AVX-512 kernels by
    instruction set, where MKL takes its AVX2 ones on AMD) and level with it limited to AVX2."""
    out.copy_(torch.ops.mkldnn._linear_pointwise(x2, wb, None, "none", [], ""))


_GEMM: list[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = []  # the block GEMM, chosen once


def _block_gemm() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """oneDNN's fp32 linear where this torch has it and it gives the fp32 product, else torch.mm.
    KIMI_HYBRID_CPU_GEMM=mkl forces the latter (for comparisons)."""
    if not _GEMM:
        _GEMM.append(_mkl_block)
        if os.environ.get("KIMI_HYBRID_CPU_GEMM", "").lower() != "mkl" and torch.backends.mkldnn.is_available():
            try:
                with torch.inference_mode(False):
                    g = torch.Generator().manual_seed(0)
                    a, w = torch.randn(9, 40, generator=g), torch.randn(24, 40, generator=g)
                    got = torch.empty(9, 24)
                    _onednn_block(a, w, got)
                    want = (a.double() @ w.double().T).float()
                if torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                    _GEMM[0] = _onednn_block
                else:  # e.g. a build whose oneDNN rounds fp32 matmuls to bf16
                    log.info("oneDNN's fp32 linear is not an fp32 product here; prompt GEMMs use torch.mm")
            except (RuntimeError, AttributeError, NotImplementedError) as e:
                log.info("oneDNN's fp32 linear unavailable (%s); prompt GEMMs use torch.mm", e)
    return _GEMM[0]


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's bits as a uint16 numpy view (no copy), what the Numba kernels read."""
    return t.view(torch.int16).numpy().view(np.uint16)


_MM_OUT_DTYPE: dict[torch.dtype, bool] = {}  # input dtype -> torch.mm(out_dtype=float32) runs on CUDA, learned once


def fp32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, I] @ w.T in fp32, as DeepSeek-V3's router computes it (both operands widened to fp32).

    On CUDA with x and w both bf16/fp16, torch.mm(out_dtype=float32) gives that product up to
    summation order without a widened copy of w per call (the products of two bf16 values are exact
    in fp32 and cuBLAS sums in fp32): for K2's 60 router weights that copy is ~1.6 GB of traffic
    per token. A bf16 w under fp32 x on the CPU goes through widening_linear. Elsewhere, or where
    this torch lacks out_dtype, w is widened."""
    if w.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu":
        return widening_linear(x, w)
    if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) \
            and _MM_OUT_DTYPE.get(x.dtype, True):
        try:
            y = torch.mm(x, w.t(), out_dtype=torch.float32)
            _MM_OUT_DTYPE[x.dtype] = True
            return y
        except (TypeError, NotImplementedError) as e:  # an older torch: no out_dtype (a CUDA error propagates)
            _MM_OUT_DTYPE[x.dtype] = False
            log.info("torch.mm(out_dtype=float32) unavailable for %s (%s); the router widens its weight", x.dtype, e)
    return x.float() @ w.float().T


Attend = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (q_lat [T, H, L], q_pe [T, H, R]) -> o_lat [T, H, L]


def absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, attend: Attend, kv_b_heads: torch.Tensor,
                       w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Absorbed-MLA decode: q_nope [T, H, P] into the latent space, attend (the softmax over the cache,
    the cache's own: KVCache.attend / PagedKVCache.attend), and the values out of it -> o [T, H, V].
    kv_b_proj as [H, P + V, L], of which w_uk and w_uv are the halves.

    With fp32 on a CPU the two per-head products with kv_b_proj run as kernels_cpu.heads' Numba loops
    (a head a thread, at memory speed; kv_b_proj read as held, bf16 under 'bf16w'), on the calling
    thread alone where Numba may not run two parallel regions at once (workqueue); elsewhere as
    kernels_gpu.mla's einsums."""
    if kv_b_heads.device.type == "cpu" and kv_b_heads.dtype in (torch.float32, torch.bfloat16) \
            and q_nope.dtype == torch.float32 and kv_b_heads.is_contiguous():
        kvb = bf16_bits(kv_b_heads) if kv_b_heads.dtype == torch.bfloat16 else kv_b_heads.numpy()
        par = concurrent_parallel_ok()
        q_lat = torch.from_numpy(head_absorb(q_nope.numpy(), kvb, par))  # [T, H, L]
        o_lat = attend(q_lat, q_pe)
        return torch.from_numpy(head_values(o_lat.contiguous().numpy(), kvb, w_uk.shape[1], par))
    o_lat = attend(absorb_query(q_nope, as_dtype(w_uk, q_nope.dtype)), q_pe)
    return torch.einsum("thl,hvl->thv", o_lat, as_dtype(w_uv, q_nope.dtype))  # [T, H, V]


def as_dtype(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w in the activations' dtype: itself, or a widened copy (kv_b_proj's halves held in bf16 under
    fp32 math, for the torch products of prompt attention: once per layer and prompt chunk)."""
    return w if w.dtype == dtype else w.to(dtype)
