"""kimi-hybrid: run Kimi K2 Thinking on one workstation. `engine = hybrid.load(path_or_preset)`."""
from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, ModelConfig
from .engine import Engine
from .loader import load

__all__ = ["load", "Engine", "Checkpoint", "CheckpointError", "ModelConfig", "ConfigError"]
