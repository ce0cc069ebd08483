"""A node's share as a checkpoint of its own (`kimi-hybrid split`): only some routed experts, nothing else.

Owns writing a share (safetensors shards, their index, config.json copied, and SHARE_NAME: which
experts, the identity of the checkpoint it was cut from, a fingerprint of each shard) and opening one
on a node: the reader validates its shards like any other checkpoint's; every tensor the share lists
must be there, of the config's dtype and shape, and its files must still be the ones split wrote.
Non-expert tensors stay on the head. Each error names the file and the tensor.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from hybrid.checkpoint.files import INDEX_NAME, CheckpointError
from hybrid.checkpoint.layout import PROJS, expert_prefix, tensor_specs
from hybrid.checkpoint.reader import Checkpoint, TensorInfo
from hybrid.cluster.identity import SAMPLE, SPOTS, checkpoint_identity
from hybrid.cluster.wire import Identity

SHARE_NAME = "kimi-hybrid-share.json"
FORMAT = 1
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
SHARD_BYTES = 4 << 30  # at most per shard (one expert is never split over two)
CHUNK = 64 << 20  # bytes copied at a time


def is_share(path: str | Path) -> bool:
    return (Path(path) / SHARE_NAME).is_file()


def expert_names(ckpt: Checkpoint, layer: int, e: int) -> list[str]:
    """The routed expert's tensors in ckpt: packed and scales first (in file order), then the shapes, so a
    shard's large tensors keep the alignment of the first."""
    names = [f"{expert_prefix(layer, e, p)}.{s}" for p in PROJS for s in SUFFIXES]
    names = [n for n in names if n in ckpt.tensors]
    return sorted(names, key=lambda n: (n.endswith("weight_shape"), ckpt.tensors[n].offset))


def write_share(src: Checkpoint, holds: np.ndarray, out: Path, rank: int, world: int) -> dict:
    """Write the experts holds (bool [moe layers, E]) marks into the empty or new directory out; -> the
    share's description (what SHARE_NAME holds)."""
    cfg = src.config
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; name a new directory for the share")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for i, layer in enumerate(cfg.moe_layers):
        for e in np.flatnonzero(holds[i]):
            names = expert_names(src, layer, int(e))
            n = sum(src.tensors[t].nbytes for t in names)
            if shards[-1] and size + n > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1] += names
            size += n
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"share-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(src, names, out / fname)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(src.tensors[n].nbytes for n in weight_map)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    shutil.copyfile(src.path / "config.json", out / "config.json")
    desc = {"format": FORMAT, "rank": rank, "world": world, "source": _hex(checkpoint_identity(src)),
            "shards": {f: fingerprint(out / f) for f in sorted(set(weight_map.values()))},
            "experts": {str(layer): np.flatnonzero(holds[i]).tolist() for i, layer in enumerate(cfg.moe_layers)}}
    (out / SHARE_NAME).write_text(json.dumps(desc, indent=1))
    return desc


def _write_shard(src: Checkpoint, names: list[str], path: Path) -> None:
    header, at = {}, 0
    for n in names:
        info = src.tensors[n]
        header[n] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [at, at + info.nbytes]}
        at += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # the data starts 64-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for n in names:
            info = src.tensors[n]
            buf = src.file_buffer(info.file)
            for lo in range(info.offset, info.offset + info.nbytes, CHUNK):
                f.write(memoryview(buf[lo:min(lo + CHUNK, info.offset + info.nbytes)]))


