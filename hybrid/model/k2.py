"""DeepSeek-V3 / Kimi K2 forward pass as pure math over a plain config and the weights (model/weights.py).

Owns RMSNorm, YaRN rope (interleaved pairs), MLA (naive for prefill, absorbed over the 576-value
latent cache for decode), the sigmoid router, the shared expert and the dense layer, as the pieces a
fixed-shape decode step also calls. Routed experts go through an injected backend (submit / wait).
Letters: T new tokens, S cached + new positions, D hidden, H heads, Q q_lora_rank, L kv_lora_rank,
P qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, E routed experts, K experts per token.
"""
from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch

from kernels_cpu import step_ops
from kernels_gpu.mla import chunked_prefill_attention, mla_decode, prefill_attention

from hybrid.checkpoint.config import ModelConfig
from hybrid.checkpoint.int4 import bf16_to_f32
from hybrid.experts.backend import ExpertBackend
from hybrid.model import cpu_step
from hybrid.model.linear import Weight, absorbed_attention, as_dtype, fp32_linear, linear, linear_pair, prompt_math
from hybrid.model.linear import swiglu as mlp_product
from hybrid.model.paged import PagedKVCache
from hybrid.model.timers import Timers
from hybrid.model.weights import MLPWeights, ModelWeights

LATENT_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps
ABSORB_MAX_TOKENS = 8  # at or below this many new tokens, attend in the absorbed (latent) form
CHUNKED_MIN_SCORES = 1 << 22  # T x S above this: the chunked kernel, never a whole [T, H, S] score matrix
ROPE_ROWS_MAX = 8  # forward passes of at most this many tokens take cos and sin from rope_rows' table
ROPE_BLOCK = 512  # positions a rope call when rope_rows fills its table (K2: 16 K elements, under torch's grain)
NAIVE_MAX_KEYS = 8192  # and above this many keys (K2: each expanded per head is 64 KB in fp32, 32 KB in bf16)

AttnMode = Literal["auto", "naive", "absorbed"]


class KVCache:
    """The compressed MLA cache: per layer, per position, the normed latent [L] and the roped k_pe [R]."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        n = cfg.num_hidden_layers
        self.kv = torch.zeros(n, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)  # [layers, S, L]
        self.pe = torch.zeros(n, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)  # [layers, S, R]
        self.length = 0  # positions filled (all layers)
        self.max_len = max_len

    def truncate(self, n: int) -> None:
        """Forget positions >= n (prefix reuse keeps the common prefix)."""
        self.length = min(self.length, n)

    def spilled(self) -> int:
        """Positions held outside the compute device (a contiguous cache: none)."""
        return 0

    def prepare(self, s0: int, s1: int) -> None:
        """Positions s0..s1-1 about to be written: they must fit."""
        if s1 > self.max_len:
            raise ValueError(f"{s1} positions exceed the KV cache of {self.max_len}; raise the context size")

    def write(self, i: int, s0: int | torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Layer i's rows for the T new positions s0.. (latent [T, L], k_pe [T, R]); s0 an int or a 0-d
        device tensor (written by index: a captured decode step)."""
        if isinstance(s0, torch.Tensor):
            rows = s0 + torch.arange(latent.shape[0], device=latent.device)
            self.kv[i].index_copy_(0, rows, latent.to(self.kv.dtype))
            self.pe[i].index_copy_(0, rows, k_pe.to(self.pe.dtype))
        else:
            self.kv[i, s0:s0 + latent.shape[0]] = latent
            self.pe[i, s0:s0 + latent.shape[0]] = k_pe

    def rows(self, i: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's first S positions: (kv [S, L], k_pe [S, R]), views."""
        return self.kv[i, :S], self.pe[i, :S]

    def attend(self, i: int, S: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float,
               offset: int | torch.Tensor) -> torch.Tensor:
        """Absorbed attention of q_lat [T, H, L], q_pe [T, H, R] over layer i's first S positions -> o_lat."""
        return mla_decode(q_lat, q_pe, self.kv[i, :S], self.pe[i, :S], None, None, scale, offset, absorbed=True)

    def decode_attention(self, *args) -> None:
        """PagedKVCache's one-call decode attention; a contiguous cache has none (None: the caller's steps)."""
        return None


Cache = KVCache | PagedKVCache  # what attention writes and reads: write / rows / prepare, length, max_len


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.dim() == 2 \
            and x.shape[0] <= step_ops.MAX_ROWS and not x.requires_grad:  # a CPU decode step: one Numba call
        return torch.from_numpy(step_ops.rms_norm(x.numpy(), w.numpy(), eps))
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[R/2] rotation frequencies; YaRN blends extrapolated and interpolated ones by a ramp over pairs."""
    R = cfg.qk_rope_head_dim
    pos_freqs = cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    extra = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if not rs:
        return extra
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return R * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), R - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(R // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return extra / factor * ramp + extra * (1 - ramp)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]). x [T, ..., R]; cos/sin [T, R/2] (fp32) -> x's dtype."""
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-1] // 2, 2)  # [T, *, R/2, 2]
    c, s = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(shape).to(x.dtype)


