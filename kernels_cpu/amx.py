"""AMX (Intel's tile matrix unit) for the routed experts' prompt products: INT4 x INT16, exact.

Owns the tile kernel and the two repackings it reads (with tile_rows and slot_blocks, which moe.py
calls), and TileOps (the tile instructions as LLVM intrinsics, which amx_gemm's bf16 kernel uses
too). moe.py decides which experts go through it:
those with many tokens in a prompt. Decode (one token per expert) stays on the row kernel (simd.py),
which streams weights at memory speed; a tile product only pays off where each weight row meets
many tokens.

The product is the row kernel's, summed differently: per group of 32 columns the int32 sum of
nibble * activation code is exact either way, then scaled by the weight's and the activation's group
scales in fp32. tdpbssd multiplies signed bytes by signed bytes, four per int32 lane, over tiles:

  A  16 weight rows x 32 bytes: one group, q = nibble - 8 (signed), in "K order": the group's 16
     packed bytes' low nibbles (columns 0, 2, .., 30), then their high nibbles (1, 3, .., 31);
  B  8 rows x 64 bytes, the 32 activation bytes of 16 tokens in the same K order, as tdpbssd reads
     them: row kk holds bytes 4kk..4kk+3 of token 0, then of token 1, ..; one tile for the high
     bytes h, one for the low bytes l of the codes a = 256 h + l (actq's VNNI split);
  C  16 rows x 16 tokens of int32: tdpbssd(Ch, A, Bh), tdpbssd(Cl, A, Bl), zeroed per group.

Per group, for each of the 16 rows m: acc[m] += float((Ch[m] << 8) + Cl[m]) * ws[m, g] * dg[g, :]
(a vector over the 16 tokens). |Ch| <= 8 * 128 * 32 and the whole sum is below 2**24, so the
conversion is exact, as in the row kernel.

Linux hands out AMX's tile state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM);
available() asks once and says no where it is refused, the CPU lacks AMX-INT8, or the kernels do not
run at zmm width with VNNI (the activation layout B is built from). KIMI_HYBRID_CPU_AMX=0 turns it
off (for comparisons).
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import F32, I8, I32, I64, has_vnni, host_features, vector_lanes
from kernels_cpu.widen import bf16_to_f32

M = 16  # weight rows per tile product
N = 16  # tokens per tile product
GROUP = 32
B_GROUP_BYTES = 2 * 8 * 64  # per group: the h tile, then the l tile

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


@functools.lru_cache(maxsize=None)
def available(bf16: bool = False) -> bool:
    """Whether moe.py may use the tile kernel in this process (see the module docstring); bf16: whether
    amx_gemm's bf16 tiles may run."""
    if os.environ.get("KIMI_HYBRID_CPU_AMX", "1") == "0":
        return False
    if not (compiles_bf16() if bf16 else (_compiles() and vector_lanes() == 32 and has_vnni())):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _compiles() -> bool:
    """Whether the compile target has the tile instructions (numba's target, as host_features says)."""
    f = host_features()
    return f["amx-tile"] and f["amx-int8"]


def compiles_bf16() -> bool:
    """Whether the compile target has AMX's bf16 tile products (amx_gemm)."""
    f = host_features()
    return f["amx-tile"] and f["amx-bf16"]


