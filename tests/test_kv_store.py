"""The paged KV store: the gather kernel against numpy, the prefix tree's reuse and copy-on-write,
eviction within the pool, the host tier, the disk tier across a restart, and interleaved
conversations that prefill only what is new, each checked against a fresh engine's logits."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import hybrid
from hybrid.model.paged import Pages, PagePool, PoolFull
from hybrid.runtime.engine import Engine
from hybrid.runtime.kv_store import KVSizes, KVStore
from hybrid.runtime.prefix_tree import PrefixTree
from hybrid.checkpoint.reader import Checkpoint
from hybrid.experts.reference import ReferenceExperts
from kernels_cpu.paged import gather_rows

P = 64


# ---- the kernel --------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [True, False])
def test_gather_rows_matches_numpy_across_both_pools(bf16):
    rng = np.random.default_rng(0)
    main32, spill32 = rng.standard_normal((5, 8, 12), np.float32), rng.standard_normal((3, 8, 12), np.float32)
    if bf16:  # the bits of the values rounded to bf16, and those values widened as the reference
        main = (torch.from_numpy(main32).bfloat16().view(torch.int16).numpy().view(np.uint16))
        spill = (torch.from_numpy(spill32).bfloat16().view(torch.int16).numpy().view(np.uint16))
        main32 = torch.from_numpy(main32).bfloat16().float().numpy()
        spill32 = torch.from_numpy(spill32).bfloat16().float().numpy()
    else:
        main, spill = main32, spill32
    table = np.array([3, -2, 0, -1, 4], np.int32)  # main 3, spill 1, main 0, spill 0, main 4
    want = np.concatenate([main32[e] if e >= 0 else spill32[-1 - e] for e in table])[:37]
    for par in (True, False):
        out = np.full((40, 12), np.nan, np.float32)
        got = gather_rows(main, spill, table, 37, out, par)
        assert got.shape == (37, 12) and np.array_equal(got, want)
    with pytest.raises(ValueError, match="outside the pools"):
        gather_rows(main, spill, np.array([5], np.int32), 3, np.zeros((3, 12), np.float32))


@pytest.mark.parametrize("T, S, block", [(1, 300, 128), (3, 300, 128), (2, 100, 4096)])
def test_paged_attention_matches_the_contiguous_kernel(monkeypatch, T, S, block):
    """PagedKVCache.attend on a CPU (pages gathered block by block, some from the spill pool, the softmax
    over every block at once, causal for T > 1) against kernels_gpu.mla over the same rows contiguous."""
    from hybrid.model import paged
    from hybrid.model.paged import PagedKVCache
    from kernels_gpu.mla import mla_decode

    monkeypatch.setattr(paged, "ATTEND_BLOCK", block)
    H, L, R, page = 4, 16, 8, 32
    main, spill = PagePool(1, 12, page, L + R, "cpu", torch.float32), PagePool(1, 4, page, L + R, "cpu", torch.float32)
    store = Pages(main, spill)
    cache = PagedKVCache(store, 1, L, 12 * page, main.alloc, torch.float32)
    cache.prepare(0, S)
    for k in (0, 2):  # two pages in the spill pool
        h = spill.alloc()
        store.copy(cache.pages[k], -1 - h, page)
        store.decref(cache.pages[k])
        cache.pages[k] = -1 - h
    cache.set_pages(cache.pages, 0)
    g = torch.Generator().manual_seed(T)
    rows = torch.randn(S, L + R, generator=g)
    cache.write(0, 0, rows[:, :L], rows[:, L:])
    q_lat, q_pe = torch.randn(T, H, L, generator=g), torch.randn(T, H, R, generator=g)
    want = mla_decode(q_lat, q_pe, rows[:, :L], rows[:, L:], None, None, 0.3, S - T, absorbed=True)
    got = cache.attend(0, S, q_lat, q_pe, 0.3, S - T)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    out = np.zeros((S - 64, L + R), np.float32)  # a gather from a page boundary on
    assert np.array_equal(gather_rows(main.data[0].numpy(), spill.data[0].numpy(), cache.table, S, out, start=64),
                          rows[64:].numpy())


# ---- the tree over pools ---------------------------------------------------------------------
def _tree(pages: int = 8, page: int = 4) -> tuple[Pages, PrefixTree]:
    pool = PagePool(1, pages, page, 2, "cpu", torch.float32)
    store = Pages(pool)
    return store, PrefixTree(page, store.incref, store.decref)


def test_tree_matches_the_longest_prefix_of_any_earlier_sequence():
    store, tree = _tree()
    a = [store.main.alloc() for _ in range(3)]  # 10 tokens: pages of 4, 4, 2
    tree.insert(list(range(10)), a)
    b = [store.main.alloc() for _ in range(2)]
    tree.insert([0, 1, 2, 3, 9, 9, 9], [a[0], b[1]])  # shares the first page, diverges in the second
    m = tree.match([0, 1, 2, 3, 4, 5, 7])
    assert [n.page for n in m.full] == [a[0]] and m.partial.page == a[1] and m.rows == 2 and m.tokens == 6
    m = tree.match([0, 1, 2, 3, 9, 9, 9, 9])
    assert m.full == [a[0]] or [n.page for n in m.full] == [a[0]]
    assert m.partial.page == b[1] and m.rows == 3
    m = tree.match(list(range(10)) + [11])
    assert [n.page for n in m.full] == a[:2] and m.partial.page == a[2] and m.rows == 2
    assert tree.match([5, 6]).tokens == 0
    # a page held by the tree and by its sequence: two references; the tree's go with the leaves
    assert store.refs(a[0]) == 2 and store.refs(b[1]) == 2


def test_partial_page_superseded_by_its_extension_is_dropped():
    store, tree = _tree()
    p1 = store.main.alloc()
    tree.insert([1, 2], [p1])
    store.decref(p1)  # only the tree holds it now
    p2 = store.main.alloc()
    tree.insert([1, 2, 3], [p2])
    assert tree.nodes == 1 and store.refs(p1) == 0 and store.main.free == 7  # p1 went back to the pool


def test_engine_copies_the_page_where_two_conversations_diverge(tiny_path):
    """B shares A's first 100 tokens: B reuses A's first page, copies the second (diverging at 36 of 64)
    and never writes A's; A then continues exactly as a fresh engine would."""
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=512, decode_graphs="off")
    a = list(range(3, 140))
    b = a[:100] + list(range(500, 540))
    list(eng.generate(a, 2, sampler=lambda lg: 7))
    a_pages = list(eng._cache.pages)
    steps = list(eng.generate(b, 2, sampler=lambda lg: 7))
    assert steps[0].prefill_tokens == len(b) - 100
    assert eng._cache.pages[0] == a_pages[0] and eng._cache.pages[1] != a_pages[1]
    got, want = [], []
    steps = list(eng.generate(a + [7, 7, 9], 3, sampler=lambda lg: (got.append(lg.clone()), 7)[1]))
    assert steps[0].prefill_tokens == 2  # a + its two answers were kept; the last of them and 9 are new
    fresh = hybrid.load(tiny_path, backend="reference", device="cpu", context=512, decode_graphs="off")
    list(fresh.generate(a + [7, 7, 9], 3, sampler=lambda lg: (want.append(lg.clone()), 7)[1]))
    for x, y in zip(got, want):
        assert float((x - y).abs().max()) < 1e-4
    eng.close()
    fresh.close()


