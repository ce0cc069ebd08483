"""Synthetic checkpoints in the exact on-disk format of Kimi K2 Thinking, for tests and the built-in
presets: writer (config, sharded safetensors with INT4 experts, tokenizer files; presets generated into
the cache on first use, handed to the runtime as makers by hybrid.load and the CLI) and bpe (a small BPE
trainer and the tiktoken.model format). May import hybrid.text and hybrid.checkpoint.
"""
