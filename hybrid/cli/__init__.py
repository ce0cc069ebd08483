"""The `kimi-hybrid` command, the one place that renders to a terminal (click, rich): main holds the group
and the small commands, run, chat, bench, plan and doctor their own; common the consoles, the user-error types,
the one --model default and the engine flags, built from hybrid.load's option specs (hybrid.runtime.options);
warmup the spinners while an engine loads and its kernels compile.
May import every package below it (serve, bench, synth, runtime, text, model, experts, checkpoint,
kernels), not the `hybrid` façade; none imports it.
"""