# ---- the pools' bounds, the host tier ------------------------------------------------------------
def _engine(tiny_path, sizes: KVSizes, context: int, disk=None) -> Engine:
    ckpt = Checkpoint(tiny_path)
    cfg = ckpt.config
    kv = KVStore(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, context, sizes, "cpu",
                 torch.bfloat16, torch.float32, disk)
    return Engine(ckpt, ReferenceExperts(ckpt), context=context, kv=kv)


def test_eviction_keeps_the_pool_within_its_pages(tiny_path):
    """Six conversations through a pool of 6 pages (two conversations' worth): the least recently used
    prefixes go, the pool's page count never changes, every reference is accounted for, output stays a
    fresh engine's, and a prompt longer than the pool fails with what to raise."""
    eng = _engine(tiny_path, KVSizes(P, 6), 512)
    fresh = hybrid.load(tiny_path, backend="reference", device="cpu", context=512, decode_graphs="off")
    convs = [list(range(10 + 7 * c, 10 + 7 * c + 150)) for c in range(6)]
    for turn in range(2):
        for c in convs:
            list(eng.generate(c, 1, sampler=lambda lg: 7))
            kv = eng.stats()["kv"]
            main = eng._kv.pages.main
            assert kv["pages"] == 6 and 0 <= kv["pages_free"] <= 6 and main.data.shape[1] == 6
            assert int(main.refs.sum()) == len(eng._cache.pages) + eng._kv.tree.nodes  # nothing leaks
    assert eng.stats()["kv"]["evicted_pages"] > 0
    got, want = [], []
    list(eng.generate(convs[0] + [7, 8], 2, sampler=lambda lg: (got.append(lg.clone()), 7)[1]))
    list(fresh.generate(convs[0] + [7, 8], 2, sampler=lambda lg: (want.append(lg.clone()), 7)[1]))
    assert all(float((x - y).abs().max()) < 1e-4 for x, y in zip(got, want))
    with pytest.raises(PoolFull, match="KV cache is full"):
        list(eng.generate(list(range(5, 5 + 6 * P + 10)), 1, sampler=lambda lg: 7))
    eng.close()
    fresh.close()


