"""A checkpoint's identity, as head and nodes compare it at join: hashes of config.json, of the index,
and of each shard's name, size and a few sampled blocks of tensor data.

Owns reading those few bytes (a few KB per shard, so a 600 GB checkpoint is fingerprinted in moments)
and saying what differs. Two copies that agree on config and index but hold other weights (another
seed, a half-finished download) differ in the sampled data. It never reads a whole tensor.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from hybrid.checkpoint.reader import INDEX_NAME, SINGLE_NAME, Checkpoint, CheckpointError
from hybrid.cluster.wire import Identity

SAMPLE = 4096  # bytes read at each sampled spot
SPOTS = (0.0, 0.37, 0.5, 0.71, 1.0)  # where in each shard's tensor data (fractions of its span)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def checkpoint_identity(ckpt: Checkpoint) -> Identity:
    """The identity of an opened (validated) checkpoint."""
    root = ckpt.path
    try:
        config = _sha((root / "config.json").read_bytes())
        index_file = root / INDEX_NAME
        index = _sha(index_file.read_bytes() if index_file.exists() else _header(root / SINGLE_NAME))
        spans: dict[Path, tuple[int, int]] = {}
        for info in ckpt.tensors.values():
            lo, hi = spans.get(info.file, (info.offset, info.offset + info.nbytes))
            spans[info.file] = (min(lo, info.offset), max(hi, info.offset + info.nbytes))
        data = hashlib.sha256()
        for f in sorted(spans):
            lo, hi = spans[f]
            data.update(f.name.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
            with open(f, "rb") as fh:
                for frac in SPOTS:
                    at = lo + int((max(hi - lo - SAMPLE, 0)) * frac)
                    fh.seek(at)
                    data.update(fh.read(min(SAMPLE, hi - at)))
    except OSError as e:
        raise CheckpointError(f"{root}: cannot read for the cluster's checkpoint identity ({e})") from None
    return Identity(config, index, data.digest())


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(min(n, 100 << 20))


def difference(head: Identity, node: Identity) -> str | None:
    """What differs between the head's checkpoint and a node's, in words; None when they agree."""
    if head.config != node.config:
        return "config.json differs (another model or revision); use the same checkpoint on every machine"
    if head.index != node.index:
        return (f"{INDEX_NAME} differs (another revision or a different sharding); use the same checkpoint "
                "on every machine")
    if head.data != node.data:
        return ("the tensor data differ while config.json and the index agree (another download, a synthetic "
                "checkpoint of another seed, or a damaged shard); copy the head's checkpoint to the node")
    return None


def short(digest: bytes) -> str:
    return digest.hex()[:12]
