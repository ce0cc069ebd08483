"""The disk tier of the prefix cache (hybrid/runtime/prefix_disk.py): exact round trips, restarts, the
longest prefix, replacement, the size cap in LRU order, and every bad file skipped with a log line."""
from __future__ import annotations

import logging
import os
import struct

import pytest
import torch

from hybrid.runtime.prefix_disk import DiskPrefixCache, KVLayout

LAYOUT = KVLayout(layers=3, kv_dim=8, pe_dim=4, dtype="bfloat16")
IDENTITY = "config:abc index:def"


def warnings(caplog):
    return caplog.at_level(logging.WARNING, logger="hybrid.runtime.prefix_disk")


def kv_pe(n: int, layout: KVLayout = LAYOUT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layout.layers, n, layout.kv_dim, generator=g).to(layout.torch_dtype)  # [layers, n, L]
    pe = torch.randn(layout.layers, n, layout.pe_dim, generator=g).to(layout.torch_dtype)  # [layers, n, R]
    return kv, pe


def cache(tmp_path, max_bytes: int = 1 << 20, layout: KVLayout = LAYOUT, identity: str = IDENTITY):
    return DiskPrefixCache(tmp_path / "prefixes", identity, layout, max_bytes)


def saved(c: DiskPrefixCache, tokens: list[int], seed: int = 0):
    kv, pe = kv_pe(len(tokens), c.layout, seed)
    c.save(tokens, kv, pe)
    return kv, pe


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def only_file(c: DiskPrefixCache):
    (entry,) = c.entries()
    return entry.path


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_keeps_every_bit(tmp_path, dtype):
    layout = KVLayout(layers=2, kv_dim=16, pe_dim=4, dtype=dtype)
    c = cache(tmp_path, layout=layout)
    kv, pe = saved(c, [5, 6, 7, 8, 9])
    n, entry = c.longest([5, 6, 7, 8, 9, 10])
    assert n == 5 and entry.n_tokens == 5
    got_kv, got_pe = c.load(entry, 5)
    assert got_kv.dtype == kv.dtype and torch.equal(bits(got_kv), bits(kv)) and torch.equal(bits(got_pe), bits(pe))
    part_kv, part_pe = c.load(entry, 3)  # the first positions only
    assert part_kv.shape == (2, 3, 16) and torch.equal(bits(part_kv), bits(kv[:, :3]))
    assert part_pe.shape == (2, 3, 4) and torch.equal(bits(part_pe), bits(pe[:, :3]))
    assert c.total_bytes() == os.path.getsize(entry.path) and len(c) == 1


def test_a_restart_finds_what_was_saved(tmp_path):
    kv, pe = saved(cache(tmp_path), [1, 2, 3, 4])
    again = cache(tmp_path)
    assert len(again) == 1
    n, entry = again.longest([1, 2, 3, 4])
    assert n == 4 and torch.equal(bits(again.load(entry, 4)[0]), bits(kv))


def test_longest_picks_the_longest_common_prefix(tmp_path):
    c = cache(tmp_path)
    for tokens in ([1, 2, 3], [1, 2, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7], [8, 8]):
        saved(c, tokens)
    assert len(c) == 3  # [1, 2, 3] was replaced by the longer one that extends it
    n, entry = c.longest([1, 2, 3, 4, 5, 0])
    assert n == 5 and entry.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7]
    n, entry = c.longest([1, 2, 9, 1])
    assert n == 3 and entry.tokens.tolist() == [1, 2, 9, 9, 9, 9]
    assert c.longest([7, 1]) is None and c.longest([]) is None


def test_a_longer_prefix_replaces_a_shorter_one_and_a_covered_one_is_not_written(tmp_path):
    c = cache(tmp_path)
    saved(c, [1, 2, 3])
    short = only_file(c)
    kv, _ = saved(c, [1, 2, 3, 4, 5], seed=1)
    assert not short.exists() and len(c) == 1 and only_file(c).exists()
    longer = only_file(c)
    saved(c, [1, 2, 3, 4], seed=2)  # covered by the file already there: nothing written
    assert sorted(p.name for p in c.directory.iterdir()) == [longer.name]
    n, entry = c.longest([1, 2, 3, 4])
    assert n == 4 and torch.equal(bits(c.load(entry, 4)[0]), bits(kv[:, :4]))


