"""Engine: a loaded model you can call. Wires config + checkpoint + expert backend + model.

Owns resolving what `hybrid.load` is given (a checkpoint directory or a built-in preset) and turning
the non-expert weights into compute tensors. It does no math itself (model.py) and no rendering.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError
from .model import AttnMode, ExpertBackend, Model
from .reference import ReferenceExperts
from .synth import PRESETS, ensure_preset

log = logging.getLogger(__name__)


def resolve_model(model: str | Path) -> Path:
    """A checkpoint directory, or a preset name generated into the cache on first use."""
    p = Path(model)
    if p.is_dir():
        return p
    if str(model) in PRESETS:
        return ensure_preset(str(model))
    raise CheckpointError(f"{model}: no such checkpoint directory, and not a preset ({', '.join(PRESETS)})")


class Engine:
    def __init__(self, ckpt: Checkpoint, experts: ExpertBackend, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.checkpoint = ckpt
        self.config = ckpt.config
        self.device = torch.device(device)
        # everything but the routed experts goes to the compute device; fp32 on a CPU (bf16 matmul is ~400x slower)
        weights = {name: ckpt.tensor(name).to(self.device, dtype)
                   for name in ckpt.tensors if ".mlp.experts." not in name and not name.endswith("inv_freq")}
        weights = {k: (v.float() if k.endswith("e_score_correction_bias") else v) for k, v in weights.items()}
        self.model = Model(self.config, weights, experts)

    @torch.inference_mode()
    def logits(self, token_ids, attn: AttnMode = "auto") -> torch.Tensor:
        """A fresh full-sequence forward: token ids [T] -> fp32 logits [T, vocab]. No state is kept."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
        V = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"token ids must lie in [0, {V}); got {int(ids.min())}..{int(ids.max())}")
        cache = self.model.new_cache(ids.numel())
        return self.model.forward(ids, cache, attn=attn)


def load(model: str | Path = "tiny", *, backend: str = "reference", device: str = "cpu") -> Engine:
    """Open a checkpoint (directory or preset name) and return an Engine.

    backend: 'reference' (torch, dequantised fp32; the oracle).
    """
    ckpt = Checkpoint(resolve_model(model))
    if backend == "reference":
        experts: ExpertBackend = ReferenceExperts(ckpt)
    else:
        raise ValueError(f"backend {backend!r} is not known; use 'reference'")
    return Engine(ckpt, experts, device=device)
