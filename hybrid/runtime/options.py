"""The options of hybrid.load, written once as data: each field of LoadOptions carries its default, what it
accepts (an integer range, a closed set of choices, GB, a file path) and its help text, checked in
__post_init__. The CLI builds its engine flags from the same fields and the server checks its load options
with it; placement.plan checks the options it shares through check(). Must not open a checkpoint or
allocate anything: the checks that need the model's config wait for check_config().
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid.cluster.plan import MAX_RANKS
from hybrid.cluster.token import TOKEN_ENV, check_token
from hybrid.cluster.wire import is_wildcard, parse_address
from hybrid.experts.policy import POLICIES
from hybrid.runtime.hardware import MAX_IO_THREADS, MAX_THREADS

if TYPE_CHECKING:
    from hybrid.checkpoint.config import ModelConfig

ONE_OF = "{name} must be one of {listed}, got {value!r}"  # the refusal of the options plan() checked first
DEFAULT_CONTEXT = 4096  # the shortest context the plan chooses (runtime/context.py), and an Engine's built without one
DEFAULT_KEEP = 0  # room for earlier conversations beyond the context; until the live one needs them they share its pages
KEEP_TOKENS = 16384  # what each kept conversation is sized at (or the context, when smaller)
PAGE_SIZE = 64  # KV positions per page (runtime/kv_store.py; README "How conversations are kept": why 64)


@dataclass(frozen=True)
class Spec:
    """What one option accepts. kind 'int' (low..high), 'gb' (a finite number of GB above 0), 'seconds'
    (a finite number of seconds above 0), 'choice' (one of choices), 'text' (a str), 'bool' (True or
    False; its flag is a switch) or 'path' (a str or Path). refusal: the message where the kind's usual one is not
    it ({name}, {value!r}, {either}: "'a', 'b' or 'c'", {listed}: "a, b, c"). flag: every command that
    runs the model offers it as --name-with-dashes, with help as its --help."""

    kind: str
    help: str
    choices: tuple[Any, ...] = ()
    low: int = 0
    high: int | None = None
    optional: bool = False  # None accepted: the engine (or the plan) chooses
    flag: bool = False
    flag_low: int | None = None  # the flag's floor where the CLI asks for more than Python does
    refusal: str = ""

    def check(self, name: str, value: Any) -> None:
        """Raise ValueError, naming the option and the value, unless value is acceptable."""
        if value is None and self.optional:
            return
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < self.low or (
                    self.high is not None and value > self.high):
                span = f"in {self.low}..{self.high}" if self.high is not None else f">= {self.low}"
                raise ValueError(f"{name} must be an integer {span}, got {value!r}")
        elif self.kind == "gb":  # named as the flag, as plan() has always named it (CLI and Python alike)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number of GB above 0, got {value!r}; "
                                 "leave it out for the default")
        elif self.kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number of seconds above 0, got {value!r}")
        elif self.kind in ("text", "bool"):
            if not isinstance(value, str if self.kind == "text" else bool):
                raise ValueError(f"{name} must be {'a string' if self.kind == 'text' else 'True or False'}, "
                                 f"got {value!r}")
        elif self.kind == "choice":
            if value not in self.choices:
                either = ", ".join(map(repr, self.choices[:-1])) + f" or {self.choices[-1]!r}"
                raise ValueError((self.refusal or "{name} must be {either}, got {value!r}").format(
                    name=name, value=value, either=either, listed=", ".join(map(str, self.choices))))
        elif not isinstance(value, (str, Path)):  # 'path'
            raise ValueError((self.refusal or "{name} must be a file path or None, got {value!r}").format(
                name=name, value=value))


def _opt(default: Any, kind: str, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(kind, help, **spec)})


@dataclass(frozen=True)
class LoadOptions:
    """hybrid.load's keywords (the same names and defaults; its docstring says what each does)."""

    model: str | Path = _opt("tiny", "path", "Checkpoint directory, preset name or Hugging Face repo id.",
                             refusal="model must be a checkpoint directory, a preset name or a Hugging Face repo id, "
                                     "got {value!r}")
    backend: str = _opt("auto", "choice", "Routed experts: Numba INT4 kernels, the torch fp32 reference (the oracle), "
                        "or auto (numba where the CPU has AVX2; the default).", choices=("auto", "numba", "reference"),
                        flag=True, refusal="backend {value!r} is not known; use 'numba', 'reference' or 'auto'")
    device: str = _opt("auto", "choice", "Where the GPU side runs (auto: CUDA when there is a GPU; cpu: everything "
                       "on the CPU).", choices=("auto", "cuda", "cpu"), flag=True, refusal=ONE_OF)
    # None: the plan chooses (runtime/context.py). The flag's floor of 16: a command's prompt needs room in the
    # cache (Python callers may go lower)
    context: int | None = _opt(None, "int", "Tokens the KV cache holds.", low=1, optional=True, flag=True,
                               flag_low=16)
    expert_mode: str = _opt("auto", "choice", "Routed experts from the page cache (mmap), copied into RAM at load "
                            "on 2 MB pages (ram: faster decode, slower start), or a RAM slot cache fed from disk "
                            "(cache); auto: mmap where they all fit, else cache.",
                            choices=("auto", "mmap", "ram", "cache"), flag=True)
    cache_slots: int | None = _opt(None, "int", "RAM cache slots (implies expert_mode='cache').", low=1, optional=True)
    ram_budget: float | None = _opt(None, "gb", "GB of RAM for routed experts.", optional=True, flag=True)
    gpu_memory: float | None = _opt(None, "gb", "GB of VRAM the plan may use.", optional=True, flag=True)
    cpu_threads: int | None = _opt(None, "int", "Threads for the CPU experts.", low=1, high=MAX_THREADS,
                                   optional=True, flag=True)
    prefetch: bool | str = _opt("auto", "choice", "Prefetch the next layer's predicted experts (cache mode).",
                                choices=(True, False, "auto"))
    prefetch_width: int | None = _opt(None, "int", "Experts prefetched per layer (default: twice the top-k).", low=1,
                                      optional=True)
    cache_policy: str = _opt("lrfu", "choice", "Expert cache eviction.", choices=tuple(POLICIES),
                             refusal="cache_policy {value!r} is not known; choose one of {listed}")
    io_threads: int = _opt(2, "int", "Expert cache readers.", low=1, high=MAX_IO_THREADS)
    trace: str | Path | None = _opt(None, "path", "Write routing decisions as JSON lines to this file.", optional=True)
    defer_experts: int = _opt(0, "int", "Lowest-weight experts per MoE layer added one layer later.")
    hot_experts: int | None = _opt(None, "int", "Routed experts per MoE layer kept on the GPU (default: what the "
                                   "plan's spare VRAM holds).", optional=True, flag=True)
    prefill_offload: str = _opt("auto", "choice", "Long prompts: upload a layer's experts to the GPU side.",
                                choices=("auto", "on", "off"))
    decode_graphs: str = _opt("auto", "choice", "Decode through a fixed-shape step, one CUDA graph per token on CUDA "
                              "with the CPU expert hops inside (auto: on with CUDA; on: also without CUDA, eagerly; "
                              "segments: a graph per segment, the host hopping between them, also where 'on' cannot "
                              "run; off: the plain forward).", choices=("auto", "on", "segments", "off"), flag=True)
    # engine.PREFILL_CHUNK (this module must not import the engine: placement imports it); a test holds them equal
    prefill_chunk: int = _opt(4096, "int", "Prompt tokens per forward pass (default 4096): bounds prefill memory on "
                              "long prompts.", low=1, flag=True)
    dtype: str = _opt("auto", "choice", "The GPU side's compute dtype.", choices=("auto", "bfloat16", "float32"),
                      refusal=ONE_OF)
    routing_stats: str | Path | None = _opt("auto", "path", "File keeping the routing counts across sessions.",
                                            optional=True,
                                            refusal="routing_stats must be 'auto', a file path or None, got {value!r}")
    gpu_precision: str = _opt("auto", "choice", "Storage of the big GPU-side linears (auto: bf16 when it fits with "
                              "the KV cache, else int8 weight-only; without a GPU, bf16 weights with fp32 math, or "
                              "int8 ones: faster, int8's rounding).", choices=("auto", "bf16", "int8"), flag=True,
                              refusal=ONE_OF)
    cpu_prompt_math: str = _opt("fp32", "choice", "Math of the prompt products where the GPU side runs on the CPU: "
                                "fp32 (the bf16 or int8 weights widened, the default) or bf16 (activations and "
                                "products rounded to bf16, as llama.cpp computes with bf16 weights: faster prompts "
                                "on CPUs with AVX512_BF16 or AMX, refused on others; decode steps and the router "
                                "stay fp32).", choices=("fp32", "bf16"), flag=True, refusal=ONE_OF)
    # several machines as one (hybrid.cluster): this process is the head, rank 0 of `nodes`
    nodes: int = _opt(1, "int", "Machines that compute the routed experts, this head included: each MoE layer's "
                      "experts are split across them (the others run `kimi-hybrid node`).", low=1, high=MAX_RANKS,
                      flag=True)
    listen: str | None = _opt(None, "text", "HOST:PORT the expert nodes join at (with --nodes; an interface of the "
                              "trusted network, not a wildcard).", optional=True, flag=True)
    token: str | None = _opt(None, "text", f"Shared secret the nodes must present to join (with --nodes; default: "
                             f"${TOKEN_ENV}).", optional=True, flag=True)
    node_timeout: float = _opt(60.0, "seconds", "Seconds a node may take to answer one layer before the request "
                               "fails and the head computes its experts itself.", flag=True)
    join_timeout: float = _opt(600.0, "seconds", "Seconds the head waits for the nodes to join.", flag=True)
    listen_any: bool = _opt(False, "bool", "Allow --listen on a wildcard address (every interface).", flag=True)

    # the KV store (runtime/kv_store.py): earlier conversations kept beside the live one, a host tier, a disk tier
    keep_conversations: int = _opt(DEFAULT_KEEP, "int", "Earlier conversations whose KV pages are kept beside the live "
                                   "one (each up to 16,384 tokens, or the context if smaller), so switching back "
                                   "prefills only what is new.", low=0, high=4096, flag=True)
    kv_spill_tokens: int | None = _opt(None, "int", "Positions of the live conversation's KV cache that may move to "
                                       "host RAM when the compute device's pages run out (default: what the plan "
                                       "needs for --context).", low=0, optional=True, flag=True)
    prefix_cache_dir: str | Path | None = _opt(None, "path", "Directory where evicted conversation prefixes are saved "
                                               "and found again after a restart (off unless given).", optional=True,
                                               flag=True)
    prefix_cache_gb: float = _opt(20.0, "gb", "GB the prefix-cache directory may hold; the least recently used "
                                  "prefixes go first.", flag=True)
    kv_dtype: str = _opt("bf16", "choice", "Storage of the KV cache (bf16 halves the bytes long-context decode reads; "
                         "fp32 only on a CPU, where attention computes in fp32 anyway).", choices=("bf16", "fp32"),
                         flag=True, refusal=ONE_OF)

    def __post_init__(self) -> None:
        # option errors first, before anything large is opened or allocated
        for f in fields(self):
            f.metadata["spec"].check(f.name, getattr(self, f.name))
        if self.decode_graphs in ("on", "segments") and self.defer_experts:
            raise ValueError(f"decode_graphs={self.decode_graphs!r} does not combine with defer_experts (the deferred "
                             "sum crosses the graph segments); use one or the other")
        if self.backend == "reference" and (self.cache_slots is not None or self.expert_mode in ("cache", "ram")
                                            or self.trace or self.hot_experts
                                            or self.routing_stats not in ("auto", None)):
            raise ValueError("the reference backend computes every expert itself from the checkpoint: cache_slots, "
                             "expert_mode='cache' or 'ram', trace, hot_experts and routing_stats need backend='numba'")
        if self.trace is not None and not Path(self.trace).parent.is_dir():
            raise ValueError(f"trace: the folder of {self.trace} does not exist")
        self._check_cluster()
        if self.prefix_cache_dir is not None and Path(self.prefix_cache_dir).exists() \
                and not Path(self.prefix_cache_dir).is_dir():
            raise ValueError(f"prefix_cache_dir: {self.prefix_cache_dir} exists and is not a directory; name a "
                             "directory (it is created if missing)")
        if self.routing_stats not in ("auto", None) and not Path(self.routing_stats).parent.is_dir():
            raise ValueError(f"routing_stats: the folder of {self.routing_stats} does not exist; create it, or pass "
                             "'auto' for a file under the cache directory")

    def _check_cluster(self) -> None:
        if self.nodes == 1:
            if self.listen is not None or self.token is not None:
                raise ValueError("listen and token are for a cluster: give nodes >= 2 (--nodes) as well")
            return
        if self.listen is None:
            raise ValueError(f"nodes={self.nodes} needs listen='HOST:PORT' (--listen): the address on the trusted "
                             "network at which the nodes reach this head")
        host, _ = parse_address(self.listen)
        if is_wildcard(host) and not self.listen_any:
            raise ValueError(f"listen {self.listen!r} binds every interface and the cluster is not encrypted; name "
                             "the interface of the trusted network, or allow it with listen_any=True (--listen-any)")
        check_token(self.token if self.token is not None else os.environ.get(TOKEN_ENV))

    def check_config(self, cfg: ModelConfig) -> None:
        """The checks that need the model's config (the checkpoint is open, nothing large allocated yet)."""
        n_experts = cfg.n_routed_experts * len(cfg.moe_layers)
        if self.cache_slots is not None and self.cache_slots > n_experts:
            raise ValueError(f"cache_slots {self.cache_slots} exceeds the model's {n_experts} routed experts; "
                             f"use at most {n_experts} (or expert_mode='mmap' or 'ram' when they all fit in RAM)")
        if not 0 <= self.defer_experts < cfg.num_experts_per_tok:
            raise ValueError(f"defer_experts must lie in 0..{cfg.num_experts_per_tok - 1}, got {self.defer_experts}")
        if self.hot_experts is not None and not 0 <= self.hot_experts <= cfg.n_routed_experts:
            raise ValueError(f"hot_experts must lie in 0..{cfg.n_routed_experts}, got {self.hot_experts}")

    def kwargs(self) -> dict[str, Any]:
        """The options as hybrid.load's keywords."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(LoadOptions)}
FLAGS = tuple(name for name, spec in SPECS.items() if spec.flag)  # what every model-running command offers


def check(**values: Any) -> None:
    """Check options by their LoadOptions spec, for callers that take some of them (placement.plan)."""
    for name, value in values.items():
        SPECS[name].check(name, value)
