"""Hand-written LLVM IR for the INT4 x INT16 row-block dot product (AVX2 vpmaddwd).

Owns only the innermost loop: R weight rows x TB tokens over the whole input dimension, written
into a small fp32 result buffer. Row blocks, expert routing and threading live in moe.py.
Numba's vectoriser widens int32 arithmetic to int64 and never emits vpmaddwd, so the loop is
built directly as LLVM vector IR and inlined into the calling @njit function.

Weight row (compressed-tensors pack-quantized, read in place):
  packed bytes [in/2]: as 16-bit words, word i of a 32-byte chunk holds columns 4i..4i+3 in its
  4 nibbles (stored as q + 8, 0..15); scale bf16 [in/32]. A chunk = 64 columns = 2 groups.
  Nibble k of all 16 words (shift 4k, mask 15) is one vector of 16 int16: lane i = column 4i + k.
Activations of one token (prepared by actq.quantize_rows):
  xa int16 [in]: per chunk c, xa[64c + 16k + i] = column 64c + 4i + k (k < 4, i < 16), so
  vpmaddwd(nibble k, xa[64c + 16k : +16]) gives int32 lane l = columns 8l + k and 8l + 4 + k;
  lanes 0-3 belong to group 2c, lanes 4-7 to group 2c + 1.
  dg f32 [in/32]: group scale (x ~= xa * dg); xs f32 [in/32]: -8 * sum(xa over the group).
Per group g: dot = ws[g] * dg[g] * (sum(nibble * xa) + xs[g]), since (nibble - 8) * xa sums to
sum(nibble * xa) - 8 * sum(xa). Per chunk the int32 lanes stay below 8 * 15 * 32767 < 2**24, so
their conversion to fp32 is exact.
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
V16I16, V8I32, V8F32 = ir.VectorType(I16, 16), ir.VectorType(I32, 8), ir.VectorType(F32, 8)
UNROLL = 4  # chunks per main-loop step: 8 bf16 scales = one 16-byte load
PREFETCH = 1024  # bytes ahead in each weight row stream (software prefetch; 0 = off)


def host_has_avx2() -> bool:
    """The kernels use AVX2 instructions (vpmaddwd) through an LLVM x86 intrinsic."""
    feats = llvm_binding.get_host_cpu_features()
    return bool(feats.get("avx2", False)) and bool(feats.get("fma", False))


def _splat(ty: ir.VectorType, val) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, val)] * ty.count)


def _i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _load(b: ir.IRBuilder, addr, ty):
    return b.load(b.inttoptr(addr, ty.as_pointer()), align=1)


class _Emitter:
    """Builds one inlined R x TB kernel body; state is only the IR values of the current call."""

    def __init__(self, b: ir.IRBuilder, R: int, TB: int):
        self.b, self.R, self.TB = b, R, TB
        mod = b.module
        self.maddwd = cgutils.get_or_insert_function(
            mod, ir.FunctionType(V8I32, [V16I16, V16I16]), "llvm.x86.avx2.pmadd.wd")
        self.fma = cgutils.get_or_insert_function(
            mod, ir.FunctionType(V8F32, [V8F32, V8F32, V8F32]), "llvm.fma.v8f32")
        self.m0f = _splat(V16I16, 0x0F)
        self.prefetch = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0")

    def prefetch_line(self, addr):
        """Prefetch for read into all cache levels (rw=0, locality=3, data)."""
        b = self.b
        b.call(self.prefetch, [b.inttoptr(addr, I8.as_pointer()), ir.Constant(I32, 0),
                               ir.Constant(I32, 3), ir.Constant(I32, 1)])

    def scales(self, addr, n: int):
        """n bf16 at addr -> <n x float> (bf16 bits << 16)."""
        b = self.b
        sv = _load(b, addr, ir.VectorType(I16, n))
        wide = b.shl(b.zext(sv, ir.VectorType(I32, n)), _splat(ir.VectorType(I32, n), 16))
        return b.bitcast(wide, ir.VectorType(F32, n))

    def widen(self, v, n: int):
        """<n x float> -> <8 x float> padded with zeros (n <= 8)."""
        if n == 8:
            return v
        zero = ir.Constant(ir.VectorType(F32, n), None)
        return self.b.shuffle_vector(v, zero, ir.Constant(V8I32, [i if i < n else n for i in range(8)]))

    def step(self, accs, wrow, srow, xrow, grow, chunk, U: int):
        """U chunks starting at `chunk` (an i64 value); accs[r][t] are <8 x float> allocas."""
        b, R, TB = self.b, self.R, self.TB
        ng = 2 * U
        goff = b.mul(chunk, _i64(8))       # 2 groups x 4 bytes of f32 per chunk
        if U == UNROLL and PREFETCH:
            for r in range(R):
                for line in range(0, 32 * U, 64):
                    self.prefetch_line(b.add(wrow[r], b.add(b.mul(chunk, _i64(32)), _i64(PREFETCH + line))))
                self.prefetch_line(b.add(srow[r], b.add(b.mul(chunk, _i64(4)), _i64(PREFETCH // 8))))
        sdx = [[None] * TB for _ in range(R)]
        dgs = [self.scales_f32(b.add(grow[t][0], goff), ng) for t in range(TB)]
        xss = [self.scales_f32(b.add(grow[t][1], goff), ng) for t in range(TB)]
        for r in range(R):
            ws = self.scales(b.add(srow[r], b.mul(chunk, _i64(4))), ng)
            for t in range(TB):
                sdx[r][t] = b.fmul(ws, dgs[t])                    # per-group ws * dg
                corr = self.widen(b.fmul(sdx[r][t], xss[t]), ng)  # -8 offset, folded in
                b.store(b.fadd(b.load(accs[r][t]), corr), accs[r][t])
        for j in range(U):
            coff = b.mul(b.add(chunk, _i64(j)), _i64(32))
            nibs = []                                             # nibs[r][k]: lane i = column 4i + k
            for r in range(R):
                wv = _load(b, b.add(wrow[r], coff), V16I16)
                nibs.append([b.and_(wv if k == 0 else b.lshr(wv, _splat(V16I16, 4 * k)), self.m0f)
                             for k in range(4)])
            sel = ir.Constant(V8I32, [2 * j] * 4 + [2 * j + 1] * 4)
            for t in range(TB):
                xoff = b.add(xrow[t], b.mul(coff, _i64(4)))     # 64 int16 per chunk
                xv = [_load(b, b.add(xoff, _i64(32 * k)), V16I16) for k in range(4)]
                for r in range(R):
                    p = [b.call(self.maddwd, [nibs[r][k], xv[k]]) for k in range(4)]
                    q = b.add(b.add(p[0], p[1]), b.add(p[2], p[3]))
                    f = b.sitofp(q, V8F32)
                    sc = b.shuffle_vector(sdx[r][t], ir.Constant(sdx[r][t].type, None), sel)
                    b.store(b.call(self.fma, [f, sc, b.load(accs[r][t])]), accs[r][t])

    def scales_f32(self, addr, n: int):
        return _load(self.b, addr, ir.VectorType(F32, n))


def make_rowblock_kernel(R: int, TB: int):
    """An intrinsic rowblock(w, wstride, s, sstride, nch, xa, dg, xs, toks, din, res, rstride) -> None.

    w, s: addresses of the first weight row's packed bytes and bf16 scales; row r is at
    w + r * wstride, s + r * sstride (bytes). nch = din / 64 chunks. xa int16 [N, din], dg and xs
    f32 [N, din/32]: activation rows, of which token t of this block is row toks[t] (int64 array
    address). res: f32 written as res[t * rstride + r] = dot(weight row r, token t).
    """
    @intrinsic
    def rowblock(typingctx, w, wstride, s, sstride, nch, xa, dg, xs, toks, din, res, rstride):
        sig = types.void(*([types.intp] * 12))

        def codegen(context, b, signature, args):
            w, wstride, s, sstride, nch, xa, dg, xs, toks, din, res, rstride = args
            em = _Emitter(b, R, TB)
            accs = [[cgutils.alloca_once_value(b, ir.Constant(V8F32, None)) for _ in range(TB)]
                    for _ in range(R)]
            wrow = [b.add(w, b.mul(_i64(r), wstride)) for r in range(R)]
            srow = [b.add(s, b.mul(_i64(r), sstride)) for r in range(R)]
            gbytes = b.mul(b.udiv(din, _i64(32)), _i64(4))
            xrow, grow = [], []
            for t in range(TB):
                tok = _load(b, b.add(toks, _i64(8 * t)), I64)
                xrow.append(b.add(xa, b.mul(tok, b.mul(din, _i64(2)))))
                grow.append((b.add(dg, b.mul(tok, gbytes)), b.add(xs, b.mul(tok, gbytes))))
            nmain = b.udiv(nch, _i64(UNROLL))
            with cgutils.for_range(b, nmain) as loop:
                em.step(accs, wrow, srow, xrow, grow, b.mul(loop.index, _i64(UNROLL)), UNROLL)
            with cgutils.for_range(b, b.sub(nch, b.mul(nmain, _i64(UNROLL)))) as loop:
                em.step(accs, wrow, srow, xrow, grow, b.add(b.mul(nmain, _i64(UNROLL)), loop.index), 1)
            for r in range(R):
                for t in range(TB):
                    v = b.load(accs[r][t])
                    tot = b.extract_element(v, ir.Constant(I32, 0))
                    for lane in range(1, 8):
                        tot = b.fadd(tot, b.extract_element(v, ir.Constant(I32, lane)))
                    roff = b.mul(b.add(b.mul(_i64(t), rstride), _i64(r)), _i64(4))
                    b.store(tot, b.inttoptr(b.add(res, roff), F32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return rowblock
