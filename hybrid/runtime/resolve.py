"""`--model` / `hybrid.load(model)` -> a checkpoint directory: a directory (`~` expanded), a Hugging Face
repo id already in the local HF cache, or a built-in preset generated into the cache on first use.

Owns the one resolution rule and its error, which says how to fetch what is missing. Never downloads
anything, and renders nothing (the CLI adds a progress bar through `progress`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from hybrid.checkpoint.reader import CheckpointError
from hybrid.synth.writer import PRESETS, Progress, ensure_preset

REAL_MODEL = "moonshotai/Kimi-K2-Thinking"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def find_in_hf_cache(repo_id: str, hub: Path | None = None) -> Path | None:
    """The snapshot directory of `repo_id` in the HF cache: the one refs/main names, else the newest."""
    repo = (hub or hf_hub_cache()) / f"models--{repo_id.replace('/', '--')}"
    snaps = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = sorted((p for p in snaps.glob("*") if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def fetch_hint(repo_id: str) -> str:
    return (f"fetch it with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download "
            f"{repo_id}`) and run this again, or add `--local-dir DIR` to that and pass --model DIR")


def is_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith(".")


def resolve_model(model: str | os.PathLike, progress: Progress | None = None) -> Path:
    """A checkpoint directory for `model`. A preset is generated on first use (progress(done, total) is
    called as it is written); anything else that is not here raises CheckpointError saying what to do."""
    name = os.fspath(model)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if name in PRESETS:
        return ensure_preset(name, progress=progress)
    if is_repo_id(name):
        found = find_in_hf_cache(name)
        if found is not None:
            return found
        raise CheckpointError(f"{name} is not in the Hugging Face cache ({hf_hub_cache()}) nor a directory here; "
                              f"{fetch_hint(name)}")
    if p.is_file():
        raise CheckpointError(f"{name} is a file; --model takes a checkpoint directory (the folder with config.json)")
    raise CheckpointError(f"{name}: no such checkpoint directory; --model takes a directory, a Hugging Face repo id "
                          f"in the local cache (like {REAL_MODEL}) or a preset ({', '.join(PRESETS)})")
