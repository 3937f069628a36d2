"""tinychat: AWQ 4-bit quantization and a small, fast runtime for Llama-family models."""

from tinychat.api import BusyError, Completion, Model, TextStream, load
from tinychat.errors import GenerationError, ModelLoadError, TinychatError

__version__ = "0.1.0"

__all__ = ["BusyError", "Completion", "GenerationError", "Model", "ModelLoadError", "TextStream", "TinychatError",
           "__version__", "load"]
