"""ExpertTable: where one MoE layer's routed experts live (byte ranges in shared buffers), no copies.

Owns the description and its validation only; it never reads a file or computes anything.
The buffers are np.memmap views of checkpoint shards or RAM-cache arenas; the table stores
(arena, byte offset) per expert and tensor so the kernels read the on-disk layout in place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit

# Order of the 6 tensors in ExpertTable.loc[:, m]; names as in the compressed-tensors checkpoint.
PARTS = (
    "gate_proj.weight_packed", "gate_proj.weight_scale",
    "up_proj.weight_packed", "up_proj.weight_scale",
    "down_proj.weight_packed", "down_proj.weight_scale",
)
ALIGN = 64  # from_arrays places each tensor on a cache-line boundary


def part_shapes(hidden: int, inter: int, group: int) -> list[tuple[tuple[int, int], int]]:
    """(shape, itemsize) of the 6 parts: packed int32 [out, in/8], scale bf16 [out, in/group]."""
    D, I, G = hidden, inter, group
    return [((I, D // 8), 4), ((I, D // G), 2), ((I, D // 8), 4), ((I, D // G), 2),
            ((D, I // 8), 4), ((D, I // G), 2)]


@dataclass
class ExpertTable:
    """One layer's routed experts, located inside 1-D uint8 buffers.

    arenas: 1-D uint8 C-contiguous buffers (np.memmap of a shard file, or a RAM cache arena).
    loc:    int64 [E, 6, 2]: (arena index, byte offset) of gate.packed, gate.scale, up.packed,
            up.scale, down.packed, down.scale (order of PARTS). Each part is stored row-major:
            gate/up packed int32 [I, D/8], scale bf16 [I, D/G]; down packed int32 [D, I/8],
            scale bf16 [D, I/G]; packed column 8j+k sits in bits 4k..4k+3 of word j as q + 8.
    hidden, inter, group: D, I, G. The kernels need G == 32 and D, I multiples of 128.
    loc may be updated in place between calls (a RAM cache refilling a slot); moe_forward
    re-checks the byte ranges of the experts it is given on every call.
    """

    arenas: list[np.ndarray]
    loc: np.ndarray
    hidden: int
    inter: int
    group: int = 32

    def __post_init__(self) -> None:
        D, I, G = self.hidden, self.inter, self.group
        if G != 32 or D % 128 or I % 128:
            raise ValueError(f"ExpertTable: need group 32 and hidden, inter multiples of 128; "
                             f"got hidden={D} inter={I} group={G}")
        for i, a in enumerate(self.arenas):
            if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous:
                raise ValueError(f"ExpertTable: arena {i} must be a 1-D C-contiguous uint8 array "
                                 f"(np.memmap(path, np.uint8, 'r') or np.empty(n, np.uint8))")
        loc = self.loc
        if not isinstance(loc, np.ndarray) or loc.dtype != np.int64 or loc.ndim != 3 or loc.shape[1:] != (6, 2):
            raise ValueError("ExpertTable: loc must be an int64 array [E, 6, 2] of (arena, byte offset)")
        if not loc.flags.c_contiguous:
            raise ValueError("ExpertTable: loc must be C-contiguous (it is updated in place)")
        self.check_experts(np.arange(loc.shape[0]))

    @property
    def num_experts(self) -> int:
        return int(self.loc.shape[0])

    @property
    def part_nbytes(self) -> np.ndarray:
        """int64 [6]: bytes of each part of one expert."""
        return np.array([r * c * s for (r, c), s in part_shapes(self.hidden, self.inter, self.group)],
                        dtype=np.int64)

    @functools.cached_property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's six parts (asked once per MoE layer call: kept)."""
        return int(self.part_nbytes.sum())

    def arena_addresses(self) -> tuple[np.ndarray, np.ndarray]:
        """(int64 base address, int64 length) per arena, for the kernels."""
        base = np.array([a.ctypes.data for a in self.arenas], dtype=np.int64)
        size = np.array([a.shape[0] for a in self.arenas], dtype=np.int64)
        return base, size

    def check_experts(self, experts: np.ndarray) -> None:
        """Raise ValueError unless every part of the given experts (repeats allowed) lies inside its arena.

        A range past the end of a memory-mapped file would be a SIGBUS, not an exception. Checked in
        one Numba loop: a decode step asks once per MoE layer, with cold caches, where the NumPy
        form cost ~0.3 ms."""
        experts = np.ascontiguousarray(experts, dtype=np.int64).ravel()
        _, size = self.arena_addresses()
        nbytes = self.part_nbytes
        k = _first_bad(experts, self.loc, size, nbytes)
        if k < 0:
            return
        e = int(experts[k // len(PARTS)])
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}); got {e}")
        m = k % len(PARTS)
        arena, off = (int(v) for v in self.loc[e, m])
        if not 0 <= arena < len(self.arenas):
            raise ValueError(f"ExpertTable.loc names an arena outside 0..{len(self.arenas) - 1}")
        raise ValueError(f"expert {e} {PARTS[m]}: bytes {off}..{off + int(nbytes[m])} lie outside arena {arena} of "
                         f"{int(size[arena])} bytes")

    @classmethod
    def from_arrays(cls, experts: list[dict[str, np.ndarray]], hidden: int, inter: int,
                    group: int = 32) -> "ExpertTable":
        """Copy per-expert arrays (keys PARTS: packed int32, scale bf16 bits as uint16) into one arena.

        For tests and benchmarks; the engine builds tables over shard memmaps or cache arenas.
        """
        shapes = part_shapes(hidden, inter, group)
        E = len(experts)
        loc = np.zeros((E, 6, 2), dtype=np.int64)
        chunks, pos = [], 0
        for e, ex in enumerate(experts):
            for m, name in enumerate(PARTS):
                a = np.ascontiguousarray(ex[name])
                shape, itemsize = shapes[m]
                if a.shape != shape or a.dtype.itemsize != itemsize:
                    raise ValueError(f"expert {e} {name}: expected shape {shape} with {itemsize}-byte "
                                     f"items, got {a.shape} {a.dtype}")
                pos = -(-pos // ALIGN) * ALIGN
                loc[e, m] = (0, pos)
                chunks.append((pos, a.view(np.uint8).reshape(-1)))
                pos += a.nbytes
        arena = np.zeros(max(pos, 1), dtype=np.uint8)
        for p, raw in chunks:
            arena[p:p + raw.size] = raw
        return cls([arena], loc, hidden, inter, group)


@njit(nogil=True, cache=True)
def _first_bad(experts, loc, size, nbytes):
    # the first (expert index) * len(PARTS) + part whose id, arena or byte range is out of bounds; -1: none
    P = nbytes.shape[0]
    for j in range(experts.shape[0]):
        e = experts[j]
        if e < 0 or e >= loc.shape[0]:
            return j * P
        for m in range(P):
            a, off = loc[e, m, 0], loc[e, m, 1]
            if a < 0 or a >= size.shape[0] or off < 0 or off + nbytes[m] > size[a]:
                return j * P + m
    return -1
