"""Streaming quantization (one decoder layer in memory at a time): the same checkpoint as the in-memory path, each
layer read once and released, sharded output that tinychat and transformers load, nothing left when interrupted."""

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

from tinychat.io.checkpoint import save_awq_checkpoint
from tinychat.io.loader import ModelSource, load_model, open_source
from tinychat.pipeline.calib import load_calibration
from tinychat.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from tinychat.quant.awq import quantize_layers, quantize_model
from tinychat.quant.quantize import QuantConfig, auto_group_size

# small calibration text in the tiny tokenizer's alphabet (as test_quantize.py's)
CALIB_TEXT = "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog, hello world {i * 7}" for i in range(60))
PROMPT = "hello world, the quick brown fox"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, make_hf_dir):
    """arch -> a tiny random model directory (conftest's TINY_ARCHS)."""
    base = tmp_path_factory.mktemp("stream-src")
    return {arch: make_hf_dir(base / arch, arch) for arch in ("llama", "qwen2", "gemma3")}


def checkpoint_tensors(directory):
    """Every tensor of a checkpoint, single-file or sharded."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("method", ["rtn", "awq", "awq-gptq"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_streaming_checkpoint_equals_the_in_memory_one(sources, calib_file, tmp_path, arch, method):
    src = sources[arch]
    opts = QuantizeOptions(method=method, calib=str(calib_file), n_samples=4, seqlen=32)
    streamed = quantize_checkpoint(src, tmp_path / "streamed", opts, progress=False, log=lambda m: None)

    loaded = open_source(src).load(dtype="float32", blocks=False)  # the in-memory path, as it was
    qcfg = QuantConfig(4, auto_group_size(loaded.model.config))
    calib = None if method == "rtn" else load_calibration(str(calib_file), loaded.tokenizer, 4, 32, seed=0)
    qdict = quantize_model(loaded.model, calib, qcfg, method=method, progress=False)
    in_memory = save_awq_checkpoint(loaded, qdict, qcfg, tmp_path / "in-memory")

    n_layers = loaded.model.config.num_layers
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-{n_layers + 1:05d}.safetensors"
                                                         for i in range(1, n_layers + 2)]
    layer1 = index["weight_map"]["model.layers.1.mlp.down_proj.qweight"]
    assert layer1 == f"model-00002-of-{n_layers + 1:05d}.safetensors"  # a layer per shard, in order
    a, b = checkpoint_tensors(streamed), checkpoint_tensors(in_memory)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (streamed / file).read_text() == (in_memory / file).read_text(), file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    ours, tokenizer = load_model(streamed)
    reference, _ = load_model(in_memory)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert torch.equal(ours(ids), reference(ids))


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_each_layer_is_read_once_and_released_before_the_next(sources, calib_file, method):
    src = open_source(sources["llama"])
    skeleton = src.load_skeleton()
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    assert not skeleton.model.embed.weight.is_meta and not skeleton.model.lm_head.weight.is_meta
    reads, alive, written = [], [], []

    def load_layer(i):
        gc.collect()
        assert not [ref for ref in alive if ref() is not None], f"a layer before {i} is still in memory"
        reads.append(i)
        layer = src.load_layer(i)
        alive.extend(weakref.ref(p) for p in layer.parameters())
        alive.append(weakref.ref(layer))
        return layer

    def sink(i, layer, quantized):
        written.append((i, sorted(quantized)))

    calib = load_calibration(str(calib_file), src.tokenizer, 4, 32, seed=0)
    quantize_layers(skeleton.model, load_layer, sink, calib, QuantConfig(4, 64), method=method, progress=False)
    gc.collect()
    assert reads == [0, 1] and not [ref for ref in alive if ref() is not None]
    assert written == [(i, ["attn.wo", "attn.wqkv", "mlp.w13", "mlp.w2"]) for i in (0, 1)]
    assert all(p.is_meta for p in skeleton.model.layers.parameters())  # the skeleton never held a layer


def test_the_pipeline_reads_each_layer_once(sources, calib_file, tmp_path, monkeypatch):
    reads = []
    real = ModelSource.load_layer
    monkeypatch.setattr(ModelSource, "load_layer", lambda self, i, **k: reads.append(i) or real(self, i, **k))
    monkeypatch.setattr(ModelSource, "load", lambda *a, **k: pytest.fail("the whole model must not load"))
    opts = QuantizeOptions(calib=str(calib_file), n_samples=4, seqlen=32)
    quantize_checkpoint(sources["qwen2"], tmp_path / "out", opts, progress=False, log=lambda m: None)
    assert reads == [0, 1]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_mid_way_leaves_nothing(sources, calib_file, tmp_path, monkeypatch, error):
    """Stopped while reading layer 1, when layer 0's shard is already written: neither the output directory nor the
    temporary one is left."""
    out = tmp_path / "out"
    real = ModelSource.load_layer
    seen = []

    def load_layer(self, i, **k):
        if i == 1:
            seen.extend(p.name for p in tmp_path.glob(".out.tmp-*/*"))
            raise error("interrupted")
        return real(self, i, **k)

    monkeypatch.setattr(ModelSource, "load_layer", load_layer)
    opts = QuantizeOptions(calib=str(calib_file), n_samples=4, seqlen=32)
    with pytest.raises(error):
        quantize_checkpoint(sources["llama"], out, opts, progress=False, log=lambda m: None)
    assert seen == ["model-00001-of-00003.safetensors"]  # mid-way: the first layer was on disk
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # ours overrides the checkpoint's backend
def test_transformers_loads_a_streamed_checkpoint(sources, calib_file, tmp_path):
    """The sharded checkpoint loads in Hugging Face transformers (as test_checkpoint's single-file one) with the
    same logits as in tinychat."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gptqmodel", reason="needs gptqmodel==7.7.0 (pip install --no-deps, see .ci/run)")
    opts = QuantizeOptions(calib=str(calib_file), n_samples=4, seqlen=32)
    out = quantize_checkpoint(sources["qwen2"], tmp_path / "out", opts, progress=False, log=lambda m: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), device_map="cpu", dtype=torch.float32,
        quantization_config=transformers.AwqConfig(backend="torch_awq"),
    ).eval()
    ours, tokenizer = load_model(out, int8_head=False)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        theirs, expected = hf(ids).logits[0], ours(ids)[0]
    torch.testing.assert_close(theirs, expected, atol=2e-3 * expected.abs().max().item(), rtol=1e-2)


def test_a_gguf_streams_to_the_same_checkpoint(smollm2_gguf, tmp_path):
    """A GGUF file is read one layer at a time too (its blocks dequantized, its norms as stored): the same checkpoint
    as quantizing the whole model loaded in float32."""
    streamed = quantize_checkpoint(smollm2_gguf, tmp_path / "streamed", QuantizeOptions(method="rtn"), progress=False,
                                   log=lambda m: None)
    loaded = open_source(smollm2_gguf).load(dtype="float32", blocks=False)
    qcfg = QuantConfig(4, auto_group_size(loaded.model.config))
    qdict = quantize_model(loaded.model, None, qcfg, method="rtn", progress=False)
    a, b = checkpoint_tensors(streamed), checkpoint_tensors(save_awq_checkpoint(loaded, qdict, qcfg, tmp_path / "mem"))
    assert len(list(streamed.glob("model-*.safetensors"))) == loaded.model.config.num_layers + 1
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
