"""llama_mm: a native runtime for Llama 3.2 Vision (Mllama) checkpoints."""
from .config import ConfigError, MllamaConfig
from .model import MllamaModel, load_model
from .weights import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "MllamaConfig", "MllamaModel", "load_model"]
