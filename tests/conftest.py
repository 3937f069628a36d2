import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the default SmolLM2 GGUF (used by tests/test_gguf.py)."""
    from tinychat.io.default import default_model_path

    return default_model_path()
