"""`kimi-hybrid split`: one node's share as a checkpoint of its own (hybrid.cluster.share).

Invariants: the share holds exactly the split's experts for that rank, byte for byte the source's
tensors, and no other tensor (non-expert weights stay on the head); the reader opens it like any
checkpoint; a node started on it gives the single process's tokens; a share with a missing, cut or
altered shard is refused at join on both sides, naming the file and a tensor.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import hybrid
from hybrid.checkpoint.reader import Checkpoint
from hybrid.cli.main import main
from hybrid.cluster.link import ClusterError
from hybrid.cluster.plan import split
from hybrid.cluster.share import SHARE_NAME, ShareCheckpoint
from kernels_cpu.simd import host_has_avx2
from tests.test_cluster import N_NEW, PROMPT, WAIT_S, _node_thread, free_port, head, nodes, output


@pytest.fixture(scope="module")
def share(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "node1"
    r = CliRunner().invoke(main, ["split", "-m", str(tiny_path), "--nodes", "2", "--rank", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_the_share_holds_exactly_its_experts_and_nothing_else(tiny_path, share):
    full = Checkpoint(tiny_path)
    cfg = full.config
    want = split(cfg.moe_layers, cfg.n_routed_experts, [1.0, 1.0]).owner == 1
    names = {f"model.layers.{layer}.mlp.experts.{e}." for i, layer in enumerate(cfg.moe_layers)
             for e in np.flatnonzero(want[i])}
    got = Checkpoint(share, strict=False)  # the reader's own validation of every shard
    try:
        assert got.tensors and all(any(n.startswith(p) for p in names) for n in got.tensors)
        assert {n for n in full.tensors if any(n.startswith(p) for p in names)} == set(got.tensors)
        for n in got.tensors:
            np.testing.assert_array_equal(got.array(n), full.array(n))
        assert (share / "config.json").read_bytes() == (tiny_path / "config.json").read_bytes()
    finally:
        got.close()
        full.close()
    s = ShareCheckpoint(share)
    try:
        assert (s.holds == want).all()
    finally:
        s.close()


@pytest.mark.parametrize("args, says", [(["--rank", "2"], "has nodes 1 .. 1"), (["--weights", "1,x"], "--weights"),
                                        (["--rank", "1"], "not empty")])
def test_split_refuses_what_it_cannot_do(tiny_path, share, args, says):
    r = CliRunner().invoke(main, ["split", "-m", str(tiny_path), "--nodes", "2", "--out", str(share),
                                  *(["--rank", "1"] if "--rank" not in args else []), *args])
    assert r.exit_code == 1 and says in r.output, r.output


@pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
@pytest.mark.parametrize("mode", ["mmap", "ram"])
def test_a_node_on_its_share_gives_the_single_process_tokens(tiny_path, share, mode):
    """In mmap mode, and in ram mode (the share's experts copied at load, and only they)."""
    with hybrid.load(tiny_path, backend="numba", expert_mode="mmap") as e:
        tokens = [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)]
    port = free_port()
    with nodes(share, 1, port, extra={0: ["--expert-mode", mode]}) as ((proc,), (log,)):
        with head(tiny_path, 2, port) as e:
            assert [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)] == tokens
            st = e.stats()["cluster"]
        assert proc.wait(timeout=WAIT_S) == 0, output(log)
        assert f"{mode} mode, a share" in " ".join(output(log).split())  # rich wraps its lines
    assert st["experts_per_rank"][1] == st["held_per_rank"][1] == 16  # what its files hold, no more
    assert st["nodes"][0]["requests"] > 0


def _damaged(share, tmp_path, how: str):
    out = tmp_path / how
    shutil.copytree(share, out)
    shard = sorted(out.glob("*.safetensors"))[0]
    if how == "missing":
        shard.unlink()
    elif how == "cut":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    else:  # altered: same size, other bytes at its end (where a fingerprint samples it)
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size - 64)
            f.write(bytes(range(64)))
    return out, shard.name


@pytest.mark.parametrize("how, says", [("missing", "shard missing"), ("cut", "truncated"),
                                       ("altered", "differs from what kimi-hybrid split wrote"),
                                       ("listed", "tensor model.layers.")])
def test_a_damaged_share_is_refused_at_join_naming_file_and_tensor(tiny_path, share, tmp_path, how, says):
    if how == "listed":  # its description lists an expert its files lack: that tensor is named
        out = tmp_path / "listed"
        shutil.copytree(share, out)
        desc = json.loads((out / SHARE_NAME).read_text())
        layer, held = next(iter(desc["experts"].items()))
        desc["experts"][layer].append(next(e for e in range(16) if e not in held))
        (out / SHARE_NAME).write_text(json.dumps(desc))
        shard = None
    else:
        out, shard = _damaged(share, tmp_path, how)
    port = free_port()
    t, result = _node_thread(out, port, "a-test-secret-0123")
    with pytest.raises(ClusterError) as refused:
        head(tiny_path, 2, port, join_timeout=WAIT_S)
    t.join(WAIT_S)
    assert not t.is_alive() and isinstance(result[0], ClusterError)
    text = str(refused.value)
    assert "node 1" in text and "its checkpoint cannot be used" in text and says in text, text
    assert (shard is None or shard in text) and "model.layers." in text, text
    assert "refused to join" in str(result[0])
