"""Synthetic checkpoints in the exact on-disk format of Kimi K2 Thinking.

Owns writing: config.json with quantization_config, sharded safetensors plus index (one shard for the
dense layers, one per MoE layer, one for embeddings and lm_head, as the real model does), routed
experts packed as compressed-tensors does, a small BPE tiktoken.model and the real tokenizer_config /
chat template with special ids moved after the small vocabulary. Deterministic from a seed: each
tensor's values depend only on (seed, tensor name). Writes into a locked `.partial-*` directory renamed
into place when complete; removes the ones in the cache whose writer died. Never reads weights; the
reader lives elsewhere.
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hybrid.checkpoint.config import ModelConfig
from hybrid.checkpoint.paths import cache_dir
from hybrid.checkpoint.layout import TensorSpec, expert_shapes, global_specs, layer_specs, spec_nbytes

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump whenever a preset's shapes or values change: cached copies are keyed by it
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "assets"
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
MARKER = ".kimi-hybrid-synthetic"  # written last: a directory holding it is a complete checkpoint
RELOAD_BYTES = 64 << 20  # shards at least this big leave the page cache once written (_leave_page_cache)
LOCK = ".writer.lock"  # in a .partial-* directory: locked (flock) by its writer for as long as it writes
UNLOCKED_STALE_S = 60  # a .partial-* without a lock file this old is stale (an older version wrote it)
SPACE_MARGIN = 0.05  # free space asked beyond the checkpoint's own size, as a share of it (plus 1 MB)
_BLOCK = 4096  # each file takes whole blocks


class GeneratorError(Exception):
    """The synthetic checkpoint cannot be written (no space, bad option)."""


def reference_config() -> dict:
    """The real Kimi K2 Thinking config.json shipped with the package."""
    return json.loads((REFERENCE_DIR / "config.json").read_text())


def _preset_overrides() -> dict[str, dict]:
    tiny_vocab = 1280  # 1024 BPE ranks + 256 reserved specials, like the real 163584 + 256
    return {
        # seconds to write; small enough for HF reference runs in tests
        "tiny": dict(vocab_size=tiny_vocab, hidden_size=128, intermediate_size=96, moe_intermediate_size=128,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                     kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     n_routed_experts=16, num_experts_per_tok=4, bos_token_id=1024, eos_token_id=1026,
                     pad_token_id=1279),
        # the real per-layer shapes, few layers and experts, small vocabulary (vocab is not per layer)
        "k2-slice": dict(vocab_size=tiny_vocab, num_hidden_layers=4, n_routed_experts=48,
                         bos_token_id=1024, eos_token_id=1026, pad_token_id=1279),
        # the complete real layout; data is sparse (reads as zeros, takes no disk)
        "k2-full-sparse": dict(),
    }


PRESETS = tuple(_preset_overrides())


def preset_config(name: str) -> dict:
    try:
        over = _preset_overrides()[name]
    except KeyError:
        raise GeneratorError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    d = reference_config()
    d.update(over)
    return d


@dataclass(frozen=True)
class Shard:
    file: str
    tensors: list[tuple[str, TensorSpec]]


def shard_plan(cfg: ModelConfig) -> list[Shard]:
    """Dense layers in shard 1, one shard per MoE layer, globals last: the real model's placement."""
    groups: list[list[tuple[str, TensorSpec]]] = [[]]
    for i in range(cfg.num_hidden_layers):
        specs = list(layer_specs(cfg, i))
        if cfg.is_moe_layer(i):
            groups.append(specs)
        else:
            groups[0].extend(specs)
    groups.append(list(global_specs(cfg)))
    groups = [g for g in groups if g]
    n = len(groups)
    return [Shard(f"model-{k + 1:05d}-of-{n:06d}.safetensors", g) for k, g in enumerate(groups)]


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def tensor_bytes(cfg: ModelConfig, name: str, spec: TensorSpec, seed: int) -> bytes:
    """Deterministic contents of one tensor; scales chosen so activations stay O(1) through depth."""
    from hybrid.checkpoint.int4 import f32_to_bf16  # torch: here, so the CLI can list the presets without it

    rng = _rng(seed, name)
    shape = spec.shape
    if name.endswith("weight_shape"):
        return np.array(expert_shapes(cfg, name.split(".")[-2]), dtype=np.int64).tobytes()
    if name.endswith("weight_packed"):
        # uniform random words = uniform nibbles 0..15, so codes -8..7 (including -8) all occur
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32).tobytes()
    if name.endswith("weight_scale"):
        fan_in = shape[1] * cfg.group_size
        s = (1.0 + 0.25 * rng.random(shape, dtype=np.float32)) / (4.6 * np.sqrt(fan_in))  # code std ~4.6
        return f32_to_bf16(s.astype(np.float32)).tobytes()
    if name.endswith("e_score_correction_bias"):
        return (0.05 * rng.standard_normal(shape, dtype=np.float32)).tobytes()
    if name.endswith("norm.weight"):
        w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif name == "model.embed_tokens.weight":
        w = rng.standard_normal(shape, dtype=np.float32)
    else:  # projections [out, in]
        w = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
    return f32_to_bf16(w).tobytes()


