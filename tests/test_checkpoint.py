"""Checkpoint reader: zero-copy views, and a clear CheckpointError for every kind of broken download."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.checkpoint.int4 import dequantize_int4, unpack_int4
from hybrid.synth.writer import GeneratorError, is_generated, preset_config, write_checkpoint

EXPERT = "model.layers.1.mlp.experts.3.up_proj"


@pytest.fixture
def broken(tiny_path, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_path, dst)
    return dst


def shard_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def rewrite(path, name, fn):
    """Load the shard holding `name`, apply fn(dict) -> dict, save it back and fix the index."""
    f = shard_of(path, name)
    d = fn(load_file(f))
    save_file(d, f, metadata={"format": "pt"})
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != f.name or k in d}
    idx["weight_map"].update({k: f.name for k in d})
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_views_are_zero_copy(tiny_path):
    c = Checkpoint(tiny_path)
    D, I, Q = c.config.hidden_size, c.config.moe_intermediate_size, c.config.q_lora_rank
    t = c.tensor("model.layers.0.self_attn.q_a_proj.weight")
    assert t.dtype == torch.bfloat16 and t.shape == (Q, D)
    info = c.info("model.layers.0.self_attn.q_a_proj.weight")
    raw = np.fromfile(info.file, dtype=np.uint16, count=info.nbytes // 2, offset=info.offset)
    assert np.array_equal(t.view(torch.int16).numpy().view(np.uint16).ravel(), raw)
    a = c.array("model.layers.0.self_attn.q_a_proj.weight")
    assert not a.flags.owndata and a.base is not None  # a view of the map, not a copy
    w = c.expert(1, 3, "up_proj")
    assert w.packed.dtype == np.int32 and w.packed.shape == (I, D // 8) and w.scale.shape == (I, D // 32)
    assert w.shape == (I, D)
    assert unpack_int4(w.packed).min() >= -8 and dequantize_int4(w.packed, w.scale, w.shape).shape == (I, D)


def test_weight_shape_int32_and_bias_bf16_accepted(broken):
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    rewrite(broken, EXPERT + ".weight_shape", lambda d: {**d, EXPERT + ".weight_shape": d[EXPERT + ".weight_shape"].to(torch.int32),
                                                         bias: d[bias].bfloat16()})
    c = Checkpoint(broken)
    assert c.expert(1, 3, "up_proj").shape == (c.config.moe_intermediate_size, c.config.hidden_size)


@pytest.mark.parametrize("cut", [1, 4096, "header"])
def test_truncated_shard(broken, cut):
    f = shard_of(broken, EXPERT + ".weight_packed")
    size = f.stat().st_size
    os.truncate(f, 20 if cut == "header" else size - cut)
    with pytest.raises(CheckpointError, match=f.name) as e:
        Checkpoint(broken)
    assert "truncated" in str(e.value) or "impossible" in str(e.value)


def test_truncated_shard_names_the_tensor(broken):
    f = shard_of(broken, "lm_head.weight")
    os.truncate(f, f.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"tensor \S+.*truncated"):
        Checkpoint(broken)


def test_flipped_header_bytes(broken):
    f = shard_of(broken, EXPERT + ".weight_packed")
    with open(f, "r+b") as fh:
        fh.seek(8)
        first = fh.read(16)
        fh.seek(8)
        fh.write(bytes(b ^ 0xFF for b in first))
    with pytest.raises(CheckpointError, match=rf"{f.name}.*corrupt safetensors header"):
        Checkpoint(broken)


def test_header_offsets_disagree_with_dtype(broken):
    f = shard_of(broken, EXPERT + ".weight_packed")
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    head[EXPERT + ".weight_packed"]["dtype"] = "I64"  # same bytes, claims twice as many
    new = json.dumps(head, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor {EXPERT}.weight_packed: data_offsets"):
        Checkpoint(broken)


def test_dropped_tensor(broken):
    rewrite(broken, EXPERT + ".weight_scale", lambda d: {k: v for k, v in d.items() if k != EXPERT + ".weight_scale"})
    with pytest.raises(CheckpointError, match=rf"tensor {EXPERT}.weight_scale is missing"):
        Checkpoint(broken)


def test_index_lists_tensor_the_shard_lacks(broken):
    idx = json.loads((broken / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.1.mlp.experts.99.up_proj.weight_packed"] = shard_of(broken, EXPERT + ".weight_packed").name
    (broken / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"experts.99.up_proj.weight_packed is listed .* missing from the shard"):
        Checkpoint(broken)


def test_wrong_dtype(broken):
    name = "model.layers.0.self_attn.q_a_proj.weight"
    rewrite(broken, name, lambda d: {**d, name: torch.zeros(d[name].shape)})
    with pytest.raises(CheckpointError, match=rf"tensor {name} has dtype F32, expected BF16"):
        Checkpoint(broken)


def test_wrong_shape_against_config(broken):
    cfg = json.loads((broken / "config.json").read_text())
    q, d = cfg["q_lora_rank"], cfg["hidden_size"]
    cfg["q_lora_rank"] = q + 16
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"q_a_proj.weight has shape \[{q}, {d}\], config.json implies \[{q + 16}, {d}\]"):
        Checkpoint(broken)


def test_unexpected_tensor(broken):
    rewrite(broken, EXPERT + ".weight_packed", lambda d: {**d, "model.layers.1.mlp.mystery": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.layers.1.mlp.mystery"):
        Checkpoint(broken)


def test_inv_freq_is_ignored(broken):
    rewrite(broken, EXPERT + ".weight_packed",
            lambda d: {**d, "model.layers.1.self_attn.rotary_emb.inv_freq": torch.zeros(4)})
    Checkpoint(broken)


def test_missing_shard(broken):
    f = shard_of(broken, EXPERT + ".weight_packed")
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"{f.name}: shard missing"):
        Checkpoint(broken)


def test_missing_index_and_config(broken):
    (broken / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json"):
        Checkpoint(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        Checkpoint(broken)


def test_corrupt_index_and_config(broken):
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: corrupt index"):
        Checkpoint(broken)
    (broken / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Checkpoint(broken)


def test_weight_shape_contents_checked(broken):
    name = EXPERT + ".weight_shape"
    rewrite(broken, name, lambda d: {**d, name: torch.tensor([32, 32])})
    c = Checkpoint(broken)
    I, D = c.config.moe_intermediate_size, c.config.hidden_size
    with pytest.raises(CheckpointError, match=rf"{name} holds \[32, 32\], config.json implies \[{I}, {D}\]"):
        c.expert(1, 3, "up_proj")


def test_shard_vanishing_after_open(broken):
    c = Checkpoint(broken)
    c.check_files()
    f = shard_of(broken, EXPERT + ".weight_packed")
    os.truncate(f, 100)
    with pytest.raises(CheckpointError, match="shrank"):
        c.check_files()
    f.unlink()
    with pytest.raises(CheckpointError, match="vanished"):
        c.check_files()


def test_full_size_sparse_layout_opens_fast_and_small(tmp_path):
    """The complete real layout (62 shards, ~208k tensors, 594 GB as sparse files): < 30 s, < 2 GB RSS."""
    code = (
        "import resource, time, json, sys\n"
        "from hybrid.synth.writer import preset_config, write_checkpoint\n"
        f"p = write_checkpoint({str(tmp_path / 'full')!r}, preset_config('k2-full-sparse'), sparse=True)\n"
        "t = time.perf_counter()\n"
        "from hybrid.checkpoint.reader import Checkpoint\n"
        "c = Checkpoint(p)\n"
        "dt = time.perf_counter() - t\n"
        "w = c.array('model.layers.60.mlp.experts.383.down_proj.weight_packed')\n"
        "print(json.dumps({'n': len(c.tensors), 'files': len({i.file for i in c.tensors.values()}), 's': dt,"
        " 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'shape': list(w.shape),"
        " 'total': sum(i.nbytes for i in c.tensors.values())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n"] == 208215 and r["files"] == 62 and r["shape"] == [7168, 256]
    assert 590e9 < r["total"] < 600e9
    assert r["s"] < 30 and r["rss_mb"] < 2048
    # sparse: the files claim ~594 GB but occupy next to nothing
    used = sum(f.stat().st_blocks * 512 for f in (tmp_path / "full").glob("*.safetensors"))
    assert used < 1e9


# ---- the generator: concurrent writers of one checkpoint ----------------------------------------

def test_two_writers_of_one_checkpoint_do_not_destroy_each_other(tmp_path):
    out, cfg = tmp_path / "tiny", preset_config("tiny")
    both_writing, started = threading.Barrier(2, timeout=30), set()

    def progress(done, total):  # each writer waits, once, until the other is writing too
        if threading.get_ident() not in started:
            started.add(threading.get_ident())
            both_writing.wait()

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: write_checkpoint(out, cfg, progress=progress), range(2)))
    assert paths == [out, out] and is_generated(out)
    assert len(Checkpoint(out).tensors) == 331  # complete and valid
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # the loser's temporary directory is gone


def test_a_checkpoint_completed_meanwhile_is_kept_and_others_are_never_deleted(tmp_path):
    out, cfg = tmp_path / "tiny", preset_config("tiny")
    theirs = {}

    def progress(done, total):  # another process completes the same checkpoint while this one writes
        if not theirs:
            theirs["path"] = write_checkpoint(out, cfg)
            theirs["inode"] = next(out.glob("*.safetensors")).stat().st_ino

    assert write_checkpoint(out, cfg, progress=progress) == out
    shard = next(out.glob("*.safetensors"))
    assert theirs["path"] == out and shard.stat().st_ino == theirs["inode"]  # theirs, not replaced under readers
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
    assert write_checkpoint(out, cfg) == out and shard.stat().st_ino == theirs["inode"]  # complete: reused
    with pytest.raises(GeneratorError, match="not empty"):  # a different checkpoint there: refused, kept
        write_checkpoint(out, cfg, seed=1)
    assert shard.stat().st_ino == theirs["inode"] and [p.name for p in tmp_path.iterdir()] == ["tiny"]
