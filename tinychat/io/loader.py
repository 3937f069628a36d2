"""Deprecated alias: model loading moved to `tinychat.pipeline.loader` (the load -> quantize -> save journey).

Every name is looked up there on use, with a DeprecationWarning; this module imports nothing at import time.
"""

import warnings


def __getattr__(name: str):
    from tinychat.pipeline import loader  # the one upward import of the package: a deprecated alias's target

    warnings.warn(f"tinychat.io.loader.{name} moved to tinychat.pipeline.loader.{name}", DeprecationWarning,
                  stacklevel=2)
    return getattr(loader, name)
