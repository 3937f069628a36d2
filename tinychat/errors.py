"""Errors that tinychat raises on purpose. Each message names the file or input and the problem."""


class TinychatError(Exception):
    """Base class of every error tinychat raises on purpose."""


class ModelLoadError(TinychatError):
    """A model file or directory cannot be used (missing, truncated, wrong shape, unsupported)."""


class GenerationError(TinychatError):
    """A generation request cannot be served (empty prompt, prompt longer than the context, ...)."""
