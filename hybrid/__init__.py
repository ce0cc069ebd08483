"""kimi-hybrid: run Kimi K2 Thinking on one workstation. `engine = hybrid.load(path_or_preset)`."""
from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.checkpoint.config import ConfigError, ModelConfig
from hybrid.runtime.engine import Engine
from hybrid.runtime.loader import load

__all__ = ["load", "Engine", "Checkpoint", "CheckpointError", "ModelConfig", "ConfigError"]
