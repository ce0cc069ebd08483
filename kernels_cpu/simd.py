"""Hand-written LLVM IR for the INT4 x INT16 row-block dot product (vpmaddwd or vpdpbusd, AVX2 or AVX-512BW).

Owns only the innermost loop: R weight rows x TB tokens over the whole input dimension, written
into a small fp32 result buffer. Row blocks, expert routing and threading live in moe.py.
Numba's vectoriser widens int32 arithmetic to int64 and never emits vpmaddwd, so the loop is
built directly as LLVM vector IR and inlined into the calling @njit function. L = int16 lanes per
vector: 16 (ymm, AVX2) or 32 (zmm, where AVX-512BW exists; see vector_lanes).

Weight row (compressed-tensors pack-quantized, read in place, any byte alignment):
  packed bytes [in/2]: as 16-bit words, word i of a chunk of 2L bytes holds columns 4i..4i+3 in
  its 4 nibbles (stored as q + 8, 0..15); scale bf16 [in/32]. A chunk = 4L columns = L/8 groups.
  Nibble k of the chunk's L words (shift 4k, mask 15) is one vector: lane i = column 4i + k.
Activations of one token (prepared by actq.quantize_rows, CHUNK = 4L):
  xa int16 [in]: xa[4L c + L k + i] = column 4L c + 4i + k (k < 4, i < L), so
  vpmaddwd(nibble k, xa[4L c + L k : +L]) gives int32 lane l = columns 8l + k and 8l + 4 + k:
  lanes 4g'..4g'+3 belong to group g' of the chunk.
  dg f32 [in/32]: group scale (x ~= xa * dg); xs f32 [in/32]: -8 * sum(xa over the group).
Per group g: dot = ws[g] * dg[g] * (sum(nibble * xa) + xs[g]), since (nibble - 8) * xa sums to
sum(nibble * xa) - 8 * sum(xa). Per chunk the int32 lanes stay below 8 * 15 * 32767 < 2**24, so
their conversion to fp32 is exact.

With VNNI (has_vnni) the products go through vpdpbusd instead: unsigned bytes x signed bytes, four
per int32 lane, added on. The weights need no widening (a nibble is already an unsigned byte: the
low nibbles of a chunk's 2L bytes are its even columns, the high ones its odd columns), so a chunk
costs 3 instructions to unpack instead of 7, and each code a = 256 h + l (l in [-128, 127]) goes in
as two signed bytes: lane = (sum(nibble * h) << 8) + sum(nibble * l), exact. The chunk's 8L bytes of
activations are then h of the even columns, h of the odd ones, l of the even, l of the odd (byte j
of each = column 2j, resp. 2j + 1), and codes stop at 32639 so that h fits a byte (actq.QMAX).
One K2 MoE layer, 2-core Xeon: prefill at 64 tokens per expert 166-183 -> 202-223 GFLOP/s; decode,
bandwidth-bound, about the same. Where the CPU also has GFNI, the high nibbles come out of one
vgf2p8affineqb instead of a shift and a mask: 8 rows from L2 34.7-38.6 -> 39.1-39.9 GB/s on a core, a
K2 MoE layer's decode from RAM 26.1-26.2 -> 26.4 GB/s (2 threads, two rounds).
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import config as numba_config
from numba.core import cgutils
from numba.extending import intrinsic

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
STEP_GROUPS = 8  # groups per main-loop step: 8 bf16 scales = one 16-byte load
# Software prefetch of the next PF_BLOCKS blocks of R rows (rows are contiguous in the checkpoint):
# a row is only 1-3.5 KB, too short for the hardware prefetchers to train on each 4 KB page. Into L2,
# not L1 (prefetcht1): on a 2-core Xeon (Sapphire Rapids class) an L1 prefetch holds one of the core's
# few L1 miss buffers for the whole DRAM latency, which capped a core near 10 GB/s; one K2 MoE layer
# decoded at 19.5 GB/s with 4 blocks into L1 and 22-23.5 with 2 into L2 (probe 33 GB/s).
PF_BLOCKS = 2
# One token's paired rows also prefetch L1_AHEAD bytes ahead in each row into L1 (prefetcht0): lines the
# L2 prefetch above fetched a few KB earlier, so the L1 miss buffer is held for an L2 hit, not the DRAM
# latency. Samples on the loop (perf, k2-slice) put a quarter of its time on the first use of each
# weight line, an L2 hit at best. moe_forward, one token, 8 of 48 experts, flushed, interleaved, 2-core
# Xeon, probe 30-31 GB/s: 22.2-22.5 -> 23.4-23.5 GB/s with 1 KB (+4.5-5.5%; 0.25 / 0.5 / 1.5 / 2 KB:
# +0.5 / +2.2 / +6.1 / +5.2%), the same output bits. 1 KB, not 1.5: a down row (K2: 1 KB) is prefetched
# into L2 only PF_BLOCKS rows (2 KB) ahead, and the L1 prefetch must trail that; half a row measured -5%.
# The int8 and bf16 GEMVs measured mixed (-10 to +7% by shape) with it and keep the L2 prefetch alone.
# A grid of PF_BLOCKS 1-3 x L1_AHEAD 0-3 KB for the paired rows: one token's moe_into alone, flushed,
# read up to 5% faster at (1 row, 2 KB), but k2-slice's decode in bench moved by under its noise
# (experts 28.5-29.1 -> 28.5-29.4 GB/s): the settings stay. One row a call in one stream (rows
# prefetched 4-8 KB ahead) measured -10% and worse; rows laid out as [packed | scales], one stream
# instead of a weight and a scale stream (a RAM copy), -5%; rows on cache lines or 8-32 bytes off
# them (the checkpoint's offsets): level. Each step's prefetches spread one a chunk instead of all at
# its top: the kernel alone over one long matrix +4-7%, moe_into +1%, bench's experts +1%: noise.
# Four chunks a step with each group's int32 sums added across lanes before one conversion (a quarter
# of the conversions and scale products, the shift by 8 as a byte shuffle off port 0): from L2 level
# (36 GB/s a core both), from RAM -5 to -9%. Activations read from a 2 KB window (wrong sums; a probe of
# the cause): level to -5%, where the int8 GEMV gained 5-7% (int8dot.py).
L1_AHEAD = 1024


@functools.lru_cache(maxsize=None)
def host_features() -> dict[str, bool]:
    """CPU features the kernels may use: numba's target (NUMBA_CPU_FEATURES if set) else the host.

    Setting NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma,... on an AVX-512 machine runs
    (and tests) the AVX2 path; numba keys its cache on the same setting, so nothing stale is reused.
    """
    if numba_config.CPU_FEATURES:
        on = {f[1:] for f in numba_config.CPU_FEATURES.split(",") if f.startswith("+")}
    else:
        on = {k for k, v in llvm_binding.get_host_cpu_features().items() if v}
    return {k: k in on for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni",
                                 "amx-tile", "amx-int8", "amx-bf16", "gfni")}


def host_has_avx2() -> bool:
    """The kernels use AVX2 instructions (vpmaddwd) through an LLVM x86 intrinsic."""
    f = host_features()
    return f["avx2"] and f["fma"]


def vector_lanes() -> int:
    """int16 lanes per vector: 32 (zmm) where AVX-512BW exists, else 16 (ymm).

    Fixed per process; the activation layout (actq.CHUNK) follows it.
    """
    f = host_features()
    return 32 if f["avx512f"] and f["avx512bw"] else 16


def has_vnni() -> bool:
    """vpdpbusd (u8 x s8, 4 products per int32 lane) at vector_lanes()' width: AVX512-VNNI for zmm;
    AVX-VNNI, or AVX512-VNNI with AVX512-VL, for ymm. Fixed per process, like the lanes."""
    f = host_features()
    if vector_lanes() == 32:
        return f["avx512vnni"]
    return f["avxvnni"] or (f["avx512vnni"] and f["avx512vl"])


def _prefetch(b: ir.IRBuilder, addr, locality: int) -> None:
    fn = cgutils.get_or_insert_function(
        b.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0")
    b.call(fn, [b.inttoptr(addr, I8.as_pointer()), ir.Constant(I32, 0), ir.Constant(I32, locality),
                ir.Constant(I32, 1)])


def prefetch_l2(b: ir.IRBuilder, addr) -> None:
    """Emit a prefetch of the cache line at addr (an i64 value) into L2 and below (rw=0, locality=2:
    prefetcht1 on x86, data): why L2 and not L1, see PF_BLOCKS. The int8 GEMV (int8dot) uses it too."""
    _prefetch(b, addr, 2)


def prefetch_l1(b: ir.IRBuilder, addr) -> None:
    """The same into L1 (locality=3: prefetcht0), for data wanted within microseconds (panel.py)."""
    _prefetch(b, addr, 3)


def _prefetch_at(emit):
    """An intrinsic f(addr) for @njit code: emit(b, addr) on the cache line at address addr (an integer)."""
    @intrinsic
    def at(typingctx, addr):
        def codegen(context, b, signature, args):
            emit(b, args[0])
            return context.get_dummy_value()

        return types.void(types.intp), codegen

    return at


prefetch_l2_at = _prefetch_at(prefetch_l2)  # prefetch_l2 for @njit code
prefetch_l1_at = _prefetch_at(prefetch_l1)  # prefetch_l1 for @njit code


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (rdtsc on x86) as an int64, for @njit code to split its time into parts
    (their shares of a wall-clock time measured outside: no calibration)."""
    def codegen(context, b, signature, args):
        fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
        return b.call(fn, [])

    return types.int64(), codegen