def swiglu(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """x [T, D] -> [T, D] through a dense layer's MLP or a shared expert."""
    return mlp_product(x, w.gate_proj, w.up_proj, w.down_proj)


def moe_sum(shared: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """An MoE layer's output [T, D]: the shared expert's plus the routed sum (fp32 from the backend)."""
    return shared + routed.to(shared.dtype)


class Model:
    """The transformer. `weights` maps Hugging Face tensor names to tensors on the compute device.

    forward() runs layer i as attention_block, then dense_mlp or moe (route, submit, shared_expert,
    wait, moe_sum), then head: the pieces a fixed-shape decode step calls in its own order."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Weight], experts: ExpertBackend, defer_experts: int = 0):
        self.cfg = cfg
        self.w = weights  # by name, as loaded: what the plan counts
        self.weights = ModelWeights.from_names(cfg, weights)  # the same tensors, per layer: what the math reads
        self.experts = experts
        self.device = self.weights.norm.device
        self.dtype = self.weights.norm.dtype  # the compute dtype of the GPU side
        self.inv_freq = yarn_inv_freq(cfg).to(self.device)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # rope_rows' cos, sin of positions 0..n-1
        self._embed_bits: tuple[torch.Tensor, Any] | None = None  # embed's table and a NumPy view of its bits
        self.times = Timers()  # seconds by part, for the bench's split
        self.defer_experts = defer_experts  # experts per token whose output is added one MoE layer late (0 = exact)
        self.prompt_math = "fp32"  # the math of prompt products on a CPU (linear.prompt_math); the engine sets it
        self.cpu_steps: dict[Any, Any] = {}  # per layer and step: model/cpu_step.py's arguments, built on first use
        self._deferred: Any = None

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.cfg, max_len, self.device, self.dtype)

    def forward(self, ids: torch.Tensor, cache: Cache, attn: AttnMode = "auto", last_only: bool = False) -> torch.Tensor:
        """ids [T] at positions cache.length .. cache.length+T-1 -> logits [T, vocab] (fp32), or with
        last_only the last position's [1, vocab] (generation: lm_head over a 4096-token prefill chunk
        costs more than a layer, and its logits take ~4 GB). Prompt products on a CPU in the math
        self.prompt_math says."""
        with prompt_math(self.prompt_math):
            return self._forward(ids, cache, attn, last_only)

    def _forward(self, ids: torch.Tensor, cache: Cache, attn: AttnMode, last_only: bool) -> torch.Tensor:
        T, s0 = ids.shape[0], cache.length
        cache.prepare(s0, s0 + T)
        if T <= ROPE_ROWS_MAX:
            cos, sin = self.rope_rows(s0, T)
        else:
            cos, sin = self.rope(torch.arange(s0, s0 + T, device=self.device))
        h = self.embed(ids)  # [T, D]
        if attn == "auto":
            attn = "absorbed" if T <= ABSORB_MAX_TOKENS else "naive"
        times, t_start = self.times, time.perf_counter()
        self._deferred = None  # nothing carries over from a forward that failed midway
        rows = 1 if last_only else T
        whole = cpu_step.layers(self, h, cache, s0, cos, sin, LATENT_NORM_EPS, rows) if attn == "absorbed" else None
        h, logits = whole if whole is not None else (self._layers(h, cache, s0, cos, sin, attn), None)  # one call?
        cache.length = s0 + T
        if logits is None:  # the one call runs the head too where it can
            t0 = time.perf_counter()
            logits = self.head(h[-1:] if last_only else h)
            times.lm_head += time.perf_counter() - t0
        times.forward += time.perf_counter() - t_start
        return logits

    def _layers(self, h: torch.Tensor, cache: Cache, s0: int, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttnMode) -> torch.Tensor:
        """h [T, D] through every layer, one at a time (each timing its parts)."""
        times = self.times
        for i in range(self.cfg.num_hidden_layers):
            t0 = time.perf_counter()
            h, x = self.attention_block(i, h, cache, s0, cos, sin, attn)
            t1 = time.perf_counter()
            times.attention += t1 - t0
            if self.cfg.is_moe_layer(i):  # a CPU decode step: one call where it can; both time their parts
                fused = cpu_step.moe(self, i, h, x) if self._deferred is None else None
                h = fused if fused is not None else h + self.moe(i, x)
            else:
                fused = cpu_step.dense(self, i, h, x)
                h = fused if fused is not None else h + self.dense_mlp(i, x)
                times.dense += time.perf_counter() - t1
        return h

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> their embedding rows [T, D] on the device in the compute dtype. The table may live
        in host RAM (the engine keeps it there: 2.35 GB for K2, of which a token needs one row)."""
        table = self.weights.embed_tokens
        if table.dtype == torch.bfloat16 and self.dtype == torch.float32 and self.device.type == "cpu" and ids.is_cpu:
            # a bf16 row widened exactly (its bits in a float's top half) in NumPy: a CPU decode step streams
            # past the caches, and the Python after it runs cold; on k2-slice (2-core Xeon) torch's gather and
            # conversion took 0.07-0.13 ms a token, this 0.10, and with rope_rows the forward's Python outside
            # the layers' call went from 0.22 to 0.10 ms a token
            bits = self._embed_bits
            if bits is None or bits[0] is not table:
                bits = self._embed_bits = table, table.view(torch.int16).numpy()
            return torch.from_numpy(bf16_to_f32(bits[1][ids.numpy()]))
        return table[ids.to(table.device)].to(self.device, self.dtype)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [T] (any integer or float tensor on the device) -> cos, sin [T, R/2]."""
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        return ang.cos(), ang.sin()

    def rope_rows(self, s0: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """rope(positions s0..s0+T-1) as views of a table of positions 0..n-1, grown (doubled) as positions pass
        its end (K2 at 256 K positions: 64 MB): the same values, since rope is elementwise and the table is made
        ROPE_BLOCK positions a call, each call on one thread in torch's vector loop. For decode steps: after a
        CPU step's stream, with the caches cold, rope's five torch ops took 0.08-0.11 ms a token, this 0.02
        (k2-slice, 2-core Xeon)."""
        end, table = s0 + T, self._rope_table
        have = 0 if table is None else table[0].shape[0]
        if have < end:  # the new blocks only, after the rows already held
            n = max(ROPE_BLOCK, 2 * have, -(-end // ROPE_BLOCK) * ROPE_BLOCK)
            new = [self.rope(torch.arange(p, p + ROPE_BLOCK, device=self.device)) for p in range(have, n, ROPE_BLOCK)]
            parts = ([table] if table is not None else []) + new
            table = self._rope_table = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        return table[0][s0:end], table[1][s0:end]

    def attention_block(self, i: int, h: torch.Tensor, cache: Cache, s0: int | torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, mode: AttnMode, span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to its MLP: h [T, D] -> (h + attention(input_layernorm(h)), the MLP's input x
        [T, D], the post_attention_layernorm of that sum). s0, mode, span: as attention() takes them."""
        if mode == "absorbed" and span is None and not isinstance(s0, torch.Tensor):  # a CPU decode step: one call
            if (fused := cpu_step.attention(self, i, h, cache, s0, cos, sin, LATENT_NORM_EPS)) is not None:
                return fused
        layer, eps = self.weights.layers[i], self.cfg.rms_norm_eps
        h = h + self.attention(i, rms_norm(h, layer.input_layernorm, eps), cache, s0, cos, sin, mode, span)
        return h, rms_norm(h, layer.post_attention_layernorm, eps)

    def attention(self, i: int, x: torch.Tensor, cache: Cache, s0: int | torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, mode: AttnMode, span: int | None = None) -> torch.Tensor:
        """s0: position of x's first token. An int; or a 0-d device tensor with mode 'absorbed' and
        `span` (a fixed number of cache rows to attend over, masked beyond s0 + T): shapes then do not
        depend on the position, which is what a captured (CUDA-graph) decode step needs."""
        c, a = self.cfg, self.weights.layers[i].self_attn
        T, H, P, R, L, Vd = x.shape[0], c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        proj = self._projection
        t0 = time.perf_counter()
        qa, kv = linear_pair(x, a.q_a_proj, a.kv_a_proj_with_mqa)  # [T, Q], [T, L + R]
        self.times.attention_proj += time.perf_counter() - t0
        cq = rms_norm(qa, a.q_a_layernorm, LATENT_NORM_EPS)
        q = proj(cq, a.q_b_proj).view(T, H, P + R)
        if mode == "absorbed" and not isinstance(s0, torch.Tensor):  # the rest in one call, where the cache can
            o = cache.decode_attention(i, s0, q, cos, sin, a.kv_b_heads, c.softmax_scale, kv, a.kv_a_layernorm,
                                       LATENT_NORM_EPS)
            if o is not None:
                return proj(o.reshape(T, H * Vd), a.o_proj)
        latent = rms_norm(kv[:, :L], a.kv_a_layernorm, LATENT_NORM_EPS)
        if isinstance(s0, torch.Tensor):  # positions on the device: written by index, read through a fixed span
            if mode != "absorbed" or span is None:
                raise ValueError("a device-tensor position needs mode='absorbed' and a span")
            S = span
        else:
            S = s0 + T
        cache.write(i, s0, latent, apply_rope(kv[:, L:], cos, sin))
        q_nope, q_pe = q[..., :P], apply_rope(q[..., P:], cos, sin)  # [T, H, P], [T, H, R]
        if mode == "absorbed":  # decode: q absorbed into the latent space, the cache read as stored, by the cache
            attend = lambda q_lat, qpe: cache.attend(i, S, q_lat, qpe, c.softmax_scale, s0)  # noqa: E731
            return proj(absorbed_attention(q_nope, q_pe, attend, a.kv_b_heads, a.w_uk, a.w_uv).reshape(T, H * Vd),
                        a.o_proj)
        kv_latent, k_pe = cache.rows(i, S)  # [S, L], [S, R]
        if T * S > CHUNKED_MIN_SCORES or S > NAIVE_MAX_KEYS:  # long prompts or contexts: same math, bounded memory
            o = chunked_prefill_attention(q_nope, q_pe, kv_latent, k_pe, as_dtype(a.w_uk, q_nope.dtype),
                                          as_dtype(a.w_uv, q_nope.dtype), c.softmax_scale, s0)
        else:  # the naive form: keys and values expanded per head, scored in causal query blocks
            kvb = linear(kv_latent, a.kv_b_proj).view(S, H, P + Vd).transpose(0, 1)  # [H, S, P+V]
            o = prefill_attention(q_nope, q_pe, kvb[..., :P], kvb[..., P:], k_pe, c.softmax_scale, s0)  # [T, H, V]
        return proj(o.reshape(T, H * Vd), a.o_proj)

    def _projection(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        """An attention projection, timed apart from the attention math for the bench's account."""
        t0 = time.perf_counter()
        y = linear(x, w)
        self.times.attention_proj += time.perf_counter() - t0
        return y

    def route(self, i: int, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (ids [T, K], weights [T, K]); DeepSeek-V3: the bias picks experts but does not weight them.
        k: how many to pick (default top-K; prefetch asks for a wider candidate set)."""
        c, gate = self.cfg, self.weights.layers[i].mlp.gate
        logits = fp32_linear(x, gate.weight)  # [T, E]
        bias = gate.e_score_correction_bias
        if logits.device.type == "cpu" and c.n_group == 1 and logits.shape[0] <= step_ops.MAX_ROWS \
                and bias.dtype == torch.float32 and not logits.requires_grad:  # a CPU decode step: one Numba call
            ids, weights = step_ops.route(logits.numpy(), bias.numpy(), min(k or c.num_experts_per_tok, c.n_routed_experts),
                                          c.norm_topk_prob, c.routed_scaling_factor)
            return torch.from_numpy(ids), torch.from_numpy(weights)
        scores = torch.sigmoid(logits)
        choice = scores + bias.float()
        if c.n_group > 1:
            T, G = x.shape[0], c.n_group
            grouped = choice.view(T, G, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, -1)
        ids = choice.topk(min(k or c.num_experts_per_tok, c.n_routed_experts), dim=-1).indices
        weights = scores.gather(1, ids)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * c.routed_scaling_factor

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """MoE layer i's output for its input x [T, D]: the routed experts on the backend while the
        shared expert runs here (the overlap), added by moe_sum. Times its parts."""
        t0 = time.perf_counter()
        ids, weights = self.route(i, x)
        t1 = time.perf_counter()
        deferred = None
        if self.defer_experts and i != self.cfg.moe_layers[-1]:
            # KTransformers' deferral: the lowest-weight experts are added one MoE layer later, so the
            # next layer's attention does not wait for them. Changes the outputs; off by default.
            low = weights.argsort(dim=-1)[:, :self.defer_experts]  # [T, d]
            late = torch.zeros_like(weights).scatter(1, low, 1.0).bool()
            handle = self.experts.submit(i, x, ids, weights.masked_fill(late, 0.0))
            deferred = self.experts.submit(i, x, ids, weights.masked_fill(~late, 0.0))
        else:
            handle = self.experts.submit(i, x, ids, weights)  # routed experts start on the CPU workers
        t2 = time.perf_counter()
        shared = self.shared_expert(i, x)
        t3 = time.perf_counter()
        routed = self.experts.wait(handle).to(x.dtype)
        if self._deferred is not None:  # the previous MoE layer's late experts
            routed = routed + self.experts.wait(self._deferred).to(x.dtype)
        self._deferred = deferred
        t4 = time.perf_counter()
        times = self.times
        times.router += t1 - t0
        times.submit += t2 - t1
        times.shared += t3 - t2
        times.experts_wait += t4 - t3
        return moe_sum(shared, routed)

    def dense_mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Dense layer i's MLP: x [T, D] -> [T, D]."""
        return swiglu(x, self.weights.layers[i].mlp)

    def shared_expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """MoE layer i's shared expert: x [T, D] -> [T, D] (zeros without one)."""
        shared = self.weights.layers[i].mlp.shared_experts
        return swiglu(x, shared) if shared is not None else torch.zeros_like(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: h [T, D] -> fp32 logits [T, vocab]."""
        w = self.weights
        return linear(rms_norm(h, w.norm, self.cfg.rms_norm_eps), w.lm_head).float()
