"""What crosses the network, byte for byte: the join handshake (raw bytes in the TCP store) and the
per-layer messages (uint8 tensors over gloo), in one fixed, versioned, little-endian format.

Owns packing and parsing; nothing here touches a socket. Parsing never evaluates what arrives (no
pickle, no JSON): fixed structs, then at most one UTF-8 text field that is only ever printed.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"KHC\x00"
VERSION = 3  # bump on any change below; head and node refuse each other across versions (2: bytes in replies;
# 3: speed, budget and a share's holdings at join, replicas in the plan)
TEXT_MAX = 2048  # bytes of a message's text field (a refusal's reason, a node's name)

_PREFIX = struct.Struct("<4sHH")  # magic, version, a small field per message (world, status)
_HELLO = struct.Struct("<4sHHI16s32s32s32s")  # + node_timeout_ms, nonce, config/index/data hashes
_JOIN = struct.Struct("<4sHH16s32s32s32s32sQHdQH")  # + status, node nonce, 3 hashes, proof, ram bytes, threads,
# measured GB/s, RAM budget for experts (bytes), flags (HOLDS_SHARE)
_VERDICT = struct.Struct("<4sHHh32s")  # + status, rank (-1: refused), head proof
_READY = struct.Struct("<4sHH32s")  # + status, plan hash
_PLAN = struct.Struct("<4sHHHI")  # + world, moe layers, experts per layer; then owner uint8 [layers, E] and
# holders uint64 [layers, E] (bit r: rank r holds the expert)
_HOLDS = struct.Struct("<4sHHHI")  # + spare, moe layers, experts per layer; then bits [layers, E] (np.packbits)

OK, REFUSED = 0, 1
HOLDS_SHARE = 1  # Join.flags: the node holds only a share (kimi-hybrid split); its holdings follow in the store


class WireError(ValueError):
    """A message that is not ours, or from another protocol version; the text says which."""


@dataclass(frozen=True)
class Identity:
    """What a checkpoint is, as head and nodes compare it (cluster.identity computes it)."""

    config: bytes  # sha256 of config.json
    index: bytes  # sha256 of model.safetensors.index.json (or the single file's header)
    data: bytes  # sha256 over each shard's name, size and sampled bytes


@dataclass(frozen=True)
class Hello:
    world: int  # ranks, the head included
    node_timeout_ms: int
    nonce: bytes  # 16 random bytes of this session: what join proofs are computed over
    identity: Identity


@dataclass(frozen=True)
class Join:
    status: int  # OK, or REFUSED (the node cannot serve: text says why)
    nonce: bytes  # the node's 16 random bytes: what the head's proof is computed over
    identity: Identity
    proof: bytes  # HMAC-SHA256(token, b"join" + hello nonce + rank)
    ram_bytes: int
    cpu_threads: int
    text: str  # the node's name (host and address), or why it refuses
    gbps: float = 0.0  # its measured read bandwidth (cluster.figures): placement's speed
    budget_bytes: int = 0  # RAM it gives its experts: placement's capacity
    flags: int = 0  # HOLDS_SHARE


@dataclass(frozen=True)
class Verdict:
    rank: int  # -1: refused
    proof: bytes  # HMAC-SHA256(token, b"head" + node nonce): the head knows the token too
    text: str  # why it was refused


def _text(b: bytes) -> str:
    return b[:TEXT_MAX].decode("utf-8", "replace")


def _enc(s: str) -> bytes:
    return s.encode("utf-8")[:TEXT_MAX]


def _check(raw: bytes, what: str, size: int) -> None:
    if len(raw) < _PREFIX.size:
        raise WireError(f"{what}: {len(raw)} bytes is not a kimi-hybrid cluster message")
    magic, version, _ = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise WireError(f"{what}: not a kimi-hybrid cluster message (magic {magic!r}); is something else "
                        "listening on that port?")
    if version != VERSION:
        raise WireError(f"{what}: cluster protocol version {version}, this side speaks {VERSION}; install the "
                        "same kimi-hybrid version on the head and every node")
    if len(raw) < size:
        raise WireError(f"{what}: truncated message ({len(raw)} of {size} bytes)")


def pack_hello(h: Hello) -> bytes:
    i = h.identity
    return _HELLO.pack(MAGIC, VERSION, h.world, h.node_timeout_ms, h.nonce, i.config, i.index, i.data)


def parse_hello(raw: bytes) -> Hello:
    _check(raw, "the head's hello", _HELLO.size)
    _, _, world, timeout_ms, nonce, c, x, d = _HELLO.unpack_from(raw)
    return Hello(world, timeout_ms, nonce, Identity(c, x, d))


def pack_join(j: Join) -> bytes:
    i = j.identity
    return _JOIN.pack(MAGIC, VERSION, j.status, j.nonce, i.config, i.index, i.data, j.proof, j.ram_bytes,
                      j.cpu_threads, j.gbps, j.budget_bytes, j.flags) + _enc(j.text)


def parse_join(raw: bytes) -> Join:
    _check(raw, "a node's join", _JOIN.size)
    _, _, status, nonce, c, x, d, proof, ram, threads, gbps, budget, flags = _JOIN.unpack_from(raw)
    if not (gbps >= 0 and gbps < 1e6):  # also NaN
        raise WireError(f"a node's join: bandwidth {gbps!r} GB/s is not a measurement")
    return Join(status, nonce, Identity(c, x, d), proof, ram, threads, _text(raw[_JOIN.size:]), gbps, budget, flags)


def pack_verdict(v: Verdict) -> bytes:
    return _VERDICT.pack(MAGIC, VERSION, OK if v.rank > 0 else REFUSED, v.rank, v.proof) + _enc(v.text)


def parse_verdict(raw: bytes) -> Verdict:
    _check(raw, "the head's verdict", _VERDICT.size)
    _, _, _, rank, proof = _VERDICT.unpack_from(raw)
    return Verdict(rank, proof, _text(raw[_VERDICT.size:]))


def pack_ready(plan_hash: bytes, problem: str = "") -> bytes:
    return _READY.pack(MAGIC, VERSION, REFUSED if problem else OK, plan_hash) + _enc(problem)


def parse_ready(raw: bytes) -> tuple[bytes, str]:
    """-> (the plan hash the node built its share from, its problem or '')."""
    _check(raw, "a node's ready", _READY.size)
    _, _, status, plan_hash = _READY.unpack_from(raw)
    return plan_hash, (_text(raw[_READY.size:]) or "refused") if status != OK else ""


def pack_plan(world: int, owner: np.ndarray, holders: np.ndarray) -> bytes:
    """owner uint8 [moe layers, E]: each routed expert's primary rank; holders uint64 [moe layers, E]:
    bit r set when rank r holds it (the owner and its replicas)."""
    layers, experts = owner.shape
    return (_PLAN.pack(MAGIC, VERSION, world, layers, experts) + owner.astype(np.uint8).tobytes()
            + holders.astype("<u8").tobytes())


def parse_plan(raw: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """-> (world, owner uint8 [moe layers, E], holders uint64 [moe layers, E])."""
    _check(raw, "the head's plan", _PLAN.size)
    _, _, world, layers, experts = _PLAN.unpack_from(raw)
    body = raw[_PLAN.size:]
    n = layers * experts
    if len(body) != 9 * n:
        raise WireError(f"the head's plan: {len(body)} bytes of owners and holders for {layers} x {experts} experts")
    owner = np.frombuffer(body[:n], dtype=np.uint8).reshape(layers, experts).copy()
    return world, owner, np.frombuffer(body[n:], dtype="<u8").reshape(layers, experts).astype(np.uint64)


def pack_holds(holds: np.ndarray) -> bytes:
    """holds bool [moe layers, E]: the routed experts a node's share (kimi-hybrid split) contains."""
    layers, experts = holds.shape
    return _HOLDS.pack(MAGIC, VERSION, 0, layers, experts) + np.packbits(holds.astype(bool), axis=None).tobytes()


