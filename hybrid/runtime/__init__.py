"""Running a loaded model: resolve (--model -> a checkpoint directory), hardware and probe (the measured
machine), options, tensor_classes, placement and projection (the plan of what goes where and its
ceiling), loader (hybrid.load's work), engine and token_loop (generation as a stream of Steps), turns
and shard_safety (one caller at a time; a shard changed under the maps), and the fixed-shape decode
step (decode_step, decode_segments, decode_buffers, graphs). May import hybrid.cluster, hybrid.text,
hybrid.model, hybrid.experts, hybrid.checkpoint, kernels_cpu and kernels_gpu; never synth, bench, serve
or cli (presets come in as makers through hybrid.load).
"""
