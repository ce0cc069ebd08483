"""CPU kernels: pure functions on numpy arrays (Numba), with the layout in each docstring. moe (the fused
INT4 routed-expert MoE; simd its hand-written row-block dot product, actq the int16 activations, table the
expert address table), widen (bf16 / int8 GEMVs of the GPU side on a CPU), heads (absorbed MLA's
per-head products with kv_b_proj), workqueue (the threads' work split) and membw (the RAM read-bandwidth
kernel). Imports nothing from the project.
"""
from kernels_cpu.moe import ExpertTable, moe_forward

__all__ = ["ExpertTable", "moe_forward"]
