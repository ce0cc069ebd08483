"""Engine: a loaded model you can call (generate with KV prefix reuse, chat, logits, statistics).

Owns the non-expert weights as compute tensors, placed as the plan counts them, the persistent KV
cache and the static decode step over it, and its callers' turns (turns.py) and the shards' leases
(checkpoint.guard). hybrid.runtime.loader builds it (plan, expert backend, options); the math is the
model's, the experts are the backend's (used only through ExpertBackend). No rendering.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch

from hybrid.text.template import ChatTemplateError, load_chat_template, normalize_messages, render_chat
from hybrid.checkpoint.reader import Checkpoint
from hybrid.text.conversation import (Done, apply_tool_choice, check_message, check_tool_replies, check_tools, run_chat,
                                      template_role)
from hybrid.runtime.completion import Completion, collect
from hybrid.runtime.decode_step import StaticDecoder
from hybrid.runtime.token_loop import Sampler, Step, generate
from hybrid.runtime.turns import Turns
from hybrid.runtime.shard_safety import ShardSafety
from hybrid.experts.backend import ExpertBackend
from hybrid.model.k2 import AttnMode, Model
from hybrid.model.linear import check_prompt_math
from hybrid.text.parser import Event
from hybrid.runtime.placement import Plan
from hybrid.runtime.options import DEFAULT_CONTEXT, DEFAULT_KEEP, KEEP_TOKENS, PAGE_SIZE
from hybrid.runtime.kv_store import KVSizes, KVStore
from hybrid.runtime.gpu_side import gpu_side_weight
from hybrid.experts.routing_stats import save_counts
from hybrid.model.sampling import SamplingParams, sample
from hybrid.text.tokenizer import Tokenizer

PREFILL_CHUNK = 4096  # prompt tokens per forward pass: bounds activations (K2: ~0.2 GB of fp32 queries per 1K)


class Engine:
    """A loaded model: generate (a stream of Steps, reusing the KV cache's prefix), chat, logits, stats.

    Threads: one engine serves one generation at a time. Every step, prefill, logits call and close
    takes the engine's lock (never held while a generator waits for its consumer). generate() from
    another thread waits while a generation is live (begun, not yet run to its end, closed or
    dropped: a generator left unfinished and still referenced keeps other threads waiting); from the
    generation's own thread it supersedes it, and the older generator raises "superseded" on its next
    use. The cache and its bookkeeping stay exact whatever callers do. close() waits for the step in
    progress; a generator used afterwards raises "this engine is closed".

    Shards changing under the maps: the engine holds a read lease on each shard (checkpoint.guard),
    so a truncation or a write-open waits until the lease is given back. A pending break found while
    a generation is live ends it at its next safe point (between tokens or prefill chunks, nothing
    reading the maps) with an error naming the shard, marks the model unusable (health() says why;
    load it again) and stops the expert threads, then gives the leases back; found while idle, the
    leases are given back at once and the next request checks the shards' sizes and leases them again.
    Costs (measured): per step a lock and two flags, about 1 us; an fd per shard; a watcher thread
    asking F_GETLEASE of each shard every ShardGuard.poll_s = 0.25 s (about 1 us a shard: 60 us for
    K2's 62), which is also how long a writer waits while the engine is idle; where no lease can be
    had, an fstat per such shard per step (1.5-3 us each: up to 0.2 ms a token for 62). What is left:
    a forward pass longer than /proc/sys/fs/lease-break-time (45 s) lets the kernel break the lease
    while it reads (raise it, or lower prefill_chunk); without a lease, a truncation during a forward
    pass is still a SIGBUS (between passes it is this error); the backend's build, before the
    engine's leases, is unguarded.
    """

    def __init__(self, ckpt: Checkpoint, experts: ExpertBackend, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, context: int = DEFAULT_CONTEXT, int8: bool = False,
                 bf16w: bool | None = None, *, plan: Plan | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
                 defer_experts: int = 0, decode_mode: str | None = None, routing_stats: Path | None = None,
                 kv: KVStore | None = None, prompt_math: str = "fp32"):
        """bf16w: keep the big linear weights in bf16 under fp32 math (gpu_side_weight); None: on a
        CPU computing in fp32, as the plan's 'bf16w' (and, with int8, 'int8w') counts them.
        plan: the placement plan it was built from (reported, as engine.plan; not used here).
        prefill_chunk: prompt tokens per forward pass (None: the whole prompt at once).
        defer_experts: the model's expert deferral (0: exact). decode_mode: single-token steps through
        a StaticDecoder in this mode ('auto', 'token' or 'segments'), or None (the plain forward).
        routing_stats: where the backend's routing counts are saved after each request (None: nowhere).
        kv: the paged KV store (runtime/kv_store.py) with positions for `context`; None: one in bf16 on
        `device` holding the context and DEFAULT_KEEP earlier conversations. prompt_math: 'fp32' or
        'bf16', the math of prompt products on a CPU (model.linear.prompt_math)."""
        self.checkpoint = ckpt
        self.config = ckpt.config
        self.device = torch.device(device)
        check_prompt_math(prompt_math, self.device.type)  # before any weight is loaded
        self._turns = Turns()
        self._closed = False
        self._safety = ShardSafety(ckpt, experts, self._turns)
        try:
            with self._turns.lock:  # a lease break during the load is handled once the engine is complete
                self._safety.open_shards()
                if bf16w is None:  # with int8 the rest of the linears (the router's) as 'int8w' counts them
                    bf16w = self.device.type == "cpu" and dtype == torch.float32
                # everything but the routed experts (and the embedding) goes to the compute device
                weights = {name: gpu_side_weight(name, ckpt.tensor(name), self.device, dtype, int8, bf16w)
                           for name in ckpt.tensors if ".mlp.experts." not in name and not name.endswith("inv_freq")}
                self.model = Model(self.config, weights, experts, defer_experts)
                self.model.prompt_math = prompt_math
                self.tokenizer = Tokenizer.from_dir(ckpt.path)
                self.chat_template = load_chat_template(ckpt.path)
                # persistent across requests: the live sequence and the prefixes earlier ones left
                self._kv = kv or KVStore(self.config.num_hidden_layers, self.config.kv_lora_rank,
                                         self.config.qk_rope_head_dim, context,
                                         KVSizes.for_tokens(context + DEFAULT_KEEP * min(context, KEEP_TOKENS) + PAGE_SIZE),
                                         self.device, torch.bfloat16, dtype)
                self._cache = self._kv.cache
                # the fixed-shape decode step over the engine's cache (after defer_experts: it refuses deferral)
                self.decoder = StaticDecoder(self.model, self._cache, mode=decode_mode) if decode_mode else None
        except BaseException:  # the caller closes the backend and the checkpoint; the leases are ours
            self._safety.guard.release()
            raise
        self.context = context
        self.plan = plan
        # hot experts per MoE layer on the GPU side, refreshed at each request's start (0: left as they are)
        self.hot_experts = experts.hot_capacity
        self.prefill_chunk = prefill_chunk
        self.routing_stats = routing_stats
        self._tokens = {"prefill": 0, "decode": 0}
        # the backend's threads and slot arena, the leases and the maps: released when the engine goes away
        self._finalizer = weakref.finalize(self, self._safety.release)

    # ---- statistics (bench) -----------------------------------------------------------------
    def reset_stats(self) -> None:
        self.model.times.clear()
        self._tokens = {"prefill": 0, "decode": 0}
        self.model.experts.reset_stats()
        self._kv.reset_stats()

    def stats(self) -> dict:
        """Where the time went since reset_stats(): GPU-side work, waits on the CPU experts, IO."""
        t = self.model.times
        ex = self.model.experts.stats()  # experts_compute_s, io_wait_s, expert_bytes, io_s, bytes_read, cache
        gpu_side = t.attention + t.router + t.shared + t.dense + t.lm_head
        out = {
            "forward_s": t.forward, "gpu_side_s": gpu_side, "attention_s": t.attention,
            "attention_proj_s": t.attention_proj, "router_s": t.router, "dense_s": t.dense, "lm_head_s": t.lm_head,
            "sampling_s": t.sampling,
            "shared_s": t.shared, "experts_wait_s": t.experts_wait, "submit_s": t.submit,
            "experts_compute_s": ex["experts_compute_s"], "io_wait_s": ex["io_wait_s"],
            "expert_bytes": ex["expert_bytes"], "tokens": dict(self._tokens),
            "io_s": ex["io_s"], "bytes_read": ex["bytes_read"], "cache": ex["cache"],
            "decode_graphs": self._decode_graphs(),
            "cluster": ex.get("cluster"),  # per node with --nodes (hybrid.cluster), else None
            "kv": self._kv.stats(),  # pages, reused prompt tokens, evictions, spills, KV bytes read
        }
        out["overhead_s"] = max(0.0, t.forward - gpu_side - t.experts_wait)
        return out

    def _decode_graphs(self) -> dict | None:
        """How single-token steps run: None (the plain forward), or the static decode step's state."""
        dec = self.decoder
        if dec is None:
            return None
        return {"mode": dec.mode, "cuda_graphs": dec.graphs, "captured_buckets": sorted(dec.chains), "steps": dec.steps}

    def close(self) -> None:
        """Stop the expert workers and IO threads, give the leases back and release the maps (also done
        when the engine is collected). Waits for a step in progress, not for a whole generation."""
        with self._turns.lock:
            if not self._closed:
                self._kv.close()  # kept prefixes to the disk tier, when there is one
            self._closed = True
            self._finalizer()
            self._turns.wake()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed (its expert threads and checkpoint maps are released); "
                               "load the model again with hybrid.load")
        self._safety.check_usable()

    def health(self) -> str | None:
        """None while the engine can serve; else why not: closed, unusable (a shard changed under a
        request: load it again), or a shard missing or too short now. Cheap (a stat per shard), any thread."""
        if self._closed:
            return "this engine is closed; load the model again with hybrid.load"
        return self._safety.health()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def logits(self, token_ids, attn: AttnMode = "auto") -> torch.Tensor:
        """A fresh full-sequence forward: token ids [T] -> fp32 logits [T, vocab]. No state is kept."""
        self._check_open()
        if attn not in ("auto", "naive", "absorbed"):
            raise ValueError(f"attn must be 'auto', 'naive' or 'absorbed', got {attn!r}")
        ids = self._check_ids(token_ids)
        cache = self.model.new_cache(ids.numel())
        with self._turns.lock:
            self._check_open()
            self._safety.open_shards()
            return self.model.forward(ids, cache, attn=attn)

    def _check_ids(self, token_ids) -> torch.Tensor:
        try:
            ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"token_ids must be a sequence of integer token ids, got {str(token_ids)[:60]!r} ({e})") \
                from None
        if ids.numel() and (ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex()):
            raise ValueError(f"token_ids must be integers, got {ids.dtype} values")
        ids = ids.to(torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
        V = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"token ids must lie in [0, {V}); got {int(ids.min())}..{int(ids.max())}")
        return ids

    # ---- generation with KV prefix reuse ----------------------------------------------------
    def generate(self, token_ids: list[int], max_new_tokens: int, temperature: float = 1.0, seed: int | None = None,
                 *, sampling: SamplingParams | None = None, sampler: Sampler | None = None,
                 stop_ids: frozenset[int] = frozenset(), should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
        """Stream Steps. The KV store finds the longest prefix of `token_ids` any earlier request left
        (kv_store.py), so only the rest is prefilled (Step.prefill_tokens counts it).
        should_stop: asked between prefill chunks; True ends the request there (a client that left
        during a long prefill), keeping what was prefilled for the next request to reuse.
        Threads: see the class docstring (one live generation; the same thread's newer one supersedes)."""
        self._check_open()
        prompt = self._check_ids(token_ids).tolist()
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context is {self.context}; "
                             "shorten it or raise the context (--context, or context= in hybrid.load)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(stop_ids, (set, frozenset, list, tuple)) or \
                not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise ValueError(f"stop_ids must be a set of integer token ids, got {stop_ids!r}")
        stop_ids = frozenset(stop_ids)
        params = sampling or SamplingParams(temperature=temperature, seed=seed)
        if sampler is None:
            gen = params.make_generator()
            sampler = lambda logits: sample(logits, params, gen)  # noqa: E731
        with self._turns.lock:  # the checks above touch no state: the turn begins here
            epoch = self._turns.begin(self._check_open)
            try:
                self._safety.open_shards()
                if self.hot_experts:
                    self.model.experts.refresh_hot()
                self._kv.begin(prompt)
            except BaseException:
                self._turns.end(epoch)
                raise
        yield from self._steps(epoch, prompt, max_new_tokens, sampler, stop_ids, should_stop)

    def _steps(self, epoch: int, prompt: list[int], max_new_tokens: int, sampler: Sampler,
               stop_ids: frozenset[int], should_stop: Callable[[], bool] | None) -> Iterator[Step]:
        """The live generation: each step under the lock, after the checks of _check_turn."""

        def between_chunks() -> bool:  # a safe point inside a long prefill (under the lock)
            self._safety.safe_point()
            return should_stop is not None and should_stop()

        generated: list[int] = []
        steps = generate(self.model, self._cache, prompt, max_new_tokens, sampler, stop_ids, self.prefill_chunk,
                         between_chunks, self._decode_step if self.decoder else None)
        try:
            while True:
                with self._turns.lock:
                    self._check_turn(epoch)
                    step = next(steps, None)
                    if step is None:
                        return
                    if step.index == 0:
                        self._tokens["prefill"] += step.prefill_tokens
                    else:
                        self._tokens["decode"] += 1
                    generated.append(step.token)
                yield step
                if step.finish:
                    return
        finally:  # also when the consumer stops early, a forward fails or the request was superseded
            with self._turns.lock:
                steps.close()
                if self._turns.end(epoch):  # still the newest: the cache holds what it computed
                    self._kv.finish((prompt + generated)[:self._cache.length])
                    if self.routing_stats is not None and not self._safety.released:
                        save_counts(self.routing_stats, self.model.experts.route_counts, self.config.moe_layers,
                                    self.config.n_routed_experts)

    def _decode_step(self, token: int) -> torch.Tensor:
        """One token through the static decode step, or the plain forward while the live sequence has
        pages in the host tier (a fixed-shape step reads the compute device's pool only)."""
        cache = self._cache
        cache.prepare(cache.length, cache.length + 1)  # may spill: then this token is the plain forward's
        if cache.spilled():
            return self.model.forward(torch.tensor([token], device=self.device), cache, last_only=True)
        return self.decoder.step(token)

    def _check_turn(self, epoch: int) -> None:
        """Before a step: the engine open and usable, this generation still the newest, the shards unchanged."""
        self._check_open()
        if not self._turns.current(epoch):
            raise RuntimeError("this generation was superseded by a newer request on the same engine "
                               "(the KV cache now holds that one); start it again")
        self._safety.safe_point()

    def refresh_hot_experts(self) -> None:
        """Keep the most-routed experts of each MoE layer on the GPU side (the backend uploads only changes).

        The backend writes them into fixed buffers in place: a captured decode step reads them by
        address, so it stays valid as the hot set changes (and rebuilds itself if the sets are replaced)."""
        with self._turns.lock:
            self._check_open()
            self._safety.open_shards()
            self.model.experts.refresh_hot()

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render with the checkpoint's own chat_template.jinja; tokenize=True returns the ids."""
        if not tokenize:
            return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        # special-token strings inside user or tool text must stay text, never become control tokens
        mark = self.tokenizer.mark_user_text
        text = render_chat(self.chat_template, mark(messages), tools=mark(tools), add_generation_prompt=add_generation_prompt, **kwargs)
        return self.tokenizer.encode_chat(text)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, forced: str = "") -> list[int]:
        """The prompt ids of a chat request: the rendered template, then `forced` (the start of the
        assistant's turn that a tool_choice demands; conversation.forced_call_prefix)."""
        return self.apply_chat_template(messages, tools=tools, tokenize=True) + \
            self.tokenizer.encode(forced, allow_special=True)

    def answer_budget(self, prompt: list[int], max_tokens: int | None) -> int:
        """Tokens the answer may take: max_tokens, never past the end of the context."""
        budget = self.context - len(prompt)
        return min(max_tokens or budget, budget)

    def complete(self, messages: list[dict], tools: list[dict] | None = None,
                 tool_choice: str | dict | None = "auto", **sampling) -> Completion:
        """chat() run to its end: the finished answer (content, reasoning, tool calls, finish_reason, usage)."""
        return collect(self.chat(messages, tools, tool_choice, **sampling))

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict | None = "auto",
             **sampling) -> Iterator[Event | Done]:
        """Yield ReasoningDelta / ContentDelta / ToolCall / ToolCallError events, then one Done.

        tool_choice, as in the OpenAI API: 'auto' (the model decides), 'none' (the tools are not
        declared), 'required' (the answer is a call of one of them), or a function's name, or
        {"type": "function", "function": {"name": NAME}} (the answer calls that one). A required or
        named call starts the assistant's turn with K2's call prefix, so there is no reasoning."""
        self._check_open()
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} dicts")
        try:  # plain dicts from here on (dataclasses and pydantic models too), None values dropped
            messages = normalize_messages(messages)
        except ChatTemplateError as e:
            raise ValueError(f"messages: {e}") from None
        for i, m in enumerate(messages):
            check_message(m, f"messages[{i}]")
        check_tool_replies(messages)  # a reply to no call would render as the result of a call never made
        messages = [dict(m, role=template_role(m["role"])) for m in messages]
        if tools is not None:
            check_tools(tools, "tools", lambda i: f"tools[{i}]")
            tools = list(tools)
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f'tool_choice {tool_choice!r} must look like {{"type": "function", '
                                 '"function": {"name": NAME}}')
            mode, name = "named", fn["name"]  # a name, even one spelled like a keyword
        elif tool_choice is None or tool_choice in ("auto", "none", "required"):
            mode, name = tool_choice or "auto", None
        elif isinstance(tool_choice, str):
            mode, name = "named", tool_choice
        else:
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function name, got {tool_choice!r}")
        tools, names, forced = apply_tool_choice(tools, messages, mode, name)
        max_tokens = sampling.pop("max_tokens", None)
        params = SamplingParams(**sampling, max_tokens=max_tokens)
        prompt = self.chat_prompt(messages, tools, forced)
        yield from run_chat(self, prompt, params, names, self.answer_budget(prompt, max_tokens), forced)
