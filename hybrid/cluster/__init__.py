"""Several machines as one: every MoE layer's routed experts split across a head and expert nodes
over torch.distributed (gloo over TCP). wire (the fixed, versioned formats), identity (what a
checkpoint is), plan (who holds which expert), link (store, gloo group, deadlines), rendezvous (the
join handshake), backend (ClusterExperts, the head's ExpertBackend), head (connect) and node (an
expert node's session). May import hybrid.experts, hybrid.checkpoint, kernels_cpu and kernels_gpu.
"""
