"""The work split of the parallel CPU kernels (moe_forward, the widening GEMVs): a shared queue of items.

Owns handing out work items to Numba's threads: each thread walks its own contiguous share in order
(one memory stream per thread, like a static split) and, once done, takes items from the others' (a
core busy elsewhere then holds back nobody). Pure Numba functions; imports nothing from hybrid/.

Other splits of one token's routed experts, measured against moe.moe_into's (k2-slice's mapped experts, 8 of 48
a layer, each call after a 512 MB read, 37-42 calls a variant interleaved in one process, the same output bits):
whole experts a thread (gate and up, SiLU, down, no barrier between): 25.7 against 25.9 GB/s; both threads in
the same expert at once, each in its half of the rows (as the in-place read moves): 25.7 against 26.5 (and a
few calls far slower); the down projection in items of 128-512 rows instead of 64 (its streams restarting less
often): +0.8% on its own copy, 28.0 against 27.8. None kept.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def fetch_add(typingctx, addr, val):
    """Atomic *(int64 *)addr += val, returning the old value."""
    sig = types.int64(types.intp, types.int64)

    def codegen(context, b, signature, args):
        return b.atomic_rmw("add", b.inttoptr(args[0], ir.IntType(64).as_pointer()), args[1], "monotonic")

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def new_queue(nt):
    """The counters of a queue for nt threads: int64 [8 * nt], counter k at [8 * k] (one cache line each)."""
    return np.zeros(8 * nt, np.int64)


@njit(nogil=True, cache=True)
def take(queue, n, th, nt):
    """Next item for thread th of nt over items 0..n-1, or n when all are taken.

    Thread th owns the contiguous range [th * n // nt, (th + 1) * n // nt) and walks it in order;
    a thread that has finished its own range takes items from the others'. queue: new_queue(nt),
    used for one pass over the items.
    """
    for k in range(nt):
        owner = (th + k) % nt
        lo, hi = owner * n // nt, (owner + 1) * n // nt
        if lo + queue[8 * owner] < hi:
            i = lo + fetch_add(queue.ctypes.data + 64 * owner, 1)
            if i < hi:
                return i
    return n
