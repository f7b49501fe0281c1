"""llama_mm: a native runtime for Llama 3.2 Vision (Mllama) checkpoints."""
from .config import ConfigError, MllamaConfig
from .generator import Generator
from .model import MllamaModel, load_model
from .processor import MllamaProcessor
from .weights import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "Generator", "MllamaConfig", "MllamaModel", "MllamaProcessor",
           "load_model"]
