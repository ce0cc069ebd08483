"""The on-disk format, and nothing above it: config (config.json as a frozen ModelConfig), layout (every
tensor's name, dtype and shape the config implies), reader (safetensors shards as zero-copy views), int4
(the compressed-tensors INT4 bit layout), guard (read leases on the shards, so a truncation is an
error, not a SIGBUS), paths (the cache directory kimi-hybrid writes into) and host_memory (huge-page
memory for the weights a decode streams).
May import kernels_cpu and kernels_gpu only; every other package builds on it.
"""
