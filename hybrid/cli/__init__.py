"""The `kimi-hybrid` command, the one place that renders to a terminal (click, rich): main holds the group
and the small commands, chat, bench and plan their own; common the consoles, the user-error types and the
engine flags, built from hybrid.load's option specs (hybrid.runtime.options).
May import every package below it (serve, bench, synth, runtime, text, model, experts, checkpoint,
kernels), not the `hybrid` façade; none imports it.
"""
