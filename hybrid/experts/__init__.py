"""The routed experts, behind one interface (backend.ExpertBackend): reference the oracle; scheduler the
Numba backend, composed of cpu (the CPU worker), cache and prefetch (the RAM slot cache and what loads it
ahead), hot (hot experts on the GPU side), upload (long prompts on the GPU side) and routing_log (counts,
trace); build makes either complete. May import hybrid.checkpoint, kernels_cpu and kernels_gpu.
"""
