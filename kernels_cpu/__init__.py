"""CPU expert kernels: pure functions on arrays (Numba); import nothing from hybrid/."""
from kernels_cpu.moe import ExpertTable, moe_forward

__all__ = ["ExpertTable", "moe_forward"]
