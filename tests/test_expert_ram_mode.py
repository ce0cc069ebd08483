"""ram mode: every routed expert copied into the process's own memory at load, on 2 MB pages
(hybrid/experts/ram_tables.py). The copy is checked against the shards as the safetensors library reads
them, its memory against /proc/self/smaps, and the engine over it against mmap mode's greedy tokens and
logits (the same kernels over the same bytes: equal)."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hybrid
from hybrid.checkpoint.host_memory import HUGE
from hybrid.checkpoint.layout import expert_prefix
from hybrid.checkpoint.reader import Checkpoint
from hybrid.runtime.hardware import Hardware
from hybrid.runtime.placement import PlanError, plan
from hybrid.checkpoint.config import ModelConfig
from kernels_cpu.simd import host_has_avx2
from kernels_cpu.table import PARTS

from tests.conftest import REAL_CONFIG

needs_avx2 = pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")


def _mapping(addr: int) -> tuple[str, list[str]]:
    """(the path or '' of this process's mapping that holds addr, its VmFlags), from /proc/self/smaps."""
    inside, path = False, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                inside, path = lo <= addr < hi, fields[5] if len(fields) > 5 else ""
            elif inside and fields[0] == "VmFlags:":
                return path, fields[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_ram_tables_hold_every_experts_bytes_as_the_shards_do(make_checkpoint):
    """Each part of each routed expert, read out of the copy, equals the tensor safetensors reads from the
    shard; each lies on a cache line of one arena a layer (experts enough for 3.5 MB: on huge pages), an
    arena of its own that is no shard's map."""
    from hybrid.experts.ram_tables import ram_tables

    path = make_checkpoint(n_routed_experts=32, moe_intermediate_size=512)
    ckpt = Checkpoint(path)
    tables = ram_tables(ckpt)
    assert sorted(tables) == list(ckpt.config.moe_layers)
    for layer, table in tables.items():
        assert len(table.arenas) == 1 and table.arenas[0].nbytes >= 3 << 20
        assert table.arenas[0].ctypes.data % HUGE == 0
        arena, nbytes = table.arenas[0], table.part_nbytes
        for e in range(table.num_experts):
            for m, part in enumerate(PARTS):
                proj, suffix = part.split(".")
                name = f"{expert_prefix(layer, e, proj)}.{suffix}"
                with safe_open(ckpt.info(name).file, "pt") as f:
                    want = f.get_tensor(name).contiguous().view(torch.uint8).numpy().ravel()
                a, off = (int(v) for v in table.loc[e, m])
                assert a == 0 and off % 64 == 0
                np.testing.assert_array_equal(arena[off:off + int(nbytes[m])], want, err_msg=name)
    if os.path.exists("/proc/self/smaps"):
        shards = {str(p) for p in Path(path).glob("*.safetensors")}
        for table in tables.values():
            path, flags = _mapping(table.arenas[0].ctypes.data)
            assert path not in shards and not path.endswith(".safetensors")
            thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
            if hasattr(mmap, "MADV_HUGEPAGE") and thp.exists() and "[never]" not in thp.read_text():
                assert "hg" in flags  # advised for transparent huge pages


def test_ram_tables_copy_only_the_experts_held(tiny_path):
    """An expert node's share (held): only those experts copied, each as the shard holds it; the others point
    at a copied expert of their layer (never computed), a layer holding none at its expert 0's copy."""
    from hybrid.experts.ram_tables import ram_tables

    ckpt = Checkpoint(tiny_path)
    cfg = ckpt.config
    full = ram_tables(ckpt)
    held = np.zeros((len(cfg.moe_layers), cfg.n_routed_experts), bool)
    held[0, [3, 5, 11]] = True  # the last MoE layer holds none
    part = ram_tables(ckpt, held)
    for i, layer in enumerate(cfg.moe_layers):
        f, p = full[layer], part[layer]
        per = f.arenas[0].nbytes // cfg.n_routed_experts
        assert p.arenas[0].nbytes == per * max(1, int(held[i].sum()))
        nbytes = p.part_nbytes
        for e in range(cfg.n_routed_experts):
            want = e if held[i, e] else (3 if i == 0 else 0)
            for m in range(len(PARTS)):
                got = p.arenas[0][p.loc[e, m, 1]:p.loc[e, m, 1] + nbytes[m]]
                np.testing.assert_array_equal(got, f.arenas[0][f.loc[want, m, 1]:f.loc[want, m, 1] + nbytes[m]])



def test_copy_share_copies_the_heads_share_and_leaves_the_rest_in_the_maps(tiny_path):
    """The head's share: copy_share swaps a backend's own dict of mmap tables in place for tables whose held
    experts are copied as the shard holds them, on one arena a layer, and every other expert where mmap mode
    reads it (the same address in the same shard map), a layer holding none too."""
    from hybrid.experts.mmap_tables import mmap_tables
    from hybrid.experts.ram_tables import copy_share

    ckpt = Checkpoint(tiny_path)
    cfg = ckpt.config
    mapped = mmap_tables(ckpt)
    held = np.zeros((len(cfg.moe_layers), cfg.n_routed_experts), bool)
    held[0, [2, 9]] = True  # the last MoE layer holds none
    tables = dict(mapped)
    kept = tables
    copy_share(tables, held)
    assert tables is kept and all(tables[layer] is not mapped[layer] for layer in cfg.moe_layers)
    for i, layer in enumerate(cfg.moe_layers):
        t, m = tables[layer], mapped[layer]
        base, _ = t.arena_addresses()
        mbase, _ = m.arena_addresses()
        nbytes = t.part_nbytes
        for e in range(cfg.n_routed_experts):
            for k in range(len(PARTS)):
                a, off = (int(v) for v in t.loc[e, k])
                ma, moff = (int(v) for v in m.loc[e, k])
                want = m.arenas[ma][moff:moff + nbytes[k]]
                np.testing.assert_array_equal(t.arenas[a][off:off + nbytes[k]], want)
                if held[i, e]:
                    assert a == 0  # the copy
                else:
                    assert a >= 1 and base[a] + off == mbase[ma] + moff  # the map, in place
        t.check_experts(np.arange(cfg.n_routed_experts))


@needs_avx2
def test_ram_mode_decodes_what_mmap_mode_decodes(tiny_path):
    """The engine in ram mode: the plan says so, the tables are the copy's, and greedy decode gives mmap
    mode's tokens and logits exactly (the same kernels over the same bytes)."""
    prompt = [5, 17, 3, 99, 42, 7, 11]
    runs = {}
    for mode in ("mmap", "ram"):
        eng = hybrid.load(tiny_path, backend="numba", device="cpu", expert_mode=mode, decode_graphs="off")
        try:
            assert eng.plan.expert_mode == mode and f"routed experts: {mode}, all resident" in eng.plan.summary()
            if os.path.exists("/proc/self/smaps"):  # ram mode's arenas are no shard's map; mmap mode's are
                arenas = [a for t in eng.model.experts.mapped_tables.values() for a in t.arenas]
                assert {_mapping(a.ctypes.data)[0].endswith(".safetensors") for a in arenas} == {mode == "mmap"}
            toks = [s.token for s in eng.generate(prompt, 12, temperature=0.0)]
            with torch.inference_mode():  # the prompt's logits (prefill), then a decode step a token
                cache = eng.model.new_cache(32)
                rows = [eng.model.forward(torch.tensor(prompt), cache)]
                rows += [eng.model.forward(torch.tensor([t]), cache) for t in toks[:6]]
            runs[mode] = (toks, torch.cat(rows))
        finally:
            eng.close()
    assert runs["ram"][0] == runs["mmap"][0] and len(runs["ram"][0]) == 12
    assert runs["ram"][1].shape == (len(prompt) + 6, eng.config.vocab_size)
    assert torch.equal(runs["ram"][1], runs["mmap"][1])


def test_ram_mode_plans_as_mmap_mode_and_names_itself_when_refused(tiny_path):
    """ram mode holds what mmap mode holds (every routed expert, resident): the same bytes in the plan, its
    own name on the row and in the refusal where they do not fit; the reference backend refuses it."""
    k2 = ModelConfig.from_file(REAL_CONFIG)
    big = Hardware.hypothetical(768, cores=32)
    m, r = plan(k2, big, context=8192, expert_mode="mmap"), plan(k2, big, context=8192, expert_mode="ram")
    assert (r.expert_mode, r.cache_slots, r.ram_bytes, r.ram_budget) == ("ram", 0, m.ram_bytes, m.ram_budget)
    row = r.entry("routed_experts")
    assert (row.where, row.nbytes) == ("ram", m.entry("routed_experts").nbytes) and "copied at load" in row.detail
    assert plan(k2, big, context=8192).expert_mode == "mmap"  # auto leaves the page cache's way as it was
    with pytest.raises(PlanError, match="--expert-mode ram needs all routed experts") as ei:
        plan(k2, Hardware.hypothetical(128, [24]), context=8192, expert_mode="ram")
    assert ei.value.budget == "RAM"
    with pytest.raises(ValueError, match="expert_mode='cache' or 'ram'"):
        hybrid.load(tiny_path, backend="reference", expert_mode="ram")
