"""tinychat: AWQ 4-bit quantization and a small, fast runtime for Llama-family models."""

from tinychat.errors import GenerationError, ModelLoadError, TinychatError

__version__ = "0.1.0"

__all__ = ["GenerationError", "ModelLoadError", "TinychatError", "__version__"]
