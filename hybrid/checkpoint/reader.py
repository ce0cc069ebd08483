"""Safetensors checkpoint reader: index, shard headers, validation, zero-copy memory-mapped views.

Owns every checkpoint quirk (sharding, header parsing, INT4 expert tensors, weight_shape int32/int64,
router bias fp32/bf16). Everything is validated from headers and file sizes before any byte of
tensor data is mapped, so a broken download raises CheckpointError instead of SIGBUS.
It never dequantises or copies tensor data; callers get views.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid.checkpoint.config import ConfigError, ModelConfig
from hybrid.checkpoint.files import INDEX_NAME, SINGLE_NAME, CheckpointError
from hybrid.checkpoint.layout import DTYPE_SIZE, TensorSpec, expert_prefix, expert_shapes, tensor_specs

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# names a checkpoint may carry that the runtime recomputes and ignores
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_NP = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
       "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U16": np.uint16,
       "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass(frozen=True)
class Int4Weight:
    """One routed expert projection in its on-disk compressed-tensors layout (views, no copies)."""

    packed: np.ndarray  # int32 [out, in/8]
    scale: np.ndarray  # bf16 bits as uint16 [out, in/G]
    shape: tuple[int, int]  # logical [out, in]


def read_header(path: Path) -> tuple[dict, int]:
    """Parse one shard's header; returns (entries, data_start). Raises CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header "
                                      "(truncated download? fetch the shard again)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} is impossible for a {size}-byte file "
                                      "(corrupt or truncated shard; fetch it again)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__}: {e}); fetch the shard again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    for name, e in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: corrupt header entry")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPE_SIZE:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise CheckpointError(f"{where}: corrupt header entry (shape {shape!r}, data_offsets {offs!r})")
        begin, end = offs
        want = DTYPE_SIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        if begin < 0 or end - begin != want:
            raise CheckpointError(f"{where}: data_offsets {offs} hold {end - begin} bytes but {dtype}{shape} needs {want}")
        if end > data_len:
            raise CheckpointError(f"{where}: data runs to byte {data_start + end} but the file has {size} bytes "
                                  "(truncated download? fetch the shard again)")
    return header, data_start