def _header(tensors: list[tuple[str, TensorSpec]]) -> tuple[bytes, int]:
    entries, off = {"__metadata__": {"format": "pt"}}, 0
    for name, spec in tensors:
        n = spec_nbytes(spec)
        entries[name] = {"dtype": spec.dtypes[0], "shape": list(spec.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, off


def write_checkpoint(out: str | Path, config: dict, seed: int = 0, sparse: bool = False,
                     progress: Progress | None = None) -> Path:
    """Write a checkpoint for `config` (a config.json dict) into `out`, atomically: into a private temporary
    directory beside it, renamed to `out` when complete. When another writer completes the same checkpoint
    (same config, seed and sparseness) first, its copy is kept and returned. Never deletes a non-empty `out`."""
    out = Path(out)
    marker = {"version": GENERATOR_VERSION, "seed": seed, "sparse": sparse}
    if _same_checkpoint(out, config, marker):
        return out
    _refuse_occupied(out)
    cfg = ModelConfig.from_dict(config, source="synthetic config")
    if cfg.quant is None:
        raise GeneratorError("the generator writes the INT4 format; the config needs quantization_config")
    plan = shard_plan(cfg)
    total = sum(spec_nbytes(s) for sh in plan for _, s in sh.tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_space(out, disk_bytes(cfg, plan, sparse))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".partial-"))  # one per writer
    lock = _lock(tmp)  # held until the directory is in place or gone: clean_stale_partials leaves it alone
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep the checkpoint from other users
        _write_files(tmp, cfg, plan, total, config, seed, sparse, progress)
        (tmp / MARKER).write_text(json.dumps(marker))  # last: a directory with it is complete
        try:
            os.replace(tmp, out)  # atomic; fails when `out` is a non-empty directory (another writer won)
        except OSError:
            if not _same_checkpoint(out, config, marker):
                _refuse_occupied(out)
                raise
            log.info("%s was completed by another writer meanwhile; keeping that copy", out)
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        (out / LOCK).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    log.info("wrote %s (%.2f GB of tensors%s)", out, total / 1e9, ", sparse" if sparse else "")
    return out


def disk_bytes(cfg: ModelConfig, plan: list[Shard], sparse: bool) -> int:
    """What the checkpoint takes on disk: the shards (headers, and tensor data unless sparse: holes take
    none), the index, the tokenizer and the small files, each rounded up to whole blocks."""
    shards = [len(_header(sh.tensors)[0]) + (0 if sparse else sum(spec_nbytes(s) for _, s in sh.tensors))
              for sh in plan]
    index = 64 + sum(len(name) + len(sh.file) + 16 for sh in plan for name, _ in sh.tensors)  # '    "name": "file",'
    tokenizer = 32 * cfg.vocab_size  # a line per rank: base64 bytes and the rank
    small = 64 << 10  # config.json, tokenizer_config.json, the chat template, the marker
    return sum(-(-n // _BLOCK) * _BLOCK for n in shards + [index, tokenizer, small])


def _check_space(out: Path, need: int) -> None:
    want = need + int(need * SPACE_MARGIN) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if want > free:
        raise GeneratorError(f"writing {out.name} needs {human_bytes(want)} ({human_bytes(need)} of files and "
                             f"{human_bytes(want - need)} to spare) but {out.parent} has {human_bytes(free)} free; "
                             "free space or choose a smaller preset")


def human_bytes(n: float) -> str:
    """Bytes in the largest SI unit that keeps the number >= 1, to 3 significant figures: 812 B, 3.15 MB,
    594 GB (GB = 10^9, as everywhere here)."""
    units = ("B", "KB", "MB", "GB", "TB")
    k = 0
    while k + 1 < len(units) and n >= 1000 ** (k + 1):
        k += 1
    v = n / 1000 ** k
    return f"{v:.0f} {units[k]}" if k == 0 or v >= 100 else f"{v:.{1 if v >= 10 else 2}f} {units[k]}"


def _lock(tmp: Path) -> int:
    """Lock tmp for this writer (the kernel lets go when the process dies, however it dies): an open fd.
    The lock file gets its name only once locked, so a cleaner never finds it unlocked while we live."""
    fd = os.open(tmp / (LOCK + ".new"), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())  # for whoever looks; the lock is what counts
    os.rename(tmp / (LOCK + ".new"), tmp / LOCK)
    return fd


def clean_stale_partials(directory: Path) -> int:
    """Remove the `.partial-*` directories in `directory` that no writer is using any more (one killed
    mid-write, kill -9 or a power cut, leaves up to a checkpoint's size behind): those whose lock file no
    process holds, or without a lock file and older than UNLOCKED_STALE_S. Returns the bytes freed."""
    freed = 0
    for d in directory.glob("*.partial-*"):
        try:
            fd = os.open(d / LOCK, os.O_RDONLY)
        except FileNotFoundError:  # written before locks existed, or its writer is between mkdtemp and _lock
            try:
                if d.is_dir() and time.time() - d.stat().st_mtime > UNLOCKED_STALE_S:
                    freed += _remove(d)
            except OSError:  # renamed or removed meanwhile
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        else:
            freed += _remove(d)  # nothing if its writer renamed it into place meanwhile
        finally:
            os.close(fd)
    return freed


def _remove(d: Path) -> int:
    size = sum(f.stat().st_blocks * 512 for f in d.rglob("*") if f.is_file())
    shutil.rmtree(d, ignore_errors=True)
    log.warning("removed %s (%s), left by a writer that was interrupted", d, human_bytes(size))
    return size


def _same_checkpoint(out: Path, config: dict, marker: dict) -> bool:
    """True when `out` is a complete generated checkpoint of exactly this config, seed and sparseness."""
    try:
        return (json.loads((out / MARKER).read_text()) == marker
                and json.loads((out / "config.json").read_text()) == json.loads(json.dumps(config)))
    except (OSError, ValueError):
        return False


def _refuse_occupied(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise GeneratorError(f"{out} exists and is not empty (and is not this checkpoint); choose a new directory "
                             "(nothing was overwritten)")
    if out.exists() and not out.is_dir():
        raise GeneratorError(f"{out} is a file; choose a directory name that is free")


def _write_files(tmp: Path, cfg: ModelConfig, plan: list[Shard], total: int, config: dict, seed: int, sparse: bool,
                 progress: Progress | None) -> None:
    done = 0
    weight_map: dict[str, str] = {}
    for sh in plan:
        head, data_len = _header(sh.tensors)
        with open(tmp / sh.file, "wb") as f:
            f.write(head)
            if sparse:
                f.truncate(len(head) + data_len)  # a hole: reads as zeros, takes no disk
            for name, spec in sh.tensors:
                weight_map[name] = sh.file
                if not sparse:
                    f.write(tensor_bytes(cfg, name, spec, seed))
                done += spec_nbytes(spec)
                if progress:
                    progress(done, total)
            if not sparse and data_len >= RELOAD_BYTES:
                _leave_page_cache(f)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(tmp, cfg.vocab_size)
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg.eos_token_id}))


def _leave_page_cache(f) -> None:
    """Write f's pages out and drop them from the page cache, so that the first run maps them back from
    disk as a downloaded checkpoint's are: readahead brings them in 2 MB folios (Linux 6.x, ext4 or
    xfs) that the maps take as 2 MB pages, where pages written this boot stay 4 KB ones. k2-slice on a
    2-core Xeon, two interleaved rounds: decode 11.73-11.85 tok/s read back against 11.49-11.50 as
    written (its experts 26.3-27.5 against 25.7-26.2 GB/s). A hint: where the call is missing or
    refused, the pages stay."""
    f.flush()
    if hasattr(os, "posix_fadvise"):
        try:
            os.fdatasync(f.fileno())  # dirty pages are not dropped
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            log.debug("%s stays in the page cache as written: %s", f.name, e)


def write_tokenizer_files(out: Path, vocab_size: int) -> None:
    """tiktoken.model with vocab_size - 256 ranks, plus the real tokenizer_config and chat template."""
    from hybrid.synth.bpe import SAMPLE_CORPUS, train_bpe, write_tiktoken_model
    from hybrid.text.tokenizer import shift_special_ids

    n_ranks = vocab_size - 256
    if n_ranks < 256:
        raise GeneratorError(f"vocab_size {vocab_size} leaves {n_ranks} BPE ranks; need at least 256 (the bytes)")
    ranks = train_bpe([SAMPLE_CORPUS], min(n_ranks, 4096))
    # a full-size vocabulary cannot be learned from a small corpus: fill with tokens no merge reaches
    k = 0
    while len(ranks) < n_ranks:
        tok = b"\xff\xfe" + k.to_bytes(4, "big")
        k += 1
        if tok not in ranks:
            ranks[tok] = len(ranks)
    write_tiktoken_model(out / "tiktoken.model", ranks)
    tc = json.loads((REFERENCE_DIR / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(shift_special_ids(tc, n_ranks), indent=2, ensure_ascii=False))
    shutil.copyfile(REFERENCE_DIR / "chat_template.jinja", out / "chat_template.jinja")


def preset_path(name: str, seed: int = 0) -> Path:
    """Where the cache keeps a preset; it is complete when is_generated(path)."""
    return cache_dir() / f"{name}-seed{seed}-v{GENERATOR_VERSION}"


def is_generated(path: Path) -> bool:
    return (path / MARKER).exists()


def ensure_preset(name: str, seed: int = 0, progress: Progress | None = None) -> Path:
    """Path of a preset checkpoint, generated into the cache directory on first use and reused after."""
    path = preset_path(name, seed)
    if path.parent.is_dir():
        clean_stale_partials(path.parent)
    if is_generated(path):
        return path
    return write_checkpoint(path, preset_config(name), seed=seed, sparse=(name == "k2-full-sparse"), progress=progress)


def preset_makers(seed: int = 0) -> dict[str, Callable[[Progress | None], Path]]:
    """{preset: maker(progress) -> its directory (ensure_preset)}: what hybrid.load and the CLI hand to
    hybrid.runtime.resolve, which may not import this package."""
    return {name: functools.partial(ensure_preset, name, seed) for name in PRESETS}