def fingerprint(path: Path) -> str:
    """A shard's size and a few sampled blocks of it, hashed: what tells a damaged or replaced shard."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for frac in SPOTS:
            f.seek(int(max(size - SAMPLE, 0) * frac))
            h.update(f.read(SAMPLE))
    return h.hexdigest()


def _hex(i: Identity) -> dict:
    return {"config": i.config.hex(), "index": i.index.hex(), "data": i.data.hex()}


def _identity(d: dict, where: Path) -> Identity:
    try:
        return Identity(bytes.fromhex(d["config"]), bytes.fromhex(d["index"]), bytes.fromhex(d["data"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: corrupt ({type(e).__name__}: {e}); run kimi-hybrid split again") from None


class ShareCheckpoint(Checkpoint):
    """A share, opened: the reader's checks on every shard, then the share's own (see open_share).
    info() answers for a routed expert the share lacks with one it holds of the same shapes, so the
    expert backends' tables can be built over it; the node never computes those (Server refuses any
    pair of an expert it does not hold), so their bytes are never read."""

    def __init__(self, path: str | Path):
        super().__init__(path, strict=False)
        where = self.path / SHARE_NAME
        try:
            desc = json.loads(where.read_text())
            if desc.get("format") != FORMAT:
                raise ValueError(f"format {desc.get('format')!r}, this version reads {FORMAT}")
            cfg = self.config
            self.holds = np.zeros((len(cfg.moe_layers), cfg.n_routed_experts), bool)
            for i, layer in enumerate(cfg.moe_layers):
                self.holds[i, np.asarray(desc["experts"].get(str(layer), []), np.int64)] = True
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            self.close()
            raise CheckpointError(f"{where}: corrupt ({type(e).__name__}: {e}); run kimi-hybrid split again") from None
        self.source, self.shards = _identity(desc["source"], where), desc.get("shards")
        try:
            self._check(where)
        except CheckpointError:
            self.close()
            raise

    def _check(self, where: Path) -> None:
        specs = tensor_specs(self.config)
        cfg = self.config
        if not self.holds.any():
            raise CheckpointError(f"{where}: the share holds no experts; run kimi-hybrid split again")
        for i, layer in enumerate(cfg.moe_layers):
            for e in np.flatnonzero(self.holds[i]):
                for p in PROJS:
                    for s in SUFFIXES:
                        name = f"{expert_prefix(layer, int(e), p)}.{s}"
                        info = self.tensors.get(name)
                        if info is None:
                            raise CheckpointError(f"{self.path}: tensor {name} is missing ({SHARE_NAME} lists "
                                                  "its expert); run kimi-hybrid split again")
                        spec = specs[name]
                        if info.dtype not in spec.dtypes or tuple(info.shape) != spec.shape:
                            raise CheckpointError(f"{info.file}: tensor {name} has {info.dtype}{list(info.shape)}, "
                                                  f"config.json implies {spec.dtypes[0]}{list(spec.shape)}")
        first = np.argwhere(self.holds)[0]
        self._stand_in = (cfg.moe_layers[first[0]], int(first[1]))
        self._held = {(layer, int(e)) for i, layer in enumerate(cfg.moe_layers) for e in np.flatnonzero(self.holds[i])}
        if checkpoint_identity(self).config != self.source.config:
            raise CheckpointError(f"{self.path / 'config.json'}: differs from the one the share was cut from; run "
                                  "kimi-hybrid split again")
        files = sorted({i.file for i in self.tensors.values()})
        if not isinstance(self.shards, dict) or set(self.shards) != {f.name for f in files}:
            raise CheckpointError(f"{where}: lists other shards than {INDEX_NAME}; run kimi-hybrid split again")
        for f in files:
            if fingerprint(f) != self.shards[f.name]:
                first = min((i for i in self.tensors.values() if i.file == f), key=lambda i: i.offset).name
                raise CheckpointError(f"{f}: differs from what kimi-hybrid split wrote (tensor {first} and those "
                                      "after it; a damaged or replaced file); run kimi-hybrid split again")

    def info(self, name: str) -> TensorInfo:
        if name in self.tensors or ".mlp.experts." not in name:
            return super().info(name)
        layer, e, rest = _parse_expert(name)  # model.layers.{layer}.mlp.experts.{e}.{proj}.{suffix}
        if (layer, e) in self._held:
            return super().info(name)
        layer, e = self._stand_in
        return super().info(f"{expert_prefix(layer, e, '')[:-1]}.{rest}")


def _parse_expert(name: str) -> tuple[int, int, str]:
    head, _, tail = name.partition(".mlp.experts.")
    e, _, rest = tail.partition(".")
    return int(head.rsplit(".", 1)[1]), int(e), rest