def parse_holds(raw: bytes) -> np.ndarray:
    _check(raw, "a node's holdings", _HOLDS.size)
    _, _, _, layers, experts = _HOLDS.unpack_from(raw)
    bits = np.frombuffer(raw[_HOLDS.size:], dtype=np.uint8)
    if bits.size != -(-layers * experts // 8):
        raise WireError(f"a node's holdings: {bits.size} bytes for {layers} x {experts} experts")
    return np.unpackbits(bits, count=layers * experts).reshape(layers, experts).astype(bool)


# ---- per MoE layer, over gloo -------------------------------------------------------------------
# A request: a fixed-size head (room for one token inline), then, for T > 1, one payload message.
# payload(T): x fp32 [T, D], weights fp32 [T, K], ids int32 [T, K], assign uint8 [T, K] (rank per pair)
# A reply: a fixed trailer, then y fp32 [T, D] (the node's weighted sum over the pairs assigned to it).
_REQ = struct.Struct("<HHIIIIQ")  # cmd, status, layer, T, K, D, seq
_REPLY = struct.Struct("<QIIdQQQ")  # seq, status, experts computed, compute_s, expert bytes, disk bytes, spare
REQ_HEAD = 32  # bytes (_REQ padded)
REPLY_HEAD = 48
LAYER, PING, STOP = 1, 2, 3
TAG_REQUEST, TAG_PAYLOAD, TAG_REPLY = 1, 2, 3  # gloo tags: requests, multi-token payloads, replies


@dataclass(frozen=True)
class Request:
    cmd: int
    layer: int
    tokens: int
    seq: int


@dataclass(frozen=True)
class Reply:
    seq: int
    status: int  # OK, or REFUSED (the node failed; its error is in the store)
    experts: int  # distinct experts the node computed for this layer
    compute_s: float  # the node's own time for them
    expert_bytes: int = 0  # routed-expert bytes its kernels read for them
    disk_bytes: int = 0  # of those, read from its disk (cache mode misses)


def payload_nbytes(T: int, K: int, D: int) -> int:
    n = T * D * 4 + T * K * 9
    return -(-n // 8) * 8


def request_nbytes(K: int, D: int) -> int:
    """The fixed size of every request message: its head plus one token's payload."""
    return REQ_HEAD + payload_nbytes(1, K, D)


def pack_request(buf: np.ndarray, cmd: int, layer: int, seq: int, x: np.ndarray | None = None,
                 ids: np.ndarray | None = None, w: np.ndarray | None = None, assign: np.ndarray | None = None,
                 payload: np.ndarray | None = None) -> None:
    """Fill buf (uint8, request_nbytes) with a request; a LAYER of T tokens writes its payload inline
    when T == 1, else into `payload` (uint8, payload_nbytes(T, K, D)), sent next."""
    T, D = (x.shape if x is not None else (0, 0))
    K = ids.shape[1] if ids is not None else 0
    buf[:REQ_HEAD] = 0
    _REQ.pack_into(buf, 0, cmd, 0, layer, T, K, D, seq)
    if cmd == LAYER:
        dst = buf[REQ_HEAD:] if T == 1 else payload
        x_, w_, ids_, a_ = payload_views(dst, T, K, D)
        x_[...], w_[...], ids_[...], a_[...] = x, w, ids, assign


def parse_request(buf: np.ndarray) -> tuple[Request, int, int]:
    """-> (the request, K, D)."""
    cmd, _, layer, T, K, D, seq = _REQ.unpack_from(buf, 0)
    if cmd not in (LAYER, PING, STOP):
        raise WireError(f"unknown request {cmd} from the head (protocol mismatch?)")
    return Request(cmd, layer, T, seq), K, D


def payload_views(buf: np.ndarray, T: int, K: int, D: int) -> tuple[np.ndarray, ...]:
    """(x fp32 [T, D], w fp32 [T, K], ids int32 [T, K], assign uint8 [T, K]) viewing buf."""
    o1, o2, o3 = T * D * 4, T * D * 4 + T * K * 4, T * D * 4 + T * K * 8
    x = buf[:o1].view(np.float32).reshape(T, D)
    w = buf[o1:o2].view(np.float32).reshape(T, K)
    ids = buf[o2:o3].view(np.int32).reshape(T, K)
    return x, w, ids, buf[o3:o3 + T * K].reshape(T, K)


def pack_reply(buf: np.ndarray, r: Reply) -> None:
    buf[:REPLY_HEAD] = 0
    _REPLY.pack_into(buf, 0, r.seq, r.status, r.experts, r.compute_s, r.expert_bytes, r.disk_bytes, 0)


def parse_reply(buf: np.ndarray) -> Reply:
    seq, status, experts, compute_s, expert_bytes, disk_bytes, _ = _REPLY.unpack_from(buf, 0)
    return Reply(seq, status, experts, compute_s, expert_bytes, disk_bytes)


def reply_sum(buf: np.ndarray, T: int, D: int) -> np.ndarray:
    """y fp32 [T, D] viewing a reply buffer."""
    return buf[REPLY_HEAD:REPLY_HEAD + T * D * 4].view(np.float32).reshape(T, D)


# ---- addresses ----------------------------------------------------------------------------------
def parse_address(text: str, what: str = "listen") -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port); ValueError naming `what` otherwise."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{what} must be HOST:PORT (for example 192.168.1.10:29400), got {text!r}")
    return host, int(port)


def is_wildcard(host: str) -> bool:
    """True for an address that binds every interface (0.0.0.0, ::, '*')."""
    if host in ("*", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
