"""The server's default limits, in a module with no imports, so `kimi-hybrid serve --help` can show them
without loading FastAPI or torch. app.py and runner.py enforce them.
"""
DEFAULT_MAX_QUEUE = 16  # requests waiting behind the running one; more get a 429 with Retry-After
DEFAULT_KEEPALIVE_S = 10.0  # a streamed answer with nothing to send for this long gets an SSE comment
DEFAULT_MAX_BODY_BYTES = 32 << 20  # a 256K-token history with tools is a few MB of JSON
DEFAULT_MAX_PENDING_BYTES = 64 << 20  # request bytes held at once; the memory they take is a few times this
# without --context a server loads the plan's context (hybrid.runtime.context), but at least this many tokens where
# their KV pages fit the same share of memory: agent loops run long (app.serve_context)
SERVE_CONTEXT = 32768
SERVE_CONTEXT_HELP = ("from the plan: the longest of 4K-128K whose KV pages take <= 10% of RAM (CPU) or VRAM (GPU), "
                      "and at least 32768 where its pages fit that 10%")
