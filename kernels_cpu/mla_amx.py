"""AMX bf16 tiles for the MLA page walk (mla.py), exact to fp32's summation as amx_gemm's products are.

Owns usable (whether the walk may use them here), pack_queries (a token's queries as tdpbf16ps' B tiles, each
fp32 value split into three bf16 parts: x1 = bf16(x), x2 = bf16(x - x1), x3 = bf16(x - x1 - x2)),
score_block (a page's scores for 16 heads, read from its bf16 rows in place), split_weights (the softmax
weights of a page, likewise three bf16 parts), pair_page (a page's latent rows in pair layout) and
value_block (the value sums of 16 heads += a page's weights . its latent rows). A cached row is bf16, so
each product of a row value and a part is exact in fp32 and tdpbf16ps sums them in fp32: scores and value
sums are the fp32 tiles' up to the order of their sums (amx_gemm.split3). Tiles (amx_gemm.tile_config: all 16
rows x 64 bytes). Scores: 0-3 the fp32 scores of four blocks of 16 positions x 16 heads, 4 the block of page
rows (32 columns of the latent and rope parts, the pool's row stride), 5-7 the three parts of the queries'
32 columns in pair layout (row kk: columns 2kk and 2kk + 1 of each of the 16 heads). Values: 0 the sums of 16 heads x 16
latent columns, 1 the page's rows 2kk and 2kk + 1 of those columns in pair layout, 2-4 the three parts of
the 16 heads' weights for the block's 32 positions.
Why: past a few hundred positions a decode step's attention is arithmetic, not bytes (mla.py): the fp32
tiles take 576 + 512 FMA lanes a position and head; a tile product takes 32 x 16 x 16 in one instruction.
Pure functions on arrays and addresses; imports nothing from hybrid/.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.amx import TileOps, available, compiles_bf16
from kernels_cpu.amx_gemm import pair, split3
from kernels_cpu.simd import I16, I32, I64

HEADS = 16  # heads a score tile holds
KSTEP = 32  # columns of a page row a tile product takes
BLOCK = 16  # positions a score tile holds
BLOCKS = 4  # score tiles a call fills: 64 positions


def usable(pool) -> bool:
    """Whether the walk may take the tiles over a layer's page pool [N, PG, W] (a numpy array): bf16 rows, whole
    tiles of columns and positions, and AMX's bf16 tiles granted to this process (amx.available). A thread
    also needs whole tiles of heads (mla.decode_into checks its own)."""
    return pool.itemsize == 2 and pool.shape[2] % KSTEP == 0 and pool.shape[1] % BLOCK == 0 and available(bf16=True)


@njit(nogil=True, cache=True)
def pack_queries(qt, nh, qb):
    """qt f32 [W, NH] (a token's queries, a column a head, as mla._heads builds them) -> qb uint32 [nh / 16,
    W / 32, 3, 16, 16]: for head group g and step j, part s's B tile (row kk: the bf16 pair of rows 32 j +
    2 kk and 32 j + 2 kk + 1 of column 16 g + n, low half first)."""
    for g in range(nh // HEADS):
        for j in range(qt.shape[0] // KSTEP):
            for kk in range(16):
                r = KSTEP * j + 2 * kk
                for n in range(HEADS):
                    a1, a2, a3 = split3(qt[r, HEADS * g + n])
                    b1, b2, b3 = split3(qt[r + 1, HEADS * g + n])
                    qb[g, j, 0, kk, n] = pair(a1, b1)
                    qb[g, j, 1, kk, n] = pair(a2, b2)
                    qb[g, j, 2, kk, n] = pair(a3, b3)


@intrinsic
def score_block(typingctx, cfg, rows, rowstride, nblk, nk, qb, st, ststride):
    """st f32 (row stride ststride bytes): rows 16 b.. 16 b + 15, 16 heads from st's address, = the page rows
    at `rows` (bf16, row stride rowstride bytes; nk steps of 32 columns) . the queries of one head group (qb:
    pack_queries' [nk, 3, 16, 16] for it), for the nblk (1-4) blocks b of 16 rows. Addresses."""
    sig = types.void(*([types.intp] * 8))

    def codegen(context, b, signature, args):
        if not compiles_bf16():  # a target without AMX's bf16 tiles: never called there (usable)
            return context.get_dummy_value()
        cfg, rows, rowstride, nblk, nk, qb, st, ststride = args
        t = TileOps(b, "tdpbf16ps")
        c64 = ir.Constant(I64, 64)
        t.ldcfg(cfg)
        for c in range(BLOCKS):
            t.zero(c)
        with cgutils.for_range(b, nk) as loop:
            k = loop.index
            qk = b.add(qb, b.mul(k, ir.Constant(I64, 3 * 1024)))
            for s in range(3):
                t.load(5 + s, b.add(qk, ir.Constant(I64, 1024 * s)), c64)
            for c in range(BLOCKS):
                with b.if_then(b.icmp_signed(">", nblk, ir.Constant(I64, c))):
                    at = b.add(b.add(rows, b.mul(ir.Constant(I64, BLOCK * c), rowstride)), b.mul(k, c64))
                    t.load(4, at, rowstride)
                    for s in range(3):
                        t.dp(c, 4, 5 + s)
        for c in range(BLOCKS):
            with b.if_then(b.icmp_signed(">", nblk, ir.Constant(I64, c))):
                t.store(c, b.add(st, b.mul(ir.Constant(I64, BLOCK * c), ststride)), ststride)
        t.release()
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def split_weights(sc, n, j, pa):
    """The weights sc f32 [4, *] of heads j..j+3 over a page's n positions -> pa uint16 [3, nh, PGp] rows j..j+3:
    their three bf16 parts, zero past n."""
    for c in range(4):
        for r in range(n):
            pa[0, j + c, r], pa[1, j + c, r], pa[2, j + c, r] = split3(sc[c, r])
        for s in range(3):
            for r in range(n, pa.shape[2]):
                pa[s, j + c, r] = 0


@intrinsic
def _interleave(typingctx, a, c, dst, ng):
    """For g < ng: the 64 bytes at dst + 1024 g = the 16 bf16 values at a + 32 g and those at c + 32 g, one of
    each in turn (tdpbf16ps' pair layout for one row of a B tile). Addresses."""
    sig = types.void(*([types.intp] * 4))

    def codegen(context, b, signature, args):
        a, c, dst, ng = args
        half, whole = ir.VectorType(I16, 16), ir.VectorType(I16, 32)
        mask = ir.Constant(ir.VectorType(I32, 32), [k // 2 + 16 * (k % 2) for k in range(32)])
        with cgutils.for_range(b, ng) as loop:
            g = loop.index
            off = b.mul(g, ir.Constant(I64, 32))
            va = b.load(b.inttoptr(b.add(a, off), half.as_pointer()), align=2)
            vc = b.load(b.inttoptr(b.add(c, off), half.as_pointer()), align=2)
            out = b.inttoptr(b.add(dst, b.mul(g, ir.Constant(I64, 1024))), whole.as_pointer())
            b.store(b.shuffle_vector(va, vc, mask), out, align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def pair_page(rows, n, vb, zero):
    """A page's rows (uint16 bf16 bits [PG, W], the first n written) -> vb uint16 [PGp / 32, L / 16, 16, 16, 2]:
    for each block of 32 positions and 16 latent columns, row kk holds rows 2kk and 2kk + 1 column by column
    (rows past n: zero, uint16 [>= L] of zeros)."""
    ng = vb.shape[1]
    at, stride = rows.ctypes.data, rows.strides[0]
    for b in range(vb.shape[0]):
        for kk in range(16):
            r = 32 * b + 2 * kk
            _interleave(at + r * stride if r < n else zero.ctypes.data,
                        at + (r + 1) * stride if r + 1 < n else zero.ctypes.data,
                        vb.ctypes.data + 64 * (16 * ng * b + kk), ng)


@intrinsic
def value_block(typingctx, cfg, pa, psplit, pstride, vb, nb, ng, acc, astride):
    """acc f32 (row stride astride bytes; 16 heads x 16 ng columns from its address) += the weights of those
    heads (pa: split_weights' part 0 for them, row stride pstride, parts psplit bytes apart) . the page's
    latent rows (vb: pair_page's, nb blocks of 32 positions x ng groups of 16 columns). Addresses."""
    sig = types.void(*([types.intp] * 9))

    def codegen(context, b, signature, args):
        if not compiles_bf16():
            return context.get_dummy_value()
        cfg, pa, psplit, pstride, vb, nb, ng, acc, astride = args
        t = TileOps(b, "tdpbf16ps")
        c64 = ir.Constant(I64, 64)
        t.ldcfg(cfg)
        with cgutils.for_range(b, ng) as groups:
            g = groups.index
            at = b.add(acc, b.mul(g, c64))
            t.load(0, at, astride)
            with cgutils.for_range(b, nb) as blocks:
                k = blocks.index
                t.load(1, b.add(vb, b.mul(b.add(b.mul(k, ng), g), ir.Constant(I64, 1024))), c64)
                for s in range(3):
                    t.load(2 + s, b.add(b.add(pa, b.mul(ir.Constant(I64, s), psplit)), b.mul(k, c64)), pstride)
                    t.dp(0, 2 + s, 1)
            t.store(0, at, astride)
        t.release()
        return context.get_dummy_value()

    return sig, codegen