def tile_config() -> np.ndarray:
    """The 64-byte tile configuration (palette 1): tiles 0, 1 and 5, 6 = two pairs Ch, Cl (16 x 64
    bytes, even and odd groups), 2 = A (16 x 32), 3, 4 = Bh, Bl (8 x 64)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    colsb = cfg[16:32].view(np.uint16)
    rows = cfg[48:56]
    for t, (r, c) in enumerate([(M, 4 * N), (M, 4 * N), (M, GROUP), (8, 4 * N), (8, 4 * N), (M, 4 * N), (M, 4 * N)]):
        colsb[t], rows[t] = c, r
    return cfg


class TileOps:
    """The tile instructions as LLVM intrinsics declared in b's module, tiles named by number (i8
    immediates): ldcfg(address) loads the configuration, zero(t), load(t, address, stride), store(t,
    address, stride), dp(c, a, b) the product `product` names (tdpbssd, tdpbf16ps), release()."""

    def __init__(self, b: ir.IRBuilder, product: str):
        self.b = b
        i8p = I8.as_pointer()
        fn = lambda name, args: cgutils.get_or_insert_function(  # noqa: E731
            b.module, ir.FunctionType(ir.VoidType(), args), f"llvm.x86.{name}")
        self._cfg, self._zero = fn("ldtilecfg", [i8p]), fn("tilezero", [I8])
        self._load, self._store = fn("tileloadd64", [I8, i8p, I64]), fn("tilestored64", [I8, i8p, I64])
        self._dp, self._release = fn(product, [I8, I8, I8]), fn("tilerelease", [])

    def _p(self, addr):
        return self.b.inttoptr(addr, I8.as_pointer())

    def ldcfg(self, addr) -> None:
        self.b.call(self._cfg, [self._p(addr)])

    def zero(self, t: int) -> None:
        self.b.call(self._zero, [ir.Constant(I8, t)])

    def load(self, t: int, addr, stride) -> None:
        self.b.call(self._load, [ir.Constant(I8, t), self._p(addr), stride])

    def store(self, t: int, addr, stride) -> None:
        self.b.call(self._store, [ir.Constant(I8, t), self._p(addr), stride])

    def dp(self, c: int, a: int, b: int) -> None:
        self.b.call(self._dp, [ir.Constant(I8, c), ir.Constant(I8, a), ir.Constant(I8, b)])

    def release(self) -> None:
        self.b.call(self._release, [])


@intrinsic
def tile_product(typingctx, cfg, a, astride, bt, dgb, wst, ngroups, res):
    """res f32 [M, N] = sum over groups g of the 16 rows of A (a: int8 [M, astride], group g at 32 g)
    against the token block (bt: B_GROUP_BYTES per group; dgb: f32 [ngroups, N] activation scales),
    each group's int32 product scaled by wst f32 [ngroups, M] (weight scales) and dgb. Addresses."""
    sig = types.void(*([types.intp] * 8))

    def codegen(context, b, signature, args):
        if not _compiles():  # a target without AMX (an AVX2 build): never called there (available())
            return context.get_dummy_value()
        cfg, a, astride, bt, dgb, wst, ngroups, res = args
        VD, VF = ir.VectorType(I32, N), ir.VectorType(F32, N)
        t = TileOps(b, "tdpbssd")
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF] * 3), f"llvm.fma.v{N}f32")
        cbuf = cgutils.alloca_once(b, ir.ArrayType(I32, 4 * M * N))
        cbuf.align = 64
        cb = b.ptrtoint(cbuf, I64)
        accs = [cgutils.alloca_once_value(b, ir.Constant(VF, None)) for _ in range(M)]
        t.ldcfg(cfg)
        stride64 = ir.Constant(I64, 4 * N)
        eight = ir.Constant(VD, [ir.Constant(I32, 8)] * N)
        # two groups a step, their products in two pairs of C tiles (0, 1 and 5, 6), so that one
        # group's store and scaling can overlap the next one's tile products
        with cgutils.for_range(b, b.udiv(ngroups, ir.Constant(I64, 2))) as loop:
            for h in range(2):
                g = b.add(b.mul(loop.index, ir.Constant(I64, 2)), ir.Constant(I64, h))
                ch_t, cl_t = (0, 1) if h == 0 else (5, 6)
                t.zero(ch_t)
                t.zero(cl_t)
                t.load(2, b.add(a, b.mul(g, ir.Constant(I64, GROUP))), astride)
                bg = b.add(bt, b.mul(g, ir.Constant(I64, B_GROUP_BYTES)))
                t.load(3, bg, stride64)
                t.load(4, b.add(bg, ir.Constant(I64, B_GROUP_BYTES // 2)), stride64)
                t.dp(ch_t, 2, 3)
                t.dp(cl_t, 2, 4)
                cbh = b.add(cb, ir.Constant(I64, h * 8 * M * N))
                t.store(ch_t, cbh, stride64)
                t.store(cl_t, b.add(cbh, ir.Constant(I64, 4 * M * N)), stride64)
                dgv = b.load(b.inttoptr(b.add(dgb, b.mul(g, ir.Constant(I64, 4 * N))), VF.as_pointer()), align=4)
                wsg = b.add(wst, b.mul(g, ir.Constant(I64, 4 * M)))
                for m in range(M):
                    ch = b.load(b.inttoptr(b.add(cbh, ir.Constant(I64, 4 * N * m)), VD.as_pointer()), align=64)
                    cl = b.load(b.inttoptr(b.add(cbh, ir.Constant(I64, 4 * N * (M + m))), VD.as_pointer()), align=64)
                    v = b.sitofp(b.add(b.shl(ch, eight), cl), VF)
                    s = b.load(b.inttoptr(b.add(wsg, ir.Constant(I64, 4 * m)), F32.as_pointer()), align=4)
                    sv = b.insert_element(ir.Constant(VF, None), s, ir.Constant(I32, 0))
                    sv = b.shuffle_vector(sv, sv, ir.Constant(VD, None))
                    b.store(b.call(fma, [v, b.fmul(sv, dgv), b.load(accs[m])]), accs[m])
        t.release()
        for m in range(M):
            b.store(b.load(accs[m]), b.inttoptr(b.add(res, ir.Constant(I64, 4 * N * m)), VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _unpack_row(typingctx, w, nbytes, a):
    """One packed weight row, nbytes (a multiple of 64) at w -> 2 nbytes int8 at a in K order (q = nibble
    - 8): per 64 packed bytes, two 64-byte stores of 16 low nibbles then 16 high nibbles per group."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, b, signature, args):
        w, nbytes, a = args
        V = ir.VectorType(I8, 64)
        m15 = ir.Constant(V, [ir.Constant(I8, 15)] * 64)
        m8 = ir.Constant(V, [ir.Constant(I8, 8)] * 64)
        four = ir.Constant(V, [ir.Constant(I8, 4)] * 64)
        halves = [[16 * (2 * p + q // 16 // 2) + q % 16 + (64 if (q // 16) % 2 else 0) for q in range(64)]
                  for p in range(2)]
        masks = [ir.Constant(ir.VectorType(I32, 64), h) for h in halves]
        with cgutils.for_range(b, b.udiv(nbytes, ir.Constant(I64, 64))) as loop:
            off = b.mul(loop.index, ir.Constant(I64, 64))
            v = b.load(b.inttoptr(b.add(w, off), V.as_pointer()), align=1)
            lo = b.sub(b.and_(v, m15), m8)
            hi = b.sub(b.lshr(v, four), m8)
            for p in range(2):
                dst = b.add(a, b.add(b.mul(off, ir.Constant(I64, 2)), ir.Constant(I64, 64 * p)))
                b.store(b.shuffle_vector(lo, hi, masks[p]), b.inttoptr(dst, V.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def unpack_rows(w, wst, s, sst, din, a, wsT):
    """16 packed weight rows (addresses w, s of the first row's bytes and bf16 scales, row strides wst,
    sst) -> a int8 [M, din] in K order, q = nibble - 8, and wsT f32 [din/32, M] (group-major scales)."""
    G = din // GROUP
    for m in range(M):
        _unpack_row(w + m * wst, din // 2, a.ctypes.data + m * din)
        srow = _u16(s + m * sst, G)
        for g in range(G):
            wsT[g, m] = bf16_to_f32(srow[g])


@njit(nogil=True, cache=True, inline="always")
def pack_tokens(xa32, rowwords, dg, toks, ntok, G, bt, dgb):
    """The B tiles of a block of up to N tokens: xa32 int32 view of actq's VNNI-layout activations
    (rowwords int32 per token), dg f32 [tokens, G]; toks int64 [ntok] rows of this block.
    bt int32 [G, 2, 8, N], dgb f32 [G, N] written; columns past ntok are zero."""
    for g in range(G):
        c, gq = g // 4, g % 4
        for n in range(N):
            if n < ntok:
                base = toks[n] * rowwords + 64 * c + 4 * gq      # int32 index of chunk c, group gq's h-even
                for kk in range(4):
                    bt[g, 0, kk, n] = xa32[base + kk]             # h, even columns
                    bt[g, 0, 4 + kk, n] = xa32[base + 16 + kk]    # h, odd columns
                    bt[g, 1, kk, n] = xa32[base + 32 + kk]        # l, even
                    bt[g, 1, 4 + kk, n] = xa32[base + 48 + kk]    # l, odd
                dgb[g, n] = dg[toks[n], g]
            else:
                for kk in range(8):
                    bt[g, 0, kk, n] = 0
                    bt[g, 1, kk, n] = 0
                dgb[g, n] = 0.0


@njit(nogil=True, cache=True, inline="always")
def tile_rows(w, sc, din, ta, tws, tres, cfg, bt, dgb, b0, b1):
    """16 weight rows (packed bytes at w, bf16 scales at sc, din columns) against token blocks b0..b1-1
    of bt, dgb (slot_blocks) through the tile kernel: tres[k, r, j] = row r . token j of block k."""
    unpack_rows(w, din // 2, sc, din // 16, din, ta, tws)
    for k in range(b1 - b0):
        tile_product(cfg.ctypes.data, ta.ctypes.data, din, bt[b0 + k].ctypes.data, dgb[b0 + k].ctypes.data,
                     tws.ctypes.data, din // 32, tres[k].ctypes.data)


@njit(nogil=True, cache=True, parallel=True)
def slot_blocks(slot_p, amx_min, xa, dg, toks, G):
    """For moe.py: the token blocks of its slots (experts; slot s has the activation rows
    toks[slot_p[s]:slot_p[s+1]]) with at least amx_min tokens -> blk int64 [S + 1] (slot s's blocks are
    blk[s]:blk[s+1]), bt int32 [blocks, G, 2, 8, N], dgb f32 [blocks, G, N] (pack_tokens over those
    rows)."""
    S = slot_p.shape[0] - 1
    blk = np.zeros(S + 1, np.int64)
    for s in range(S):
        n = slot_p[s + 1] - slot_p[s]
        blk[s + 1] = blk[s] + ((n + N - 1) // N if n >= amx_min else 0)
    bt = np.empty((blk[S], G, 2, 8, N), np.int32)
    dgb = np.empty((blk[S], G, N), np.float32)
    if blk[S] == 0:                                  # no parallel region (a thread wake-up) for nothing
        return blk, bt, dgb
    xa32 = xa.view(np.int32).reshape(-1)
    rowwords = xa.shape[1] // 2
    for s in prange(S):
        for k in range(blk[s + 1] - blk[s]):
            t0 = slot_p[s] + N * k
            pack_tokens(xa32, rowwords, dg, toks[t0:], min(N, slot_p[s + 1] - t0), G, bt[blk[s] + k],
                        dgb[blk[s] + k])
    return blk, bt, dgb


@intrinsic
def _u16(typingctx, addr, n):
    """A uint16 array view of n items at addr."""
    return _view(types.uint16, addr, n)


def _view(dtype, addr, n):
    arrty = types.Array(dtype, 1, "C")
    sig = arrty(types.intp, types.intp)

    def codegen(context, b, signature, args):
        ary = context.make_array(arrty)(context, b)
        itemsize = context.get_constant(types.intp, np.dtype(str(dtype)).itemsize)
        ptr = b.inttoptr(args[0], context.get_value_type(dtype).as_pointer())
        context.populate_array(ary, data=ptr, shape=cgutils.pack_array(b, [args[1]]),
                               strides=cgutils.pack_array(b, [itemsize]), itemsize=itemsize,
                               meminfo=None)
        return ary._getvalue()

    return sig, codegen
