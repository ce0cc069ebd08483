"""The disk tier of the prefix cache: latent-cache prefixes kept in a directory across restarts (issue #17).

Owns the file format (header, token ids, payload, checksums), atomic writes, the index built from headers,
the longest-prefix lookup and the size cap (least recently used first). Must not: hold the in-memory pages
(the paged store does), trust a file it has not checked (torn, foreign or corrupt files are skipped with a
log line, never loaded), or parse with pickle. Several processes may share the directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

MAGIC = b"KHPREFIX"
VERSION = 1
FIXED = struct.Struct("<8sII")  # magic, format version, length of the JSON header that follows
MAX_HEADER = 1 << 16  # the JSON header is a few hundred bytes; more is not one of ours
SUFFIX = ".kvp"
TEMP_SUFFIX = ".tmp"  # ".<name>.<pid>.<random>.tmp" while written; os.replace gives it its name
STALE_TEMP_S = 3600  # a temp file older than this is a crash's leftover even if its pid runs again
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TOKEN = np.dtype("<u4")  # token ids on disk
# File: FIXED | header JSON | token ids [n] uint32 | payload: kv [layers, n, L] then pe [layers, n, R], raw
# bits in the layout's dtype (bf16 as its 16 bits), little-endian like every host this runs on.


@dataclass(frozen=True)
class KVLayout:
    """What one cached position holds: per layer, the normed latent (kv_dim, L = kv_lora_rank) and the roped
    key (pe_dim, R = qk_rope_head_dim), in `dtype` ("bfloat16" or "float32")."""
    layers: int
    kv_dim: int
    pe_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if min(self.layers, self.kv_dim, self.pe_dim) < 1:
            raise ValueError(f"KVLayout needs positive layers, kv_dim and pe_dim, got {self}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def payload_bytes(self, n: int) -> int:
        """Bytes of n positions' kv and pe over every layer."""
        return self.layers * n * (self.kv_dim + self.pe_dim) * self.torch_dtype.itemsize


@dataclass(frozen=True, eq=False)
class Entry:
    """One file in the index. tokens: its token ids (read-only uint32); nbytes: the file's size."""
    path: Path
    tokens: np.ndarray
    nbytes: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


class Corrupt(Exception):
    """A file of ours (our identity and layout) whose contents are wrong: it is deleted."""


class Foreign(Exception):
    """Not a file this cache may use (another format, version, identity or layout): it is left alone."""


