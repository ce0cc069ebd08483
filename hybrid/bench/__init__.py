"""Measurements that print figures: engine_bench (a loaded engine's prefill and decode speed, time split
by component), kernel_bench (the CPU expert kernels against this machine's RAM ceiling), gpu_kernels
(the GPU-side kernels at K2 shapes) and replay (routing traces against expert-cache sizes and policies).
Returns data; the CLI renders it. May import hybrid.runtime, hybrid.text, hybrid.model, hybrid.experts,
hybrid.checkpoint, kernels_cpu and kernels_gpu.
"""
