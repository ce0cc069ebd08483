"""The default context: how many tokens the KV cache is planned for when nobody says (placement.plan with
context=None, the default of hybrid.load and of every command's --context). Owns only the rule and its
one-line reason; the planner hands it the plan's own numbers. Allocates nothing and imports nothing heavy
(`--help` shows DEFAULT_HELP).
"""
from __future__ import annotations

from hybrid.runtime.hardware import GB
from hybrid.runtime.options import DEFAULT_CONTEXT, KEEP_TOKENS, PAGE_SIZE

CONTEXTS = (131072, 65536, 32768, 16384, 8192, DEFAULT_CONTEXT)  # what the default may be, longest first
KV_SHARE = 0.10  # the most of its memory (the VRAM budget on CUDA, the RAM available on a CPU) the KV pages may take
COW_TOKENS = PAGE_SIZE  # one page beyond the context: a request copies the page where it leaves a shared prefix
DEFAULT_HELP = "from the plan: the longest of 4K-128K whose KV pages take <= 10% of RAM (CPU) or VRAM (GPU)"


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def default_context(kv_bytes_per_token: int, memory: int, where: str, max_positions: int, room: int,
                    kept: int = 0, room_for: str = "room for the rest of the plan") -> tuple[int, str]:
    """(context, why in one line): the longest of CONTEXTS, never past the model's max_positions, whose KV pages
    ((context + COW_TOKENS) x kv_bytes_per_token) take at most KV_SHARE of `memory` (named by `where`), and
    whose pages with the `kept` earlier conversations' (up to KEEP_TOKENS each) fit in `room`: the bytes they
    may take and still leave `room_for` what the plan gives it at the shortest context (on CUDA the GPU side's
    weights at the precision chosen first). At least min(4096, max_positions), the default before this rule.

    Why long by default: a reasoning model's answers and an agent's loops run to tens of thousands of tokens,
    which a 4096-token cache cuts off; and the KV cache is paged, so a long context costs time only for the
    pages a conversation fills (attention reads those, nothing more). Its memory is planned up front, hence the
    share: small enough that the weights and the experts keep theirs.
    """
    def pages(c: int) -> int:
        return (c + COW_TOKENS) * kv_bytes_per_token

    def fits(c: int) -> bool:
        return pages(c) <= KV_SHARE * memory and \
            (c + kept * min(c, KEEP_TOKENS) + COW_TOKENS) * kv_bytes_per_token <= room

    floor = min(DEFAULT_CONTEXT, max_positions)
    longer = [c for c in CONTEXTS if floor < c <= max_positions]
    context = next((c for c in longer if fits(c)), floor)
    above = [c for c in longer if c > context]
    if not above:
        why = "the longest default" if context == CONTEXTS[0] else f"the model's window is {max_positions:,}"
    elif pages(above[-1]) > KV_SHARE * memory:
        why = f"{above[-1]:,} would take {_gb(pages(above[-1]))}, over {KV_SHARE:.0%}"
    else:
        why = f"{above[-1]:,} would not leave {room_for}"
    return context, (f"context {context:,} from the plan: its KV pages take {_gb(pages(context))}, "
                     f"{pages(context) / max(1, memory):.1%} of the {_gb(memory)} {where}; {why} (--context sets it)")


def ram_room(left: int, routed_bytes: int, floor_pages: int, expert_mode: str, ram_budget: float | None,
             min_cache: int) -> tuple[int, str]:
    """(bytes, what they leave room for): the room a CPU plan's KV pages have in the `left` bytes of RAM that the
    reserve, the GPU side and the embedding leave: less every routed expert where the shortest context's pages
    (floor_pages) leave them all resident (mmap: a long context must not push them to the slot cache), else
    less --ram-budget where given, else less the expert cache's minimum (min_cache: the slots shrink instead)."""
    if expert_mode != "cache" and ram_budget is None and routed_bytes <= left - floor_pages:
        return left - routed_bytes, "every routed expert resident in RAM"
    if ram_budget is not None:
        return left - int(ram_budget * GB), "--ram-budget"
    return left - min_cache, "the expert cache's minimum"
