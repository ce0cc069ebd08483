"""`--model` / `hybrid.load(model)` -> a checkpoint directory: a directory (`~` expanded), a Hugging Face
repo id already in the local HF cache (found by huggingface_hub's cache scan), or a built-in preset, made
on first use by the maker the caller hands in (hybrid.load and the CLI pass hybrid.synth's).

Owns the one resolution rule and its errors, which say how to fetch what is missing (every missing shard of a
partial download, a close preset name, why a GGUF file is not read). Never downloads anything, renders
nothing (the CLI adds a progress bar through `progress`) and never imports synth.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from hybrid.checkpoint.files import INDEX_NAME, CheckpointError

REAL_MODEL = "moonshotai/Kimi-K2-Thinking"
TRY_PRESET = "tiny"  # the preset a missing model's error suggests, to try the pipeline in seconds
GGUF_WHY = ("kimi-hybrid reads the checkpoint as Moonshot ships it: safetensors with the routed experts in native "
            "INT4 (quantisation-aware trained, so these are the model's own weights), mapped from disk without any "
            "conversion; a GGUF file is llama.cpp's format, re-packed and often re-quantised, and is not read here")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
PresetMaker = Callable[[Progress | None], Path]  # writes its preset on first use; -> the directory


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
    Read at each call (huggingface_hub.constants fixes it when the library is first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def find_in_hf_cache(repo_id: str, hub: Path | None = None) -> Path | None:
    """The snapshot directory of model `repo_id` in the HF cache: the one refs/main names, else the newest
    with a config.json; None when there is none. Reads the cache only (huggingface_hub.scan_cache_dir)."""
    from huggingface_hub import scan_cache_dir  # here: its import costs ~0.2 s that only a repo id needs

    hub = hub or hf_hub_cache()
    if not hub.is_dir():
        return None  # (scan_cache_dir would raise CacheNotFound)
    root = hub.resolve()  # the scan reports paths under the resolved cache; ours keep the caller's spelling
    revisions = [r for repo in scan_cache_dir(root).repos if repo.repo_type == "model" and repo.repo_id == repo_id
                 for r in repo.revisions]  # a repo the scan finds corrupt (a blob missing) is not here
    main = [r for r in revisions if "main" in r.refs]
    found = main or sorted((r for r in revisions if (r.snapshot_path / "config.json").exists()),
                           key=lambda r: r.last_modified)[-1:]
    return hub / found[0].snapshot_path.relative_to(root) if found else None


def fetch_hint(repo_id: str) -> str:
    return (f"fetch it with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download "
            f"{repo_id}`) and run this again, or add `--local-dir DIR` to that and pass --model DIR")


def try_hint(presets: Mapping[str, PresetMaker]) -> str:
    return (f"; or try the pipeline first on the small synthetic preset: --model {TRY_PRESET}"
            if TRY_PRESET in presets else "")


def missing_shards(path: Path) -> list[str]:
    """Shards the index names that are not in `path` (a partial download); [] without an index. A corrupt index
    is left to the checkpoint reader, which names it."""
    try:
        names = set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(n for n in names if isinstance(n, str) and not (path / n).is_file())


def check_complete(path: Path, repo_id: str | None = None) -> Path:
    """`path`, or CheckpointError listing every shard its index names that is not there."""
    missing = missing_shards(path)
    if missing:
        fetch = (f"`hf download {repo_id}`" if repo_id else
                 f"`hf download {REAL_MODEL} --local-dir {path}` (or the repo it came from)")
        raise CheckpointError(f"{path}: the download is incomplete, {len(missing)} shard(s) missing: "
                              f"{', '.join(missing)}; {fetch} resumes it, fetching only what is missing")
    return path


def is_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith(".")


def resolve_model(model: str | os.PathLike, presets: Mapping[str, PresetMaker] | None = None,
                  progress: Progress | None = None) -> Path:
    """A checkpoint directory for `model`. presets: the built-in checkpoints by name; one is made on first
    use by its maker (progress(done, total) is called as it is written). Anything else that is not here
    raises CheckpointError saying what to do."""
    name = os.fspath(model)
    presets = presets or {}
    p = Path(name).expanduser()
    if p.is_dir():
        return check_complete(p)
    if name in presets:
        return presets[name](progress)
    if name.lower().endswith(".gguf"):
        raise CheckpointError(f"{name} is a GGUF file: {GGUF_WHY}; fetch the native checkpoint with "
                              f"`hf download {REAL_MODEL}`")
    if is_repo_id(name):
        found = find_in_hf_cache(name)
        if found is not None:
            return check_complete(found, name)
        raise CheckpointError(f"{name} is not in the Hugging Face cache ({hf_hub_cache()}) nor a directory here; "
                              f"{fetch_hint(name)}{try_hint(presets)}")
    if p.is_file():
        raise CheckpointError(f"{name} is a file; --model takes a checkpoint directory (the folder with config.json)")
    close = difflib.get_close_matches(name, [*presets, REAL_MODEL], n=1)
    mean = f"did you mean {close[0]}? " if close else ""
    or_preset = f" or a preset ({', '.join(presets)})" if presets else ""
    raise CheckpointError(f"{name}: no such checkpoint directory; {mean}--model takes a directory, a Hugging Face "
                          f"repo id in the local cache (like {REAL_MODEL}){or_preset}")
