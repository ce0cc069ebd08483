"""GPU-side kernels: pure functions on torch tensors, with the layout in each docstring. int4 (INT4
dequantisation, hot experts in torch), int4_triton (the fused hot-expert decode kernel), int8 and
int8_triton (int8 weight-only linears), mla (MLA attention cores). Imports nothing from the project.
"""
