"""CPU kernels: pure functions on numpy arrays (Numba), with the layout in each docstring. moe (the fused
INT4 routed-expert MoE; simd its hand-written row-block dot product, actq the int16 activations, table the
expert address table), widen (bf16 / int8 GEMVs of the GPU side on a CPU), heads (absorbed MLA's
per-head products with kv_b_proj), workqueue (the threads' work split), membw (the RAM read-bandwidth
kernels and the probe that times them) and cachestamp (Numba's cache dropped where the package's
sources changed). Imports nothing from the project.

Compile time: a helper with real work in it (a row loop, a kernel call) is a plain @njit function, not
inline="always". Numba inlines those by copying the callee's IR into every call site before typing it
again, and LLVM inlines across @njit calls anyway where it pays: a tiny engine's first run compiled in
99 s with the expert, MLA and GEMV helpers inlined, 58 s without (moe_into alone 45 -> 21 s), the same
bits at the same speed (2-core Xeon). inline="always" is kept for one-liners and for overloads.
"""
from pathlib import Path

from kernels_cpu import cachestamp, membw

# before any kernel loads from Numba's cache (at its first call): see cachestamp
if (_cache := getattr(getattr(membw.read_sum, "_cache", None), "_cache_path", None)) is not None:
    cachestamp.refresh(Path(__file__).parent, Path(_cache))

from kernels_cpu.moe import ExpertTable, moe_forward  # noqa: E402  (after the refresh, on purpose)

__all__ = ["ExpertTable", "moe_forward"]
