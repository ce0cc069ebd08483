"""The model: DeepSeek-V3 / Kimi K2 math over a plain config. k2 holds the forward pass (MLA attention,
routing, the shared expert, the call to an injected expert backend), weights the GPU side's weights by
their Hugging Face names, linear how a weight of any storage is applied, sampling next-token choice and
timers the split of a forward pass. May import hybrid.experts, hybrid.checkpoint, kernels_cpu and
kernels_gpu; never the runtime that drives it.
"""
