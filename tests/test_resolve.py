"""hybrid.runtime.resolve.resolve_model: the one rule from `--model` / `hybrid.load(model)` to a checkpoint directory."""
from __future__ import annotations

import pytest

from hybrid.checkpoint.reader import CheckpointError
from hybrid.runtime.resolve import resolve_model
from hybrid.synth.writer import PRESETS, is_generated, preset_makers


def test_a_directory_with_tilde_and_a_repo_id_in_the_hf_cache(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_path, target_is_directory=True)
    assert resolve_model("~/models/tiny") == tmp_path / "models" / "tiny"
    snap = tmp_path / "hub" / "models--someorg--Tiny-K2" / "snapshots" / "abc"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tiny_path, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("someorg/Tiny-K2") == snap  # no refs/main: the newest snapshot with a config.json


def test_a_preset_is_generated_once_with_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_HYBRID_CACHE", str(tmp_path))
    seen = []
    path = resolve_model("tiny", preset_makers(), progress=lambda done, total: seen.append((done, total)))
    assert is_generated(path) and path.parent == tmp_path and seen and seen[-1][0] == seen[-1][1]
    seen.clear()
    assert resolve_model("tiny", preset_makers(), progress=lambda done, total: seen.append(done)) == path and not seen


@pytest.mark.parametrize("model, says", [
    ("someorg/not-here", "is not in the Hugging Face cache"),
    ("someorg/not-here", "hf download someorg/not-here"),
    ("no-such-thing", "no such checkpoint directory"),
])
def test_what_is_not_here_says_how_to_get_it(tmp_path, monkeypatch, model, says):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=says):
        resolve_model(model)


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a file; --model takes a checkpoint directory"):
        resolve_model(tmp_path / "config.json")


def test_the_error_names_the_presets_it_was_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=rf"or a preset \({', '.join(PRESETS)}\)$"):
        resolve_model("no-such-thing", preset_makers())


def test_refs_main_picks_the_snapshot_among_several(tiny_path, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--someorg--Tiny-K2"
    for rev in ("old", "new"):
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / rev).symlink_to(tiny_path, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("old")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("someorg/Tiny-K2") == repo / "snapshots" / "old"
