"""Writing synthetic checkpoints: the space check asks for what the checkpoint really takes (plus a
proportional margin) and says it in sensible units; a `.partial-*` directory left by a writer that was
killed is removed from the cache, and one that a live writer is filling is never touched."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid.checkpoint.config import ModelConfig
from hybrid.cli.main import main
from hybrid.synth import writer
from hybrid.synth.writer import (LOCK, GeneratorError, clean_stale_partials, disk_bytes, ensure_preset, human_bytes,
                                 preset_config, preset_path, shard_plan, write_checkpoint)

from tests.server_harness import HOLD_S

Usage = namedtuple("Usage", "total used free")


def free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: Usage(free * 2, free, free))


def test_disk_bytes_is_what_a_written_checkpoint_takes(tmp_path):
    cfg = preset_config("tiny")
    out = write_checkpoint(tmp_path / "tiny", cfg)
    used = sum(f.stat().st_blocks * 512 for f in out.iterdir())
    estimate = disk_bytes(ModelConfig.from_dict(cfg, source="test"), shard_plan(ModelConfig.from_dict(cfg, source="test")),
                          sparse=False)
    assert used <= estimate <= 1.5 * used + (256 << 10)


def test_tiny_fits_on_a_20_mb_disk_and_a_too_small_disk_is_told_in_mb(tmp_path, monkeypatch):
    free_space(monkeypatch, 20_000_000)
    assert (write_checkpoint(tmp_path / "a", preset_config("tiny")) / "config.json").exists()
    free_space(monkeypatch, 2_000_000)
    with pytest.raises(GeneratorError, match=r"needs 3\.\d\d MB \(2\.\d\d MB of files and 1\.\d\d MB to spare\) but .* has 2\.00 MB free"):
        write_checkpoint(tmp_path / "b", preset_config("tiny"))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("b.partial-*"))
    r = CliRunner().invoke(main, ["generate", "tiny", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "MB free" in r.output and "0.0 GB" not in r.output


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 812, 3_150_000, 20e6, 594.2e9, 1.2e13)] == \
        ["0 B", "812 B", "3.15 MB", "20.0 MB", "594 GB", "12.0 TB"]


def killed_writer(out: Path) -> Path:
    """A writer of `out` that is killed (SIGKILL) halfway: the .partial-* directory it leaves."""
    code = ("import os, signal, sys; from hybrid.synth.writer import write_checkpoint, preset_config; "
            "write_checkpoint(sys.argv[1], preset_config('tiny'), "
            "progress=lambda done, total: done > total // 2 and os.kill(os.getpid(), signal.SIGKILL))")
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=HOLD_S * 4).returncode == -9
    (partial,) = out.parent.glob(out.name + ".partial-*")
    return partial


def test_a_killed_writers_partial_is_removed_and_a_live_writers_kept(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KIMI_HYBRID_CACHE", str(cache))
    dead = killed_writer(preset_path("tiny"))
    assert any(dead.glob("*.safetensors"))  # shards written before the kill
    old = cache / "k2-slice-seed0-v2.partial-old"  # from a version without locks, long ago
    old.mkdir()
    (old / "model-00001-of-000005.safetensors").write_bytes(b"x" * 4096)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = cache / "other.partial-fresh"  # no lock yet, just made: its writer may be about to lock it
    fresh.mkdir()
    # a live writer, paused in the middle of its shards
    code = ("import sys; from hybrid.synth.writer import write_checkpoint, preset_config; "
            "write_checkpoint(sys.argv[1], preset_config('tiny'), "
            "progress=lambda done, total: done > total // 2 and print('half', flush=True) is None and sys.stdin.readline())")
    live = subprocess.Popen([sys.executable, "-c", code, str(cache / "live")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline() == "half\n"
        (partial,) = cache.glob("live.partial-*")

        path = ensure_preset("tiny")  # cleans the cache, then writes the preset afresh
        assert path == preset_path("tiny") and (path / "config.json").exists() and not (path / LOCK).exists()
        assert not dead.exists() and not old.exists()
        assert fresh.exists() and partial.exists() and (partial / LOCK).exists()

        live.stdin.write("go on\n")
        live.stdin.close()
        assert live.wait(HOLD_S) == 0
    finally:
        if live.poll() is None:
            live.kill()
    assert (cache / "live" / "config.json").exists() and not partial.exists()
    assert clean_stale_partials(cache) == 0 and fresh.exists()
    shutil.rmtree(cache)


def _resident_share(path: Path) -> float:
    """The share of path's pages in the page cache (mincore over a map that touches none of them)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        pages = -(-len(m) // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        view = (ctypes.c_char * len(m)).from_buffer(m)
        assert libc.mincore(ctypes.addressof(view), len(m), vec) == 0, os.strerror(ctypes.get_errno())
        del view
        return sum(v & 1 for v in vec) / pages
    finally:
        m.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")
def test_big_shards_leave_the_page_cache_once_written_and_small_ones_stay(tmp_path, monkeypatch):
    """The shards a bench streams are dropped from the page cache once written, so that the first run reads
    them back from disk (in large folios, as a downloaded checkpoint's); the small ones are left alone."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_share(probe) > 0.5:
        pytest.skip("this filesystem keeps written pages in memory (tmpfs?)")
    monkeypatch.setattr(writer, "RELOAD_BYTES", 400_000)   # tiny's shards: 0.12 MB, then three of 0.6 MB
    out = write_checkpoint(tmp_path / "tiny", preset_config("tiny"))
    shares = {p.name: _resident_share(p) for p in sorted(out.glob("*.safetensors"))}
    assert shares.pop("model-00001-of-000004.safetensors") > 0.9, shares
    assert len(shares) == 3 and all(s < 0.1 for s in shares.values()), shares
