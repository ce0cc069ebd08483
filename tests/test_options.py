"""hybrid.load's options, written once (hybrid.runtime.options): the signature, the CLI flags and the
checks all come from the same fields."""
from __future__ import annotations

import inspect
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

import hybrid
from hybrid.cli.main import main
from hybrid.runtime.engine import PREFILL_CHUNK
from hybrid.runtime.options import FLAGS, SPECS, LoadOptions, check


def test_load_takes_exactly_the_options_with_their_defaults():
    params = dict(inspect.signature(hybrid.load).parameters)
    params.pop("presets", None)  # the built-in checkpoints hybrid.load injects, not an option
    assert list(params) == [f.name for f in fields(LoadOptions)]
    assert {n: p.default for n, p in params.items()} == {f.name: f.default for f in fields(LoadOptions)}
    assert LoadOptions().prefill_chunk == PREFILL_CHUNK


@pytest.mark.parametrize("command", ["run", "chat", "bench", "serve"])
def test_every_model_command_offers_the_flags_the_specs_mark(command):
    params = {p.name: p for p in main.commands[command].params}
    for name in FLAGS:
        p, spec = params[name], SPECS[name]
        default = getattr(LoadOptions(), name)
        if name == "context":  # None in Python: the plan decides, and --help says how in words
            from hybrid.runtime.context import DEFAULT_HELP
            from hybrid.serve.limits import SERVE_CONTEXT_HELP
            default = SERVE_CONTEXT_HELP if command == "serve" else DEFAULT_HELP
        if default is None or spec.kind == "bool":
            assert p.help == spec.help
        else:  # the spec's help, saying the engine's default (the flag's own stays None)
            assert p.help == spec.help + f" [default: {default}]"
        if spec.kind == "choice":
            assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == spec.choices
        elif spec.kind == "int":
            assert (p.type.min, p.type.max) == (spec.flag_low or spec.low, spec.high)


@pytest.mark.parametrize("flag, value", [("--cpu-threads", "0"), ("--hot-experts", "-1"), ("--prefill-chunk", "0"),
                                         ("--ram-budget", "inf"), ("--decode-graphs", "sometimes")])
def test_a_flag_refuses_what_python_refuses(flag, value):
    r = CliRunner().invoke(main, ["run", "hi", "-m", "tiny", flag, value])
    assert r.exit_code == 2 and f"Invalid value for '{flag}'" in r.output, r.output
    name = flag[2:].replace("-", "_")
    with pytest.raises(ValueError, match=name.replace("_", "[-_]")):
        LoadOptions(**{name: float(value) if name == "ram_budget" else value})


@pytest.mark.parametrize("opts, says", [
    (dict(backend="torch"), "backend 'torch' is not known; use 'numba', 'reference' or 'auto'"),
    (dict(expert_mode="disk"), "expert_mode must be 'auto', 'mmap', 'ram' or 'cache', got 'disk'"),
    (dict(prefetch=2), "prefetch must be True, False or 'auto', got 2"),
    (dict(dtype="half"), "dtype must be one of auto, bfloat16, float32, got 'half'"),
    (dict(device="tpu"), "device must be one of auto, cuda, cpu, got 'tpu'"),
    (dict(cache_policy="fifo"), "cache_policy 'fifo' is not known; choose one of "),
    (dict(io_threads=0), "io_threads must be an integer in 1..64, got 0"),
    (dict(hot_experts=True), "hot_experts must be an integer >= 0, got True"),
    (dict(gpu_memory=-1), "--gpu-memory must be a finite number of GB above 0, got -1; leave it out"),
    (dict(model=None), "model must be a checkpoint directory, a preset name or a Hugging Face repo id, got None"),
    (dict(routing_stats=3), "routing_stats must be 'auto', a file path or None, got 3"),
    (dict(decode_graphs="on", defer_experts=1), "decode_graphs='on' does not combine with defer_experts"),
])
def test_refusals_name_the_option_and_the_value(opts, says):
    with pytest.raises(ValueError) as e:
        LoadOptions(**opts)
    assert str(e.value).startswith(says)


def test_the_planner_checks_its_options_by_the_same_specs():
    check(expert_mode="cache", gpu_precision="int8", cpu_threads=None)
    with pytest.raises(ValueError, match="gpu_precision must be one of auto, bf16, int8, got 'fp8'"):
        check(gpu_precision="fp8")