# vgf2p8affineqb's bit matrix for (byte >> 4) & 15: output bit i (i < 4) is input bit i + 4, the rest 0 (the
# matrix's byte 7 - i selects the input bits of output bit i). GFNI: Ice Lake, Sapphire Rapids, Zen 4 on.
_HIGH_NIBBLE = {L: ir.Constant(ir.VectorType(I64, L // 4), [ir.Constant(I64, 0x1020408000000000)] * (L // 4))
                for L in (16, 32)}


def hsum(b: ir.IRBuilder, v):
    """<n x float> (n a power of 2) -> the float sum of its lanes, a pairwise tree of halves: log2(n)
    shuffles and adds."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))))
        v = b.fadd(lo, hi)
    return b.extract_element(v, ir.Constant(I32, 0))


def _splat(ty: ir.VectorType, val) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, val)] * ty.count)


def _i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _load(b: ir.IRBuilder, addr, ty):
    return b.load(b.inttoptr(addr, ty.as_pointer()), align=1)


class _Emitter:
    """Builds one inlined R x TB kernel body; state is only the IR values of the current call.

    L int16 lanes per vector; a chunk = 2L bytes of one row = 4L columns = L/8 groups.
    """

    def __init__(self, b: ir.IRBuilder, R: int, TB: int, L: int, vnni: bool, paired: bool):
        self.b, self.R, self.TB, self.L, self.vnni, self.paired = b, R, TB, L, vnni, paired  # see make_rowblock_kernel
        self.CB, self.GPC = 2 * L, L // 8                      # chunk bytes, groups per chunk
        self.VW, self.VD, self.VF = ir.VectorType(I16, L), ir.VectorType(I32, L // 2), ir.VectorType(F32, L // 2)
        mod = b.module
        name = "llvm.x86.avx2.pmadd.wd" if L == 16 else "llvm.x86.avx512.pmaddw.d.512"
        self.maddwd = cgutils.get_or_insert_function(mod, ir.FunctionType(self.VD, [self.VW, self.VW]), name)
        self.fma = cgutils.get_or_insert_function(
            mod, ir.FunctionType(self.VF, [self.VF] * 3), f"llvm.fma.v{L // 2}f32")
        self.m0f = _splat(self.VW, 0x0F0F if vnni else 0x0F)
        if vnni:
            self.dpbusd = cgutils.get_or_insert_function(
                mod, ir.FunctionType(self.VD, [self.VD] * 3), f"llvm.x86.avx512.vpdpbusd.{16 * L}")

    def scales(self, addr, n: int):
        """n bf16 at addr -> <n x float> (bf16 bits << 16)."""
        b = self.b
        sv = _load(b, addr, ir.VectorType(I16, n))
        zero = ir.Constant(ir.VectorType(I16, n), None)
        # interleave (0, s): little-endian int32 lanes s << 16, one unpack instruction
        pairs = b.shuffle_vector(zero, sv, ir.Constant(ir.VectorType(I32, 2 * n),
                                                       [i // 2 + (n if i % 2 else 0) for i in range(2 * n)]))
        return b.bitcast(pairs, ir.VectorType(F32, n))

    def widen(self, v, n: int):
        """<n x float> -> <L/2 x float> padded with zeros (only the lanes' sum counts)."""
        b, m = self.b, self.L // 2                             # n <= STEP_GROUPS <= m
        if n == m:
            return v
        zero = ir.Constant(ir.VectorType(F32, n), None)
        return b.shuffle_vector(v, zero, ir.Constant(ir.VectorType(I32, m), [i if i < n else n for i in range(m)]))

    def _nibbles(self, wv):
        """One chunk of a weight row -> the vectors its products take.

        vpmaddwd: 4 vectors of L int16, nibble k of each word (lane i = column 4i + k).
        vpdpbusd: 2 vectors of 2L bytes as <L/2 x i32>, the low and the high nibble of each byte
        (byte j = column 2j, resp. 2j + 1).
        """
        b = self.b
        if self.vnni and host_features()["gfni"]:  # the high nibbles in one instruction instead of two
            VB = ir.VectorType(I8, 2 * self.L)
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(VB, [VB, VB, I8]),
                                                f"llvm.x86.vgf2p8affineqb.{16 * self.L}")
            hi = b.call(fn, [b.bitcast(wv, VB), b.bitcast(_HIGH_NIBBLE[self.L], VB), ir.Constant(I8, 0)])
            return [b.bitcast(b.and_(wv, self.m0f), self.VD), b.bitcast(hi, self.VD)]
        if self.vnni:
            return [b.bitcast(b.and_(wv if k == 0 else b.lshr(wv, _splat(self.VW, 4)), self.m0f), self.VD)
                    for k in range(2)]
        return [b.and_(wv if k == 0 else b.lshr(wv, _splat(self.VW, 4 * k)), self.m0f) for k in range(4)]

    def _chunk_dot(self, nib, xv):
        """int32 lane l = sum over columns 8l..8l+7 of the chunk of nibble * activation.

        vpdpbusd: xv = the high bytes of the even columns, of the odd ones, then the low bytes of
        the same (actq.quantize_row); a = 256 h + l, so the high products are shifted by 8 before
        the low ones are added on.
        """
        b = self.b
        if self.vnni:
            xb = [b.bitcast(v, self.VD) for v in xv]
            acc = b.call(self.dpbusd, [ir.Constant(self.VD, None), nib[0], xb[0]])
            acc = b.shl(b.call(self.dpbusd, [acc, nib[1], xb[1]]), _splat(self.VD, 8))
            return b.call(self.dpbusd, [b.call(self.dpbusd, [acc, nib[0], xb[2]]), nib[1], xb[3]])
        p = [b.call(self.maddwd, [nib[k], xv[k]]) for k in range(4)]
        return b.add(b.add(p[0], p[1]), b.add(p[2], p[3]))

    def step(self, accs, wrow, srow, xrow, grow, chunk, U: int):
        """U chunks starting at `chunk` (an i64 value); accs[r][t] are <L/2 x float> allocas."""
        b, R, TB, CB, GPC = self.b, self.R, self.TB, self.CB, self.GPC
        ng = GPC * U
        goff = b.mul(chunk, _i64(4 * GPC))                    # f32 per group
        if U * GPC == STEP_GROUPS and PF_BLOCKS and self.paired:
            # rows of different matrices: the same columns PF_BLOCKS rows on in each row's own matrix
            for r in range(R):
                wpos = b.add(b.add(wrow[r], self.wahead), b.mul(chunk, _i64(CB)))
                near = b.add(b.add(wrow[r], _i64(L1_AHEAD)), b.mul(chunk, _i64(CB)))
                for line in range(0, CB * U, 64):
                    prefetch_l2(b, b.add(wpos, _i64(line)))
                    prefetch_l1(b, b.add(near, _i64(line)))
                prefetch_l2(b, b.add(b.add(srow[r], self.sahead), b.mul(chunk, _i64(2 * GPC))))
        elif U * GPC == STEP_GROUPS and PF_BLOCKS:
            # this step consumes CB * U bytes of each of R rows: fetch as many of the block ahead
            wpos = b.add(self.wnext, b.mul(chunk, _i64(CB * R)))
            for line in range(0, CB * U * R, 64):
                prefetch_l2(b, b.add(wpos, _i64(line)))
            prefetch_l2(b, b.add(self.snext, b.mul(chunk, _i64(2 * GPC * R))))
        sdx = [[None] * TB for _ in range(R)]
        dgs = [_load(b, b.add(grow[t][0], goff), ir.VectorType(F32, ng)) for t in range(TB)]
        xss = [_load(b, b.add(grow[t][1], goff), ir.VectorType(F32, ng)) for t in range(TB)]
        xss = [self.widen(v, ng) for v in xss]
        for r in range(R):
            ws = self.scales(b.add(srow[r], b.mul(chunk, _i64(2 * GPC))), ng)
            for t in range(TB):
                sdx[r][t] = self.widen(b.fmul(ws, dgs[t]), ng)    # per-group ws * dg (padded)
                # the -8 offset: acc += ws * dg * xs, lane per group (only the lanes' sum counts)
                b.store(b.call(self.fma, [sdx[r][t], xss[t], b.load(accs[r][t])]), accs[r][t])
        for j in range(U):
            coff = b.mul(b.add(chunk, _i64(j)), _i64(CB))
            nibs = []                                             # see _nibbles
            for r in range(R):
                nibs.append(self._nibbles(_load(b, b.add(wrow[r], coff), self.VW)))
            sel = ir.Constant(ir.VectorType(I32, self.L // 2), [GPC * j + i // 4 for i in range(self.L // 2)])
            for t in range(TB):
                xoff = b.add(xrow[t], b.mul(coff, _i64(4)))     # 4L int16 (or 8L bytes) per chunk
                xv = [_load(b, b.add(xoff, _i64(CB * k)), self.VW) for k in range(4)]
                for r in range(R):
                    f = b.sitofp(self._chunk_dot(nibs[r], xv), self.VF)
                    sc = b.shuffle_vector(sdx[r][t], ir.Constant(sdx[r][t].type, None), sel)
                    b.store(b.call(self.fma, [f, sc, b.load(accs[r][t])]), accs[r][t])


def make_rowblock_kernel(R: int, TB: int, L: int, vnni: bool, paired: bool = False):
    """An intrinsic rowblock(w, wstride, s, sstride, nch, xa, dg, xs, toks, din, res, rstride) -> None.

    vnni: vpdpbusd over actq's byte layout, else vpmaddwd over its int16 one; pass actq.VNNI, which
    decides the layout the activations come in.

    w, s: addresses of the first weight row's packed bytes and bf16 scales; row r is at
    w + r * wstride, s + r * sstride (bytes). nch = din / (4L) chunks. xa int16 [N, din], dg, xs
    f32 [N, din/32]: activation rows, of which token t of this block is row toks[t] (int64 array
    address). res: f32 written as res[t * rstride + r] = dot(weight row r, token t).
    paired: the R rows lie in R different matrices (wstride, sstride: the distance between them, of
    either sign), each followed by its own next row, so the prefetch runs ahead in each; else the
    R rows are consecutive rows of one matrix and it runs ahead over the next blocks of R rows.
    """
    @intrinsic
    def rowblock(typingctx, w, wstride, s, sstride, nch, xa, dg, xs, toks, din, res, rstride):
        sig = types.void(*([types.intp] * 12))

        def codegen(context, b, signature, args):
            w, wstride, s, sstride, nch, xa, dg, xs, toks, din, res, rstride = args
            em = _Emitter(b, R, TB, L, vnni, paired)
            accs = [[cgutils.alloca_once_value(b, ir.Constant(em.VF, None)) for _ in range(TB)]
                    for _ in range(R)]
            wrow = [b.add(w, b.mul(_i64(r), wstride)) for r in range(R)]
            srow = [b.add(s, b.mul(_i64(r), sstride)) for r in range(R)]
            if paired:                                 # PF_BLOCKS rows on, added to each row's own address
                em.wahead = b.mul(_i64(PF_BLOCKS), b.udiv(din, _i64(2)))
                em.sahead = b.mul(_i64(PF_BLOCKS), b.udiv(din, _i64(16)))
            else:                                      # the block PF_BLOCKS blocks on
                em.wnext = b.add(w, b.mul(_i64(R * PF_BLOCKS), wstride))
                em.snext = b.add(s, b.mul(_i64(R * PF_BLOCKS), sstride))
            gbytes = b.mul(b.udiv(din, _i64(32)), _i64(4))
            xrow, grow = [], []
            for t in range(TB):
                tok = _load(b, b.add(toks, _i64(8 * t)), I64)
                xrow.append(b.add(xa, b.mul(tok, b.mul(din, _i64(2)))))
                grow.append((b.add(dg, b.mul(tok, gbytes)), b.add(xs, b.mul(tok, gbytes))))
            U = STEP_GROUPS // em.GPC
            nmain = b.udiv(nch, _i64(U))
            with cgutils.for_range(b, nmain) as loop:
                em.step(accs, wrow, srow, xrow, grow, b.mul(loop.index, _i64(U)), U)
            with cgutils.for_range(b, b.sub(nch, b.mul(nmain, _i64(U)))) as loop:
                em.step(accs, wrow, srow, xrow, grow, b.add(b.mul(nmain, _i64(U)), loop.index), 1)
            for r in range(R):
                for t in range(TB):
                    tot = hsum(b, b.load(accs[r][t]))
                    roff = b.mul(b.add(b.mul(_i64(t), rstride), _i64(r)), _i64(4))
                    b.store(tot, b.inttoptr(b.add(res, roff), F32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return rowblock