def test_the_size_cap_is_never_passed_and_the_least_recently_used_go_first(tmp_path):
    probe = cache(tmp_path / "probe")
    saved(probe, [0, 0, 0, 1])
    one = probe.total_bytes()
    c = cache(tmp_path, max_bytes=3 * one + one // 2)  # room for three files of four tokens
    for first in (10, 20, 30):
        saved(c, [first, 1, 2, 3])
        assert c.total_bytes() <= c.max_bytes
    c.load(c.longest([10])[1], 4)  # 10 is used again: 20 is now the least recently used
    saved(c, [40, 1, 2, 3])
    assert c.total_bytes() <= c.max_bytes and sorted(e.tokens[0] for e in c.entries()) == [10, 30, 40]
    saved(c, [50, 1, 2, 3])
    assert sorted(e.tokens[0] for e in c.entries()) == [10, 40, 50]
    assert sum(p.stat().st_size for p in c.directory.iterdir()) <= c.max_bytes
    assert sorted(e.tokens[0] for e in cache(tmp_path, max_bytes=c.max_bytes).entries()) == [10, 40, 50]
    saved(c, list(range(1, 100)))  # alone it would pass the cap: not kept, nothing else lost
    assert len(c) == 3 and len(list(c.directory.iterdir())) == 3


def test_lru_order_survives_a_restart(tmp_path):
    probe = cache(tmp_path / "probe")
    saved(probe, [0, 0, 0, 1])
    one = probe.total_bytes()
    c = cache(tmp_path, max_bytes=2 * one + one // 2)
    saved(c, [10, 1, 2, 3])
    saved(c, [20, 1, 2, 3])
    c.load(c.longest([10])[1], 1)
    again = cache(tmp_path, max_bytes=c.max_bytes)  # the order comes from the files' mtimes
    saved(again, [30, 1, 2, 3])
    assert sorted(e.tokens[0] for e in again.entries()) == [10, 30]


def corrupt(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def skipped(c: DiskPrefixCache, caplog, path, says: str) -> None:
    assert says in caplog.text and str(path) in caplog.text
    assert len(c) == 0 and c.longest([1, 2, 3, 4]) is None


def test_a_torn_file_is_skipped_and_deleted(tmp_path, caplog):
    path = only_file(_with_one(tmp_path))
    path.write_bytes(path.read_bytes()[:-10])  # a write cut short
    with warnings(caplog):
        c = cache(tmp_path)
    skipped(c, caplog, path, "torn")
    assert not path.exists()


def test_a_corrupt_payload_byte_is_caught_at_load(tmp_path, caplog):
    c = _with_one(tmp_path)
    path = only_file(c)
    corrupt(path, 5)
    n, entry = c.longest([1, 2, 3, 4])  # headers alone look fine
    with warnings(caplog):
        assert c.load(entry, n) is None
    skipped(c, caplog, path, "checksum")
    assert not path.exists()


def test_corrupt_token_ids_are_caught_at_scan(tmp_path, caplog):
    path = only_file(_with_one(tmp_path))
    payload = LAYOUT.payload_bytes(4)
    corrupt(path, payload + 2)  # a byte of the last token id
    with warnings(caplog):
        c = cache(tmp_path)
    skipped(c, caplog, path, "token ids")


@pytest.mark.parametrize("other", [
    {"identity": "another checkpoint"},
    {"layout": KVLayout(layers=3, kv_dim=8, pe_dim=4, dtype="float32")},
    {"layout": KVLayout(layers=4, kv_dim=8, pe_dim=4, dtype="bfloat16")},
])
def test_a_foreign_file_is_skipped_and_left_alone(tmp_path, caplog, other):
    theirs = cache(tmp_path, **other)
    saved(theirs, [1, 2, 3, 4])
    path = only_file(theirs)
    with warnings(caplog):
        c = cache(tmp_path)
    skipped(c, caplog, path, "another")
    assert path.exists() and len(cache(tmp_path, **other)) == 1  # still theirs to use


@pytest.mark.parametrize("content", [b"", b"hello world", b"KHPREFIX" + struct.pack("<II", 1, 10) + b"{not json}",
                                     b"KHPREFIX" + struct.pack("<II", 99, 2) + b"{}"])
def test_a_garbage_file_is_skipped(tmp_path, caplog, content):
    c = _with_one(tmp_path)
    junk = c.directory / "junk.kvp"
    junk.write_bytes(content)
    with warnings(caplog):
        again = cache(tmp_path)
    assert str(junk) in caplog.text and len(again) == 1 and junk.exists()


def test_a_temp_file_left_by_a_crash_is_removed_and_a_live_writers_kept(tmp_path, caplog):
    c = _with_one(tmp_path)
    dead = c.directory / f".{only_file(c).name}.999999999.0a1b2c3d.tmp"  # no such pid
    live = c.directory / f".{only_file(c).name}.{os.getpid()}.0a1b2c3d.tmp"  # a save under way in this process
    dead.write_bytes(b"half a file")
    live.write_bytes(b"half a file")
    with warnings(caplog):
        again = cache(tmp_path)
    assert str(dead) in caplog.text and not dead.exists() and live.exists() and len(again) == 1


def test_a_file_that_vanishes_between_scan_and_load(tmp_path, caplog):
    c = _with_one(tmp_path)
    n, entry = c.longest([1, 2, 3, 4])
    entry.path.unlink()  # another process evicted it
    with warnings(caplog):
        assert c.load(entry, n) is None
    skipped(c, caplog, entry.path, "vanished")
    saved(c, [5, 6])  # and the cache goes on
    assert len(c) == 1


def test_save_refuses_wrong_shapes_and_dtypes(tmp_path):
    c = cache(tmp_path)
    kv, pe = kv_pe(3)
    with pytest.raises(ValueError, match="kv must be"):
        c.save([1, 2], kv, pe)
    with pytest.raises(ValueError, match="pe must be"):
        c.save([1, 2, 3], kv, pe.float())
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(layers=1, kv_dim=1, pe_dim=1, dtype="int8")


def _with_one(tmp_path) -> DiskPrefixCache:
    c = cache(tmp_path)
    saved(c, [1, 2, 3, 4])
    return c


def test_a_directory_that_cannot_be_made_is_refused_naming_the_option(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"--prefix-cache-dir.*a-file/sub"):
        DiskPrefixCache(blocker / "sub", "id", KVLayout(1, 3, 1, "float32"), 10 ** 6)
