"""Text in and out of the model: tokenizer (Kimi's tiktoken tokenizer, its split pattern and streaming
decode), template (the K2 chat template rendered with jinja2), parser (the model's output as reasoning,
content and tool-call events) and conversation (one chat request from messages to events).
May import hybrid.model (sampling) only.
"""
