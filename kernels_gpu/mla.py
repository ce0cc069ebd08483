"""MLA attention cores for the GPU side: absorbed decode over the latent cache, chunked naive prefill.

Owns scores, causal mask, softmax and the value mix, given projected (and roped) queries and the
cache; projections, rope, cache writes and o_proj stay in the model. Pure functions on tensors, any
device and dtype (softmax always in fp32); imports nothing from hybrid/. Never builds a T x S matrix.
Letters: T new tokens (queries), S cache positions (keys), H heads, P nope dim, R rope dim,
L kv_lora_rank (latent), V value dim, C query chunk, B key block, N = T*H query rows.
Causal rule everywhere: query t sits at position offset + t and sees key positions s <= offset + t.
"""
from __future__ import annotations

import torch

Offset = int | torch.Tensor  # a Python int, or a 0-d integer tensor on the device (CUDA-graph friendly)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, P], w_uk [H, P, L] (kv_b_proj.view(H, P+V, L)[:, :P]) -> q_lat [T, H, L]."""
    return torch.einsum("thp,hpl->thl", q_nope, w_uk)


def _visible(q_pos: torch.Tensor, k0: int, k1: int, device: torch.device) -> torch.Tensor:
    """Bool [len(q_pos), k1 - k0]: True where key position k0.. is visible from query position q_pos."""
    return torch.arange(k0, k1, device=device)[None, :] <= q_pos[:, None]