def test_host_tier_holds_most_of_the_sequence_with_identical_tokens(tiny_path):
    """A main pool of 2 pages for a 500-token sequence: three quarters of its pages move to the host
    tier as it grows, and greedy decoding gives the tokens of an engine that keeps them all."""
    prompt = list(range(20, 300))
    spilling = _engine(tiny_path, KVSizes(P, 2, 8), 512)
    roomy = _engine(tiny_path, KVSizes(P, 16), 512)
    greedy = lambda lg: int(lg.argmax())  # noqa: E731
    a = [s.token for s in spilling.generate(prompt, 200, sampler=greedy)]
    b = [s.token for s in roomy.generate(prompt, 200, sampler=greedy)]
    kv = spilling.stats()["kv"]
    n_pages = -(-(len(prompt) + 199) // P)
    assert a == b and kv["spilled_now"] == n_pages - 2 and kv["spilled_now"] / n_pages >= 0.75
    spilling.close()
    roomy.close()


def test_fused_decode_attention_equals_the_separate_steps(tiny_path, monkeypatch):
    """A CPU decode step's attention block in one Numba call (model/cpu_step.py, kernels_cpu.attn_step)
    gives the logits of the MLA alone in one call (PagedKVCache.decode_attention, kernels_cpu.mla) bit
    for bit, and both those of the separate steps (write, then the gathered GEMMs of attend), across page
    boundaries and with pages in the host tier; and each is what runs (its calls are counted)."""
    from hybrid.model import cpu_step
    from hybrid.model.paged import PagedKVCache

    prompt, greedy = list(range(20, 120)), (lambda out: lambda lg: (out.append(lg.clone()), int(lg.argmax()))[1])

    def run(calls_of: str) -> tuple[list[int], list[torch.Tensor], int]:
        logits, calls = [], []
        real = getattr(PagedKVCache, calls_of)
        monkeypatch.setattr(PagedKVCache, calls_of, lambda *a: (calls.append(1), real(*a))[1])
        eng = _engine(tiny_path, KVSizes(P, 2, 8), 512)
        toks = [s.token for s in eng.generate(prompt, 90, sampler=greedy(logits))]
        assert eng.stats()["kv"]["spilled_now"] >= 1
        eng.close()
        monkeypatch.setattr(PagedKVCache, calls_of, real)
        return toks, logits, len(calls)

    blocks = []
    monkeypatch.setattr(cpu_step, "attention", lambda *a, real=cpu_step.attention: (blocks.append(1), real(*a))[1])
    toks, block, n = run("step_pages")
    assert n >= 89 * 3 and len(blocks) == n  # every decode step's attention went through the one-call block
    monkeypatch.setattr(cpu_step, "attention", lambda *a: None)
    toks_mla, mla, n = run("decode_attention")
    assert n >= 89 * 3 and toks_mla == toks
    assert all(torch.equal(a, b) for a, b in zip(block, mla))
    monkeypatch.setattr(PagedKVCache, "decode_attention", lambda *a: None)
    separate = []
    eng = _engine(tiny_path, KVSizes(P, 2, 8), 512)
    assert [s.token for s in eng.generate(prompt, 90, sampler=greedy(separate))] == toks
    eng.close()
    for a, b in zip(block, separate):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def test_host_tier_under_bf16_compute_reads_through_torch_with_identical_tokens(tiny_path):
    """The device-agnostic path (bf16 compute: the pages gathered with torch, as on CUDA): a main pool of
    2 pages and the rest in the host tier give the tokens of a pool that holds everything."""
    ckpt = Checkpoint(tiny_path)
    cfg = ckpt.config

    def engine(sizes: KVSizes) -> Engine:
        kv = KVStore(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, 512, sizes, "cpu",
                     torch.bfloat16, torch.bfloat16)
        return Engine(ckpt, ReferenceExperts(ckpt), dtype=torch.bfloat16, context=512, kv=kv)

    greedy = lambda lg: int(lg.argmax())  # noqa: E731
    spilling, roomy = engine(KVSizes(P, 2, 6)), engine(KVSizes(P, 8))
    prompt = list(range(30, 230))
    a = [s.token for s in spilling.generate(prompt, 60, sampler=greedy)]
    b = [s.token for s in roomy.generate(prompt, 60, sampler=greedy)]
    assert a == b and spilling.stats()["kv"]["spilled_now"] >= 2
    spilling.close()
    roomy.close()


def test_copy_on_write_holds_its_page_while_allocating():
    """A full pool, the shared page to copy the only one left to free: allocating for the copy evicts the
    tree's reference and may spill older pages, never the page being copied (that left the table holding
    a freed page and a spill page owned by nobody); with nothing else to free it is a clean PoolFull."""
    store = KVStore(1, 3, 1, 64, KVSizes(4, 1, 4), "cpu", torch.float32, torch.float32)
    prompt = list(range(8))
    assert store.begin(prompt) == 0
    store.cache.prepare(0, 8)
    store.cache.length = 8
    store.finish(prompt)
    store.begin(prompt)
    store.cache.truncate(7)
    with pytest.raises(PoolFull):  # the one main page is the one to copy: no room for its copy
        store.cache.prepare(7, 8)
    entries = store.cache.pages
    main, spill = store.pages.main, store.pages.spill
    assert len(set(entries)) == len(entries) == 2 and main.free == 0
    assert all((main.refs[e] if e >= 0 else spill.refs[-1 - e]) >= 1 for e in entries)
    assert int(main.refs.sum()) + int(spill.refs.sum()) == len(entries) + store.tree.nodes  # nothing orphaned


def test_a_disk_prefix_longer_than_the_pool_loads_what_fits(tmp_path):
    """A 12-token prefix on disk, a pool of 2 pages of 4, part of the prefix in the tree: the request
    takes the longest part that fits beside a page to write into, and nothing is left dangling."""
    from hybrid.runtime.prefix_disk import DiskPrefixCache, KVLayout

    disk = DiskPrefixCache(tmp_path, "id", KVLayout(1, 3, 1, "float32"), 10 ** 9)
    rows = torch.randn(1, 12, 4)
    disk.save(list(range(12)), rows[..., :3].contiguous(), rows[..., 3:].contiguous())
    store = KVStore(1, 3, 1, 64, KVSizes(4, 2), "cpu", torch.float32, torch.float32, disk)
    store.begin(list(range(4)) + [99])
    store.cache.prepare(0, 5)
    store.cache.length = 5
    store.finish(list(range(4)) + [99])
    got = store.begin(list(range(12)) + [50])
    assert got == 4  # one page: the other is kept to write into
    assert torch.equal(store.pages.page(store.cache.pages[0])[0, :4], rows[0, :4])
    assert int(store.pages.main.refs.sum()) == len(store.cache.pages) + store.tree.nodes


# ---- the disk tier ---------------------------------------------------------------------------------
def test_restart_resumes_from_the_disk_tier(tiny_path, tmp_path, caplog):
    """A conversation saved at close is found by the next engine on the same directory: the next turn
    prefills only its new tokens, with a fresh engine's logits. A corrupt file is skipped, logged."""
    d = tmp_path / "prefixes"
    history = list(range(30, 430))
    first = hybrid.load(tiny_path, backend="reference", device="cpu", context=1024, decode_graphs="off",
                        prefix_cache_dir=d)
    answer = [s.token for s in first.generate(history, 3, sampler=lambda lg: 7)]
    first.close()
    assert len(list(d.glob("*"))) >= 1
    turn = history + answer + [11, 12, 13]
    second = hybrid.load(tiny_path, backend="reference", device="cpu", context=1024, decode_graphs="off",
                         prefix_cache_dir=d)
    got, want = [], []
    steps = list(second.generate(turn, 2, sampler=lambda lg: (got.append(lg.clone()), 7)[1]))
    assert steps[0].prefill_tokens == 4  # the last answer token (never written) and the three new ones
    assert second.stats()["kv"]["disk_tokens"] == len(history) + 2
    second.close()
    fresh = hybrid.load(tiny_path, backend="reference", device="cpu", context=1024, decode_graphs="off")
    list(fresh.generate(turn, 2, sampler=lambda lg: (want.append(lg.clone()), 7)[1]))
    fresh.close()
    assert all(float((x - y).abs().max()) < 1e-4 for x, y in zip(got, want))
    for f in d.iterdir():  # flip a byte in the middle of every payload
        data = bytearray(f.read_bytes())
        data[len(data) // 2 + 17] ^= 0xFF
        f.write_bytes(bytes(data))
    third = hybrid.load(tiny_path, backend="reference", device="cpu", context=1024, decode_graphs="off",
                        prefix_cache_dir=d)
    with caplog.at_level(logging.WARNING):
        steps = list(third.generate(turn, 1, sampler=lambda lg: 7))
    third.close()
    assert steps[0].prefill_tokens == len(turn)  # nothing corrupt was loaded
    assert any("prefix" in r.getMessage().lower() or "checksum" in r.getMessage().lower() for r in caplog.records)


# ---- what the issue measures: interleaved agent conversations --------------------------------------
@pytest.mark.parametrize("n_convs", [2, 4])
def test_interleaved_conversations_prefill_only_their_new_tokens(tiny_path, n_convs):
    """n conversations of 10 turns each, taking turns on one engine: every turn prefills only the
    tokens appended since that conversation's last turn (its new message, and the answer's last token,
    which was never written), and its greedy tokens are a fresh engine's and its logits within 1e-4 of
    their scale. (The reused rows were written by decode steps, the fresh engine's by one prefill GEMM:
    the same fp32 math summed in another order. On a 2-core Xeon with AMX that order moved a turn-9
    logit by 2.5e-4 at scale 4.1, 6e-5 of it; a wrong or stale row moves them by ~1e-1.)"""
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=1024, decode_graphs="off")
    fresh = hybrid.load(tiny_path, backend="reference", device="cpu", context=1024, decode_graphs="off")
    histories = [[1, 2, 3] + list(range(40 + c, 80 + c)) for c in range(n_convs)]
    rng = np.random.default_rng(n_convs)
    for turn in range(10):
        for c, h in enumerate(histories):
            new = [int(t) for t in rng.integers(100, 1000, 6)]
            h += new
            got = []
            steps = list(eng.generate(h, 3, sampler=lambda lg: (got.append(lg.clone()), int(lg.argmax()))[1]))
            # turn 0: all of it, less the 3 tokens every conversation opens with once one has run
            want_prefill = (len(h) - (3 if c else 0)) if turn == 0 else len(new) + 1
            assert steps[0].prefill_tokens == want_prefill, (turn, c)
            if turn in (0, 9):
                want = []
                fresh._kv.tree.clear()
                again = list(fresh.generate(h, 3, sampler=lambda lg: (want.append(lg.clone()), int(lg.argmax()))[1]))
                assert [s.token for s in steps] == [s.token for s in again], (turn, c)
                assert all(float((x - y).abs().max()) < 1e-4 * float(y.abs().max()) for x, y in zip(got, want))
            h += [s.token for s in steps]
    kv = eng.stats()["kv"]
    assert kv["reused_tokens"] > 0.8 * kv["prompt_tokens"] - 60 * n_convs
    eng.close()
    fresh.close()


def test_bf16_pages_against_the_fp32_cache(tiny_path):
    """The latent stored in bf16 (the default) against fp32 pages and against the contiguous fp32 cache:
    fp32 pages give the contiguous cache's logits to 1e-5; bf16 pages stay within 2% of the logits'
    scale (bf16's 2^-8 rounding of every cached value, through three layers of tiny random weights)."""
    prompt = list(range(7, 207))
    ref = hybrid.load(tiny_path, backend="reference", device="cpu", context=512, decode_graphs="off")
    exact = ref.model.forward(torch.tensor(prompt), ref.model.new_cache(512))[-1]
    for kv_dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        e = hybrid.load(tiny_path, backend="reference", device="cpu", context=512, decode_graphs="off",
                        kv_dtype=kv_dtype)
        got = []
        list(e.generate(prompt[:-1], 1, sampler=lambda lg: 7))
        list(e.generate(prompt, 1, sampler=lambda lg: (got.append(lg.clone()), 7)[1]))  # decoded through pages
        assert float((got[0] - exact).abs().max() / exact.abs().max()) < tol, kv_dtype
        e.close()
    ref.close()