class Checkpoint:
    """A validated checkpoint directory. `tensor(name)` and `expert(...)` return zero-copy views."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None, strict: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; pass a checkpoint directory")
        try:
            self.config = config or ModelConfig.from_file(self.path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._file_ends: dict[Path, int] | None = None
        weight_map = self._read_index()
        self._read_shards(weight_map)
        if strict:
            self._check_against_config()

    # ---- opening ------------------------------------------------------------------------
    def _read_index(self) -> dict[str, str]:
        idx = self.path / INDEX_NAME
        if not idx.exists():
            if (self.path / SINGLE_NAME).exists():
                return {}  # single-file checkpoint: the header is the index
            raise CheckpointError(f"{self.path}: neither {INDEX_NAME} nor {SINGLE_NAME} found; is this a checkpoint directory?")
        try:
            d = json.loads(idx.read_text())
            wm = d["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: corrupt index ({e.__class__.__name__}: {e}); fetch it again") from None
        for name, shard in wm.items():
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CheckpointError(f"{idx}: tensor {name} points outside the checkpoint ({shard!r})")
        return wm

    def _read_shards(self, weight_map: dict[str, str]) -> None:
        shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        for shard in shards:
            if not (self.path / shard).is_file():
                first = next((n for n, s in weight_map.items() if s == shard), "?")
                raise CheckpointError(f"{self.path / shard}: shard missing (the index places {first} there); "
                                      "download it or re-run the generator")
        for shard in shards:
            f = self.path / shard
            header, start = read_header(f)
            for name, e in header.items():
                if weight_map and weight_map.get(name) != shard:
                    raise CheckpointError(f"{f}: tensor {name} is not in {INDEX_NAME} under this shard "
                                          f"(index says {weight_map.get(name)!r})")
                b, end = e["data_offsets"]
                self.tensors[name] = TensorInfo(name, f, e["dtype"], tuple(e["shape"]), start + b, end - b)
        for name, shard in weight_map.items():
            if name not in self.tensors:
                raise CheckpointError(f"{self.path / shard}: tensor {name} is listed in {INDEX_NAME} but missing from the shard")

    def _check_against_config(self) -> None:
        specs = tensor_specs(self.config)
        for name, spec in specs.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.path}: tensor {name} is missing (config.json implies it)")
            _check_spec(info, spec)
        for name, info in self.tensors.items():
            if name not in specs and not name.endswith(IGNORED_SUFFIXES):
                raise CheckpointError(f"{info.file}: unexpected tensor {name} (config.json does not imply it; "
                                      "does config.json belong to these shards?)")

    # ---- views --------------------------------------------------------------------------
    def _map(self, file: Path) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            with open(file, "rb") as f:
                # copy-on-write: pages stay shared with the page cache, and numpy/torch see a writable buffer
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = m
        return m

    def file_buffer(self, file: Path, huge_pages: bool = False) -> np.ndarray:
        """The whole shard `file` as a zero-copy 1-D uint8 array (for kernels that take byte offsets).

        huge_pages: advise the map for transparent huge pages (MADV_HUGEPAGE, where the OS has it), for a
        shard whose bytes every decoded token streams from the page cache (mmap mode's experts). The
        first map to fault a page in decides its page-cache folio: through an advised map a 2 MB one,
        which every map then takes as one huge page; through a plain map (the kernel's THP setting is
        usually 'madvise') smaller ones, for as long as the page stays cached: k2-slice's expert shards,
        dropped from the page cache, then the engine's first decode: 96-108 of 1,411 MB each mapped as
        huge pages through plain maps, 1,248-1,350 through advised ones. The experts' kernel read 24.7 and
        25.4 GB/s over the two (2-core Xeon); bench's decode showed no difference beyond its noise. Pages
        cached already keep their folios (a checkpoint written this boot: the README's troubleshooting)."""
        m = self._map(file)
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: plain pages, as before
                pass
        return np.frombuffer(m, dtype=np.uint8)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    def array(self, name: str) -> np.ndarray:
        """Zero-copy numpy view; BF16 comes back as uint16 bits."""
        info = self.info(name)
        count = info.nbytes // DTYPE_SIZE[info.dtype]
        if count == 0:
            return np.zeros(info.shape, _NP[info.dtype])
        a = np.frombuffer(self._map(info.file), dtype=_NP[info.dtype], count=count, offset=info.offset)
        return a.reshape(info.shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy torch view; BF16 is viewed as torch.bfloat16 without conversion."""
        t = torch.from_numpy(self.array(name))
        return t.view(torch.bfloat16) if self.info(name).dtype == "BF16" else t

    def expert(self, layer: int, expert: int, proj: str) -> Int4Weight:
        pre = expert_prefix(layer, expert, proj)
        shape = tuple(int(s) for s in self.array(pre + ".weight_shape"))
        want = expert_shapes(self.config, proj)
        if shape != want:
            raise CheckpointError(f"{self.info(pre + '.weight_shape').file}: tensor {pre}.weight_shape holds {list(shape)}, "
                                  f"config.json implies {list(want)}")
        return Int4Weight(self.array(pre + ".weight_packed"), self.array(pre + ".weight_scale"), shape)

    def file_ends(self) -> dict[Path, int]:
        """Shard -> the bytes it must hold (the end of its last tensor); computed once (208k tensors for K2)."""
        if self._file_ends is None:
            self._file_ends = {}
            for info in self.tensors.values():
                self._file_ends[info.file] = max(self._file_ends.get(info.file, 0), info.offset + info.nbytes)
        return dict(self._file_ends)

    def check_files(self) -> None:
        """Re-check that every shard is still present and long enough (cheap: one stat per shard).

        Call before touching mapped data after a long pause: a shard truncated under a live map
        would otherwise end the process with SIGBUS (checkpoint.guard notices one during use).
        """
        for f, n in self.file_ends().items():
            try:
                size = f.stat().st_size
            except OSError as e:
                raise CheckpointError(f"{f}: shard vanished or unreadable during use ({e.strerror})") from None
            if size < n:
                raise CheckpointError(f"{f}: shard shrank to {size} bytes during use, needs {n}")

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive; the map is freed when it goes
                pass
        self._maps.clear()


def _check_spec(info: TensorInfo, spec: TensorSpec) -> None:
    if info.dtype not in spec.dtypes:
        raise CheckpointError(f"{info.file}: tensor {info.name} has dtype {info.dtype}, expected "
                              f"{' or '.join(spec.dtypes)}")
    if info.shape != spec.shape:
        raise CheckpointError(f"{info.file}: tensor {info.name} has shape {list(info.shape)}, config.json implies "
                              f"{list(spec.shape)}")
