"""The server's default limits, in a module with no imports, so `kimi-hybrid serve --help` can show them
without loading FastAPI or torch. app.py and runner.py enforce them.
"""
DEFAULT_MAX_QUEUE = 16  # requests waiting behind the running one; more get a 429 with Retry-After
DEFAULT_KEEPALIVE_S = 10.0  # a streamed answer with nothing to send for this long gets an SSE comment
DEFAULT_MAX_BODY_BYTES = 32 << 20  # a 256K-token history with tools is a few MB of JSON
DEFAULT_MAX_PENDING_BYTES = 64 << 20  # request bytes held at once; the memory they take is a few times this
SERVE_CONTEXT = 32768  # tokens of KV cache a server loads with unless told: agent loops run long, 4096 is short