class DiskPrefixCache:
    """Prefixes of the latent cache in `directory`, for the checkpoint named by `identity` (the caller's hash
    of its config and index) in `layout`, within `max_bytes` of files."""

    def __init__(self, directory: Path, identity: str, layout: KVLayout, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.identity = identity
        self.layout = layout
        self.max_bytes = max_bytes
        self._entries: dict[str, Entry] = {}  # file name -> entry
        self._used: dict[str, int] = {}  # file name -> last use, ns (the file's mtime, which load moves on)
        self._clock = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(f"no write access to {self.directory}")
        except OSError as e:
            raise ValueError(f"prefix_cache_dir (--prefix-cache-dir): cannot use {self.directory} "
                             f"({e.strerror or e}); name a directory you can write, or leave it out") from None
        self.refresh()

    def __len__(self) -> int:
        return len(self._entries)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def refresh(self) -> None:
        """Bring the index up to the directory: read the headers of files not indexed yet (never a payload),
        forget files gone, remove temp files left by a crash. Other processes may write here meanwhile."""
        names = set()
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(TEMP_SUFFIX):
                self._remove_if_stale(path)
                continue
            names.add(path.name)
            if path.name in self._entries or not path.is_file():
                continue
            try:
                with path.open("rb") as f:
                    tokens, _, _, size = self._read_header(f)
                    mtime = os.fstat(f.fileno()).st_mtime_ns
            except FileNotFoundError:  # removed by another process since iterdir
                continue
            except (Corrupt, Foreign, OSError) as e:
                self._skip(path, e)
                continue
            self._entries[path.name] = Entry(path, tokens, size)
            self._used[path.name] = mtime
            self._clock = max(self._clock, mtime)
        for name in set(self._entries) - names:
            self._forget(name)

    def longest(self, tokens: list[int]) -> tuple[int, Entry] | None:
        """(length, entry) of the entry sharing the longest common prefix with tokens (the most recently used
        among equals), or None when none shares a first token."""
        if not tokens or not self._entries:
            return None
        query = np.asarray(tokens, dtype=np.int64)
        best: tuple[int, int, Entry] | None = None
        for name, entry in self._entries.items():
            m = min(len(query), entry.n_tokens)
            differ = np.flatnonzero(query[:m] != entry.tokens[:m])
            k = int(differ[0]) if differ.size else m
            if k > 0 and (best is None or (k, self._used[name]) > best[:2]):
                best = (k, self._used[name], entry)
        return None if best is None else (best[0], best[2])

    def load(self, entry: Entry, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first n positions of entry: kv [layers, n, L], pe [layers, n, R], on the CPU in the layout's
        dtype. The whole payload's checksum is verified first; on any mismatch or IO error: None, a warning
        naming the file and why, the entry dropped from the index (and a corrupt file deleted)."""
        if not 1 <= n <= entry.n_tokens:
            raise ValueError(f"load n={n}: the entry holds {entry.n_tokens} positions")
        lay = self.layout
        try:
            with entry.path.open("rb") as f:
                tokens, nbytes, checksum, _ = self._read_header(f)
                if not np.array_equal(tokens, entry.tokens):
                    raise Corrupt("its token ids changed since it was indexed")
                payload = bytearray(nbytes)
                if f.readinto(payload) != len(payload) or f.read(1):
                    raise Corrupt("its payload is not the length its header gives (torn?)")
        except FileNotFoundError:
            log.warning("prefix cache: %s vanished before it could be loaded (another process?)", entry.path)
            self._forget(entry.path.name)
            return None
        except (Corrupt, Foreign, OSError) as e:
            self._skip(entry.path, e)
            self._forget(entry.path.name)
            return None
        if hashlib.blake2b(payload, digest_size=16).hexdigest() != checksum:
            self._skip(entry.path, Corrupt("its payload does not match its checksum"))
            self._forget(entry.path.name)
            return None
        self._touch(entry.path.name)
        total = entry.n_tokens
        flat = torch.frombuffer(payload, dtype=lay.torch_dtype)  # the bytes as they are: bf16 keeps its bits
        kv = flat[: lay.layers * total * lay.kv_dim].view(lay.layers, total, lay.kv_dim)  # [layers, N, L]
        pe = flat[lay.layers * total * lay.kv_dim:].view(lay.layers, total, lay.pe_dim)  # [layers, N, R]
        if n == total:
            return kv, pe
        return kv[:, :n].contiguous(), pe[:, :n].contiguous()

    def save(self, tokens: list[int], kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Keep kv [layers, n, L] and pe [layers, n, R] (CPU, the layout's dtype) for tokens (n ids). Nothing is
        written when a file already holds these tokens or a longer prefix of them, or when the file alone
        would pass max_bytes; files holding a shorter prefix are replaced. Then the least recently used
        files go until the total fits. An IO error (a full disk) is logged, not raised: this is a cache."""
        self._check(tokens, kv, pe)
        ids = np.asarray(tokens, dtype=np.int64)
        for name, entry in list(self._entries.items()):
            if entry.n_tokens >= len(ids) and np.array_equal(entry.tokens[: len(ids)], ids):
                self._touch(name)
                return
        body = [memoryview(t.contiguous().view(torch.uint8).numpy()) for t in (kv, pe)]
        digest = hashlib.blake2b(body[0], digest_size=16)
        digest.update(body[1])
        token_bytes = ids.astype(TOKEN).tobytes()
        header = json.dumps({
            "identity": self.identity, "layout": asdict(self.layout), "byteorder": sys.byteorder,
            "n_tokens": len(ids), "tokens_checksum": hashlib.blake2b(token_bytes, digest_size=16).hexdigest(),
            "payload_bytes": body[0].nbytes + body[1].nbytes, "payload_checksum": digest.hexdigest(),
        }).encode()
        size = FIXED.size + len(header) + len(token_bytes) + body[0].nbytes + body[1].nbytes
        if size > self.max_bytes:
            log.info("prefix cache: %d tokens (%d bytes) pass the cap of %d bytes; not kept",
                     len(ids), size, self.max_bytes)
            return
        name = self._name(token_bytes)
        try:
            self._write(name, [FIXED.pack(MAGIC, VERSION, len(header)), header, token_bytes, *body])
        except OSError as e:
            log.warning("prefix cache: could not write %s: %s", self.directory / name, e)
            return
        self._entries[name] = Entry(self.directory / name, _frozen(ids), size)
        self._touch(name)
        for other, entry in list(self._entries.items()):  # shorter prefixes of this one are now redundant
            if other != name and np.array_equal(ids[: entry.n_tokens], entry.tokens):
                self._delete(other)
        self._evict()

    # ---- the parts ---------------------------------------------------------------------------------

    def _check(self, tokens: list[int], kv: torch.Tensor, pe: torch.Tensor) -> None:
        lay, n = self.layout, len(tokens)
        if n < 1:
            raise ValueError("save needs at least one token")
        if min(tokens) < 0 or max(tokens) >= 1 << 32:
            raise ValueError("save: token ids must fit in 32 bits, unsigned")
        for what, t, shape in (("kv", kv, (lay.layers, n, lay.kv_dim)), ("pe", pe, (lay.layers, n, lay.pe_dim))):
            if tuple(t.shape) != shape or t.dtype != lay.torch_dtype or t.device.type != "cpu":
                raise ValueError(f"save: {what} must be a CPU {lay.dtype} tensor of shape {list(shape)} "
                                 f"(layers, tokens, dim), got {t.dtype} {list(t.shape)} on {t.device}")

    def _read_header(self, f: BinaryIO) -> tuple[np.ndarray, int, str, int]:
        """(token ids, payload bytes, payload checksum, file size) from the start of an open file, checked
        against this cache; Foreign or Corrupt otherwise. Reads the header and the ids, never the payload."""
        fixed = f.read(FIXED.size)
        if len(fixed) < FIXED.size or fixed[:8] != MAGIC:
            raise Foreign("not a prefix-cache file (no magic)")
        _, version, length = FIXED.unpack(fixed)
        if version != VERSION:
            raise Foreign(f"format version {version}, this build reads {VERSION}")
        if length > MAX_HEADER:
            raise Foreign(f"a header of {length} bytes")
        try:
            header = json.loads(f.read(length))
            identity, layout = header["identity"], KVLayout(**header["layout"])
            n, payload = int(header["n_tokens"]), int(header["payload_bytes"])
            checksum, token_checksum = str(header["payload_checksum"]), str(header["tokens_checksum"])
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise Foreign(f"an unreadable header ({e})") from None
        if identity != self.identity:
            raise Foreign(f"another checkpoint ({identity!r})")
        if layout != self.layout or header.get("byteorder") != sys.byteorder:
            raise Foreign(f"another layout ({layout}, {header.get('byteorder')}-endian)")
        size = os.fstat(f.fileno()).st_size  # checked before reading: a wild n must not size a read
        if n < 1 or payload != self.layout.payload_bytes(n) or size != FIXED.size + length + n * TOKEN.itemsize + payload:
            raise Corrupt(f"{size} bytes, not what its header gives for {n} tokens (torn?)")
        token_bytes = f.read(n * TOKEN.itemsize)
        if hashlib.blake2b(token_bytes, digest_size=16).hexdigest() != token_checksum:
            raise Corrupt("its token ids do not match their checksum")
        return _frozen(np.frombuffer(token_bytes, dtype=TOKEN)), payload, checksum, size

    def _name(self, token_bytes: bytes) -> str:
        """The file name: a hash of identity, layout and token ids (so a file is found again by its tokens)."""
        h = hashlib.blake2b(digest_size=20)
        for part in (self.identity.encode(), json.dumps(asdict(self.layout), sort_keys=True).encode(), token_bytes):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest() + SUFFIX

    def _write(self, name: str, parts: list) -> None:
        """Write parts to name atomically: a temp file in the directory, fsync, os.replace, fsync the directory.
        Readers see the old file, the new one or none, never half of one."""
        temp = self.directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            with temp.open("wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.directory / name)
        finally:
            temp.unlink(missing_ok=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)

    def _evict(self) -> None:
        """Delete the least recently used files until the total fits max_bytes."""
        total = self.total_bytes()
        for name in sorted(self._entries, key=self._used.__getitem__):
            if total <= self.max_bytes:
                break
            total -= self._entries[name].nbytes
            self._delete(name)

    def _touch(self, name: str) -> None:
        """Mark name used now, in the index and in its mtime (so a restart sees the same order)."""
        self._clock = max(self._clock + 1, time.time_ns())  # strictly increasing, even within a clock tick
        self._used[name] = self._clock
        try:
            os.utime(self._entries[name].path, ns=(self._clock, self._clock))
        except OSError:  # gone (another process evicted it) or read-only: the index still orders it
            pass

    def _delete(self, name: str) -> None:
        entry = self._entries[name]
        self._forget(name)
        entry.path.unlink(missing_ok=True)

    def _forget(self, name: str) -> None:
        self._entries.pop(name, None)
        self._used.pop(name, None)

    def _skip(self, path: Path, why: Exception) -> None:
        """Log why path is not used; delete it when it is ours and corrupt."""
        if isinstance(why, Corrupt):
            log.warning("prefix cache: deleting %s: %s", path, why)
            path.unlink(missing_ok=True)
        else:
            log.warning("prefix cache: skipping %s: %s", path, why)

    def _remove_if_stale(self, path: Path) -> None:
        """Remove a temp file whose writer is gone (a crash mid-save); another live writer's is left alone."""
        parts = path.name.split(".")  # "", name, "kvp", pid, random, "tmp"
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is not None and _running(pid) and age < STALE_TEMP_S:
            return
        log.warning("prefix cache: removing %s, left by a save that did not finish", path)
        path.unlink(missing_ok=True)


def _frozen(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64, copy=True)
    ids.flags.writeable = False
    return ids


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