def _online_step(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, s: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key block of an online softmax. s [..., n, B] fp32 scores (-inf where masked),
    v [..., B, Dv]; state m, l [..., n, 1] fp32 (running max, running sum), acc [..., n, Dv] fp32."""
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
    alpha = torch.exp(m - m_safe)  # rescales what was accumulated under the old max; 0 when m = -inf
    p = torch.exp(s - m_safe)
    return m_new, l * alpha + p.sum(-1, keepdim=True), acc * alpha + (p.to(v.dtype) @ v).float()


# ---- decode: absorbed form over the latent cache -----------------------------------------------

def mla_decode(q: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               w_uk: torch.Tensor | None, w_uv: torch.Tensor | None, softmax_scale: float, offset: Offset,
               *, absorbed: bool = False, block: int | None = None) -> torch.Tensor:
    """Absorbed-MLA attention of a few new tokens over the latent cache -> o [T, H, V].

    q: q_nope [T, H, P] (absorbed here with w_uk [H, P, L]), or q_lat [T, H, L] when absorbed=True
    (w_uk may then be None). q_pe [T, H, R] roped. kv [S, L] normed latent, k_pe [S, R] roped: the
    cache rows of one layer, positions 0..S-1, S >= offset + T (the new tokens already written).
    w_uv [H, V, L] (kv_b_proj.view(H, P+V, L)[:, P:]), or None: return the attention's latent o_lat
    [T, H, L] for the caller to apply it. offset: position of the first new token, an int
    or a 0-d device tensor (then S may be a fixed bucket larger than offset + T: a CUDA graph
    replays the same shapes while the length lives on the device).
    All H heads share one 576-value key and one 512-value value per position (MQA), so the cache is
    read as it is stored: never expanded per head, never copied or concatenated.
    block: None scores all S keys at once ([N, S] fp32; two GEMMs over kv, so the latent crosses DRAM
    twice unless it fits in L2); an int walks the cache in blocks of that many positions with an
    online softmax, so each block can be served from L2 to its second GEMM (more launches; the
    bench times both, and only a fused kernel reads the cache exactly once).
    """
    T, H = q.shape[:2]
    q_lat = q if absorbed else absorb_query(q, w_uk)  # [T, H, L]
    S, L = kv.shape
    q2, qpe2 = q_lat.reshape(T * H, L), q_pe.reshape(T * H, -1)  # [N, L], [N, R]
    q_pos = offset + torch.arange(T, device=kv.device)  # [T]
    all_visible = isinstance(offset, int) and offset >= S - 1

    def scores(k0: int, k1: int) -> torch.Tensor:  # [N, k1 - k0] fp32, -inf where not visible
        s = torch.addmm(qpe2 @ k_pe[k0:k1].T, q2, kv[k0:k1].T).float() * softmax_scale
        if all_visible:
            return s
        vis = _visible(q_pos, k0, k1, kv.device)  # [T, B]
        return s.view(T, H, -1).masked_fill(~vis[:, None, :], float("-inf")).view(T * H, -1)

    if block is None:
        o_lat = torch.softmax(scores(0, S), dim=-1).to(kv.dtype) @ kv  # [N, L]
    else:
        f32 = dict(device=kv.device, dtype=torch.float32)
        m, l = torch.full((T * H, 1), float("-inf"), **f32), torch.zeros((T * H, 1), **f32)
        acc = torch.zeros((T * H, L), **f32)
        for k0 in range(0, S, block):
            k1 = min(S, k0 + block)
            m, l, acc = _online_step(m, l, acc, scores(k0, k1), kv[k0:k1])
        o_lat = (acc / l).to(kv.dtype)
    if w_uv is None:
        return o_lat.view(T, H, L)
    return torch.einsum("thl,hvl->thv", o_lat.view(T, H, L), w_uv)  # [T, H, V]


# ---- prefill: naive form over expanded keys, in causal query blocks --------------------------------

def prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, v: torch.Tensor,
                      k_pe: torch.Tensor, softmax_scale: float, offset: int = 0, *, q_block: int = 64) -> torch.Tensor:
    """Naive-form MLA attention of T prompt tokens over keys and values already expanded -> o [T, H, V].

    q_nope [T, H, P], q_pe [T, H, R] roped; k_nope [H, S, P] and v [H, S, V] (the cache's latent rows
    expanded per head, any strides), k_pe [S, R] roped, S >= offset + T. Queries go in blocks of
    q_block rows, each scored only against the keys its last query sees (offset + c1 of them), the
    mask applied to the block's diagonal square alone: about half the work of scoring every key, in
    [H, q_block, n] batched GEMMs (K = [k_nope, k_pe], 192 wide, built once) whose scores stay in
    cache (64 rows; against the whole-matrix einsums on K2's shapes, 2-core Zen 4: 4.3x for 512
    tokens from position 0, 3x after 256, 1.5x for 128 from 0, level after 256). Softmax in fp32,
    normalised after the value product ([H, C, V] divided, not [H, C, n]).
    """
    T, H, P = q_nope.shape
    R, Vd, n_all = q_pe.shape[-1], v.shape[-1], offset + T
    dt, dev = q_nope.dtype, q_nope.device
    k = torch.empty(H, n_all, P + R, dtype=dt, device=dev)
    k[..., :P] = k_nope[:, :n_all]
    k[..., P:] = k_pe[:n_all]
    out = torch.empty(T, H, Vd, dtype=dt, device=dev)
    future = torch.ones(q_block, q_block, dtype=torch.bool, device=dev).triu_(1)  # a block's diagonal square
    for c0 in range(0, T, q_block):
        c1 = min(T, c0 + q_block)
        n = offset + c1
        q = torch.cat((q_nope[c0:c1], q_pe[c0:c1]), dim=-1).transpose(0, 1)  # [H, C, P+R]
        s = torch.bmm(q, k[:, :n].transpose(1, 2)).float()  # [H, C, n]; the same tensor in fp32
        s *= softmax_scale
        s[:, :, offset + c0:].masked_fill_(future[:c1 - c0, :c1 - c0], float("-inf"))
        s -= s.amax(-1, keepdim=True)
        s.exp_()
        l = s.sum(-1, keepdim=True)
        o = torch.bmm(s.to(dt), v[:, :n]).float() / l  # [H, C, V]
        out[c0:c1] = o.to(dt).transpose(0, 1)
    return out


# ---- prefill: naive form, chunked (bounded memory) ----------------------------------------------

def _expand(kv: torch.Tensor, k_pe: torch.Tensor, w_uk: torch.Tensor,
            w_uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent rows [B, L], k_pe [B, R] -> per-head k_nope [H, B, P], shared k_pe [B, R], v [H, B, V]."""
    return torch.einsum("sl,hpl->hsp", kv, w_uk), k_pe, torch.einsum("sl,hvl->hsv", kv, w_uv)


def chunked_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                              k_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                              softmax_scale: float, offset: int = 0, *, q_chunk: int = 256,
                              k_block: int = 4096) -> torch.Tensor:
    """Naive-form MLA attention for a prompt (chunk) of T tokens -> o [T, H, V].

    q_nope [T, H, P], q_pe [T, H, R] roped; kv [S, L] latent and k_pe [S, R] roped cache rows with
    S >= offset + T (the prompt already written); w_uk [H, P, L], w_uv [H, V, L].
    Keys and values are expanded from the latent cache one key block at a time (K = [k_nope, k_pe],
    192 wide: 3x cheaper per score than the 576-wide absorbed form).
    - All visible keys fit in one block (min(S, offset + T) <= k_block): expand once, then
      prefill_attention (causal blocks of min(q_chunk, 64) queries).
    - Longer: key blocks outer (each expanded once), query chunks inner, online softmax in fp32.
    Memory: H*k_block*(P+R+V) expanded keys and values, a few H*q_chunk*k_block fp32 score blocks
    (K2 defaults: 64*256*4096*4 B = 268 MB each) and a T*H*V fp32 running state (twice the bf16
    output); never T x S, so 256 K of context costs time, not memory. Callers prefill very long
    prompts in model-level chunks of T tokens (each chunk attends to the cache written before it).
    """
    T, H, P = q_nope.shape
    n_vis = min(kv.shape[0], offset + T)  # keys any query of this call can see
    q_pos = torch.arange(offset, offset + T, device=kv.device)
    if n_vis <= k_block:
        k_nope, kpe, v = _expand(kv[:n_vis], k_pe[:n_vis], w_uk, w_uv)
        return prefill_attention(q_nope, q_pe, k_nope, v, kpe, softmax_scale, offset, q_block=min(q_chunk, 64))
    Vd = w_uv.shape[1]
    f32 = dict(device=kv.device, dtype=torch.float32)
    m, l = torch.full((H, T, 1), float("-inf"), **f32), torch.zeros((H, T, 1), **f32)
    acc = torch.zeros((H, T, Vd), **f32)
    qn, qp = q_nope.transpose(0, 1), q_pe.transpose(0, 1)  # [H, T, P], [H, T, R]
    for k0 in range(0, n_vis, k_block):
        k1 = min(n_vis, k0 + k_block)
        k_nope, kpe, v = _expand(kv[k0:k1], k_pe[k0:k1], w_uk, w_uv)  # [H, B, P], [B, R], [H, B, V]
        for c0 in range(max(0, k0 - offset), T, q_chunk):  # earlier queries see nothing of this block
            c1 = min(T, c0 + q_chunk)
            s = (qn[:, c0:c1] @ k_nope.transpose(1, 2) + qp[:, c0:c1] @ kpe.T).float() * softmax_scale  # [H, C, B]
            vis = _visible(q_pos[c0:c1], k0, k1, kv.device)
            s = s.masked_fill(~vis[None], float("-inf"))
            m[:, c0:c1], l[:, c0:c1], acc[:, c0:c1] = _online_step(m[:, c0:c1], l[:, c0:c1], acc[:, c0:c1], s, v)
    return (acc / l).to(q_nope.dtype).transpose(0, 1)  # [T, H, V]
