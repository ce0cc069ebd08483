"""INT4 x INT16 prefill through an unpacked weight panel: vpmaddwd with int32 sums over whole groups (AVX2).

Owns the panel path of the row kernels for ymm vectors without VNNI (Zen 3, Haswell to Skylake
desktop), taken by moe.py for an expert with PANEL_MIN tokens or more in a call. simd.py's kernel
converts each chunk's int32 sums to fp32 and scales them, 3 instructions per chunk, row and token on
top of 7 (4 vpmaddwd, 3 adds), and keeps R x TB accumulators and per-group scales live, more than
AVX2's 16 registers hold: on a 2-core Xeon running the AVX2 code it reached 71% of torch's fp32
matmul at 64 tokens per expert. Here the int32 sums run over whole groups instead, and the weights are
unpacked once per call into a small panel that every token of the call reads.

Step = 4 chunks = 256 columns = 8 groups. A chunk (32 bytes of a row) has 8 dwords; dword d of chunk
p holds columns 64p + 8d .. + 7 (4 nibbles of each of its 2 words), of group 2p + d // 4. Per 128-bit
half h, the 4 x 4 dword transpose of a step's 4 chunks gives 4 pass vectors whose int32 lane j = 4h + p
holds dword 4h + v of chunk p in pass v: lane j is group 2p + h in every pass, so the products of all
4 passes and 4 nibbles add up in int32 to the whole group's sum (below 32 * 15 * 32767 < 2**24, exact
in fp32), converted and scaled once per step: 16 vpmaddwd + 16 adds + 3 per row, token and 256 columns.

Panel (per call, PANEL_STEPS steps of R rows): int16 [step][pass v][row r][nibble k][16]: nibble k of
each word of pass v (lane 2j + e = word e of lane j); scales f32 [step][r][8] in lane order.
Activations (actq.quantize_row_panel), per token: xp int16 [din]: xp[256 s + 64 v + 16 k + 2 j + e] =
column 256 s + 64 p + 32 h + 8 v + 4 e + k (j = 4h + p); dgp f32 [din / 32] and xsp int32 [din / 32]
(the group's scale and -8 * its codes' sum) at 8 s + j. Rows need din a multiple of 256 (fits).
While a panel's tokens run, the next group's panel weights are prefetched into L1: unpacking waited on
memory otherwise (rows alone, 1 thread: 117% of torch's fp32 matmul with 256 rows in cache, 103% with
16384 streamed, prefetching into L2; into L1, one K2 layer's gate and up went 95-96 -> 98-108 GFLOP/s).
Each call of the dot product prefetches the activations of the next.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import (F32, I16, I32, I64, has_vnni, host_has_avx2, hsum, prefetch_l1, prefetch_l1_at,
                              vector_lanes)

STEP = 256  # columns per step
PANEL_STEPS = 8  # steps unpacked per panel: 3 rows x 8 steps = 12 KB (4 rows 16), half a Zen 3's L1
# rows x tokens per call of the dot product: 3 x 2 keeps 6 int32 sums, 3 panel vectors and 2 activation
# vectors in 11 of AVX2's 16 registers, and loads 5 vectors for 6 vpmaddwd. On a 2-core Xeon running the
# AVX2 code, cycles per row, token and step: 3 x 2 14.5, 4 x 2 15.6-16.7 (spilling), 2 x 2 16.0, 4 x 1
# 16.3, 8 x 1 17.7, 2 x 4 17.5. The rows of a call go 3 at a time, the last 4 or 2 together (RB = 64
# is not a multiple of 3; one row alone cost 4% of the whole).
ROWS, TOKENS, MAX_ROWS = 3, 2, 4
# tokens of one expert in a call from which moe.py takes this path: the unpacking is then at most a
# fifth of the work. 512 tokens over 384 experts (the real model's density), AVX2 code on a 2-core Xeon:
# 80-81% of torch's fp32 matmul from 8 tokens, 81-82% from 4 (66-73% before this path).
PANEL_MIN = 4
_VW, _VD, _VF = ir.VectorType(I16, 16), ir.VectorType(I32, 8), ir.VectorType(F32, 8)


def available() -> bool:
    """ymm vectors without VNNI: the CPUs whose row kernel is vpmaddwd at 16 lanes."""
    return host_has_avx2() and vector_lanes() == 16 and not has_vnni()


@njit(cache=True)
def fits(din):
    """Rows of din columns go through the panel kernel: whole steps."""
    return din % STEP == 0


def _c(v: int):
    return ir.Constant(I64, v)


def _load(b, addr, ty):
    return b.load(b.inttoptr(addr, ty.as_pointer()), align=1)


def _store(b, v, addr):
    b.store(v, b.inttoptr(addr, v.type.as_pointer()), align=1)


def _shuf(b, x, y, mask):
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(mask)), mask))


def _splat(ty, v: int):
    return ir.Constant(ty, [ir.Constant(ty.element, v)] * ty.count)


def make_unpack(R: int):
    """An intrinsic unpack(w, wstride, s, sstride, nsteps, panel, wsp) -> None: R rows of packed INT4 (row
    r's bytes at w + r * wstride, bf16 scales at s + r * sstride, both at the panel's first column) over
    nsteps steps -> panel int16 and wsp f32 (layout above)."""
    @intrinsic
    def unpack(typingctx, w, wstride, s, sstride, nsteps, panel, wsp):
        sig = types.void(*([types.intp] * 7))

        def codegen(context, b, signature, args):
            w, wstride, s, sstride, nsteps, panel, wsp = args
            lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]   # unpack*_epi32 per 128 bits
            qlo, qhi = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]  # unpack*_epi64
            with cgutils.for_range(b, nsteps) as loop:
                st = loop.index
                for r in range(R):
                    row = b.add(b.add(w, b.mul(_c(r), wstride)), b.mul(st, _c(128)))
                    c = [_load(b, b.add(row, _c(32 * p)), _VD) for p in range(4)]
                    t0, t1 = _shuf(b, c[0], c[1], lo), _shuf(b, c[0], c[1], hi)
                    t2, t3 = _shuf(b, c[2], c[3], lo), _shuf(b, c[2], c[3], hi)
                    passes = [_shuf(b, t0, t2, qlo), _shuf(b, t0, t2, qhi), _shuf(b, t1, t3, qlo),
                              _shuf(b, t1, t3, qhi)]
                    for v in range(4):
                        pw = b.bitcast(passes[v], _VW)
                        base = b.add(panel, b.mul(b.add(b.mul(st, _c(4)), _c(v)), _c(R * 128)))
                        for k in range(4):
                            n = pw if k == 0 else b.lshr(pw, _splat(_VW, 4 * k))
                            _store(b, n if k == 3 else b.and_(n, _splat(_VW, 15)), b.add(base, _c(128 * r + 32 * k)))
                    # bf16 scales of the step's 8 groups -> f32 in lane order (lane 4h + p = group 2p + h)
                    sv = _load(b, b.add(b.add(s, b.mul(_c(r), sstride)), b.mul(st, _c(16))), ir.VectorType(I16, 8))
                    f = b.bitcast(b.shl(b.zext(sv, _VD), _splat(_VD, 16)), _VF)
                    _store(b, _shuf(b, f, f, [0, 2, 4, 6, 1, 3, 5, 7]),
                           b.add(wsp, b.mul(b.add(b.mul(st, _c(R)), _c(r)), _c(32))))
            return context.get_dummy_value()

        return sig, codegen

    return unpack


def make_dot(R: int, TB: int):
    """An intrinsic dot(panel, wsp, nsteps, xp, xrow, dgp, grow, xsp, toks, acc, xnext, out, ostride, last)
    -> None: TB tokens against the R rows of a panel over its nsteps steps, added onto acc f32 [TB][R][8]:
    lane j of acc[t][r] gathers row r . token t over the groups of lane j; with last != 0 (the row's last
    panel) their sum, the dot product, goes to out f32 [t * ostride + r] too.
    Token t's activations (layout above) are row toks[t] (int64 array address) of xp (int16, xrow bytes
    a row), dgp and xsp (f32 and int32, grow bytes a row), each address at the panel's first column;
    xnext: the activations the next call reads, prefetched into L1 step by step. Per nibble vector of a
    pass, the R rows' panel vectors and the TB tokens' activations are loaded once for R x TB products;
    an empty asm statement that touches memory after each keeps LLVM from hoisting the loads of a whole
    step, which spilled registers, and the accumulators stay in memory (a load and a store a step)."""
    @intrinsic
    def dot(typingctx, panel, wsp, nsteps, xp0, xrow, dgp0, grow, xsp0, toks, acc0, xnext, out, ostride, last):
        sig = types.void(*([types.intp] * 14))

        def codegen(context, b, signature, args):
            panel, wsp, nsteps, xp0, xrow, dgp0, grow, xsp0, toks, acc0, xnext, out, ostride, last = args
            madd = cgutils.get_or_insert_function(b.module, ir.FunctionType(_VD, [_VW, _VW]),
                                                  "llvm.x86.avx2.pmadd.wd")
            fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_VF, [_VF] * 3), "llvm.fma.v8f32")
            tk = [_load(b, b.add(toks, _c(8 * t)), I64) for t in range(TB)]
            xp = [b.add(xp0, b.mul(tk[t], xrow)) for t in range(TB)]
            dgp = [b.add(dgp0, b.mul(tk[t], grow)) for t in range(TB)]
            xsp = [b.add(xsp0, b.mul(tk[t], grow)) for t in range(TB)]
            accp = [[b.add(acc0, _c(32 * (t * R + r))) for t in range(TB)] for r in range(R)]
            with cgutils.for_range(b, nsteps) as loop:
                st = loop.index
                g = b.mul(st, _c(32))
                for line in range(0, 512, 64):
                    prefetch_l1(b, b.add(b.add(xnext, b.mul(st, _c(512))), _c(line)))
                xsv = [_load(b, b.add(xsp[t], g), _VD) for t in range(TB)]
                sums = [list(xsv) for _ in range(R)]
                for v in range(4):
                    base = b.add(panel, b.mul(b.add(b.mul(st, _c(4)), _c(v)), _c(R * 128)))
                    xo = b.add(b.mul(st, _c(512)), _c(128 * v))
                    for k in range(4):
                        nib = [_load(b, b.add(base, _c(128 * r + 32 * k)), _VW) for r in range(R)]
                        xv = [_load(b, b.add(b.add(xp[t], xo), _c(32 * k)), _VW) for t in range(TB)]
                        for r in range(R):
                            for t in range(TB):
                                sums[r][t] = b.add(sums[r][t], b.call(madd, [xv[t], nib[r]]))
                        b.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], True)
                dgv = [_load(b, b.add(dgp[t], g), _VF) for t in range(TB)]
                for r in range(R):
                    wv = _load(b, b.add(wsp, b.mul(b.add(b.mul(st, _c(R)), _c(r)), _c(32))), _VF)
                    for t in range(TB):
                        f = b.call(fma, [b.sitofp(sums[r][t], _VF), b.fmul(dgv[t], wv), _load(b, accp[r][t], _VF)])
                        _store(b, f, accp[r][t])
            with b.if_then(b.icmp_signed("!=", last, _c(0))):
                for t in range(TB):
                    for r in range(R):
                        o = b.add(out, b.add(b.mul(_c(4 * t), ostride), _c(4 * r)))
                        b.store(hsum(b, _load(b, accp[r][t], _VF)), b.inttoptr(o, F32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return dot


@intrinsic
def _load_i64(typingctx, addr):
    def codegen(context, b, signature, args):
        return _load(b, args[0], I64)

    return types.int64(types.intp), codegen


_unpack3, _unpack4, _unpack2 = make_unpack(3), make_unpack(4), make_unpack(2)
_dot32, _dot31, _dot42, _dot41, _dot22, _dot21 = (make_dot(r, t) for r in (3, 4, 2) for t in (TOKENS, 1))


@njit(nogil=True, cache=True, inline="always")
def _unpack(R, w, wst, sc, sst, ns, p, wsp):
    if R == 3:
        _unpack3(w, wst, sc, sst, ns, p, wsp)
    elif R == 4:
        _unpack4(w, wst, sc, sst, ns, p, wsp)
    else:
        _unpack2(w, wst, sc, sst, ns, p, wsp)


@njit(nogil=True, cache=True, inline="always")
def _dot(R, tb, p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last):
    if R == 3:
        if tb == TOKENS:
            _dot32(p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last)
        else:
            _dot31(p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last)
    elif R == 4:
        if tb == TOKENS:
            _dot42(p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last)
        else:
            _dot41(p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last)
    else:
        if tb == TOKENS:
            _dot22(p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last)
        else:
            _dot21(p, wsp, ns, x0, xrow, d0, grow, e0, toks, a, nxt, o, ostride, last)


@njit(nogil=True, cache=True)
def scratch_floats(n, nrows):
    """f32 elements of panel_rows' scratch for n tokens and nrows rows: the panel, 64 bytes to align it,
    its scales and the lane sums of every row and token."""
    return PANEL_STEPS * 4 * MAX_ROWS * 4 * 8 + 16 + PANEL_STEPS * MAX_ROWS * 8 + n * nrows * 8


@njit(nogil=True, cache=True, inline="always")
def panel_rows(w, wst, sc, sst, nrows, din, xp, dgp, xsp, toks, n, pan, got):
    """nrows >= 2 weight rows (packed bytes at w, bf16 scales at sc, row strides wst, sst bytes) x the n
    tokens listed at toks (int64 address; rows of xp, dgp, xsp, laid out by actq.quantize_row_panel)
    -> got f32 [>= n, >= nrows] (overwritten). pan: f32 scratch of scratch_floats(n, nrows) elements.
    Panels outside, rows inside: the tokens' activations of one panel (n x 4 KB) stay in L2 for all the
    rows, where rows outside re-read every token's whole row (n x din x 2 bytes) for each group of rows."""
    p = (pan.ctypes.data + 63) // 64 * 64           # a panel vector never straddles a cache line
    wsp = p + PANEL_STEPS * 4 * MAX_ROWS * 4 * 32
    a0 = (p - pan.ctypes.data) // 4 + PANEL_STEPS * 4 * MAX_ROWS * 4 * 8 + PANEL_STEPS * MAX_ROWS * 8
    nst = din // STEP
    out, ostride = got.ctypes.data, got.strides[0] // 4
    for s0 in range(0, nst, PANEL_STEPS):
        ns = min(PANEL_STEPS, nst - s0)
        last = s0 + ns == nst
        x0, g0 = xp.ctypes.data + s0 * STEP * 2, s0 * 32
        d0, e0 = dgp.ctypes.data + g0, xsp.ctypes.data + g0
        o = 0
        while o < nrows:
            R = nrows - o if nrows - o in (2, 4) else ROWS          # 64 rows: 20 x 3, then 4
            acc = pan[a0 + n * 8 * o:a0 + n * 8 * (o + R)]          # this group's lane sums, [n][R][8]
            if s0 == 0:
                acc[:] = 0
            w0, s00 = w + o * wst + s0 * (STEP // 2), sc + o * sst + s0 * (STEP // 16)
            _unpack(R, w0, wst, s00, sst, ns, p, wsp)
            # the next group's panel (or the next panel's first group) into L1 while this one runs: the
            # unpacking waited on memory otherwise
            if o + R < nrows:
                nw, nsc = w0 + R * wst, s00 + R * sst
            else:
                nw, nsc = w + (s0 + ns) * (STEP // 2), sc + (s0 + ns) * (STEP // 16)
            for r in range(MAX_ROWS):
                for line in range(0, PANEL_STEPS * (STEP // 2), 64):
                    prefetch_l1_at(nw + r * wst + line)
                prefetch_l1_at(nsc + r * sst)
                prefetch_l1_at(nsc + r * sst + 64)
            t = 0
            while t < n:
                nxt = x0 + din * 2 * _load_i64(toks + 8 * min(t + TOKENS, n - 1))
                tb = TOKENS if n - t >= TOKENS else 1
                _dot(R, tb, p, wsp, ns, x0, din * 2, d0, din // 8, e0, toks + 8 * t, acc.ctypes.data + 32 * R * t,
                     nxt, out + 4 * (t * ostride + o), ostride, last)
                t += tb
            o += R
