"""Loading Hugging Face directories: the happy path end to end, and each kind of bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinychat.errors import ModelLoadError
from tinychat.io.loader import load_model

transformers = pytest.importorskip("transformers")

CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)


@pytest.fixture
def model_dir(tmp_path, byte_level_tokenizer_json):
    """A complete tiny Llama directory: config, safetensors, tokenizer.json, tokenizer_config.json."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(byte_level_tokenizer_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": "<bos>"}))
    return tmp_path


def test_loads_and_generates(model_dir):
    from tinychat.engine import Engine, SamplingParams

    model, tokenizer = load_model(model_dir)
    assert model.config.num_kv_heads == 2 and model.lm_head.weight is model.embed.weight
    engine = Engine(model, tokenizer, max_seq_len=64)
    tokens = list(engine.generate(tokenizer.encode("hello world"), SamplingParams(max_new_tokens=5), stop_ids=()))
    assert len(tokens) == 5 and engine.last_stats.finish_reason == "length"


def test_missing_safetensors(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(model_dir)


def test_truncated_safetensors(model_dir):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(model_dir)


def test_sharded_index_names_missing_shard(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, model_dir / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, model_dir / "model-00002-of-00002.safetensors")
    (model_dir / "model.safetensors").unlink()
    index = {"weight_map": {n: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_model(model_dir)  # sharded loads
    assert model.config.num_layers == 2
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: file not found"):
        load_model(model_dir)


def test_wrong_tensor_shape(model_dir):
    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 47)
    save_file(tensors, f)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
                                             r"has shape \(32, 47\), expected \(32, 48\)"):
        load_model(model_dir)


def test_missing_tensor(model_dir):
    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_model(model_dir)


def test_unknown_architecture(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported architecture 'GPTNeoXForCausalLM'"):
        load_model(model_dir)


def test_unsupported_rope_type(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: rope type 'yarn' is not supported"):
        load_model(model_dir)


def test_config_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(model_dir)


def test_directory_without_tokenizer(model_dir):
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=str(model_dir)):
        load_model(model_dir)


def test_missing_path_and_hub_id_without_network(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="someone/some-model"):
        load_model("someone/some-model")


@pytest.mark.parametrize("changes, field", [
    ({"num_hidden_layers": 10**8}, "num_layers must be a whole number in 1 .. 1024, got 100000000"),
    ({"num_attention_heads": 0}, "num_heads must be a whole number in 1 .. 1024, got 0"),  # was a ZeroDivisionError
    ({"max_position_embeddings": -5}, "max_position_embeddings must be a whole number in 1 .."),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be in"),
    ({"rope_parameters": {"rope_theta": 0, "rope_type": "default"}}, "rope theta and factor must be finite and > 0"),
    ({"vocab_size": 10**12}, "vocab_size must be a whole number"),
    ({"hidden_size": 0}, "hidden_size must be a whole number"),
    ({"head_dim": 7}, "head_dim must be even"),
])
def test_hostile_config_sizes_are_refused_before_allocating(model_dir, changes, field):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid value: " + field):
        load_model(model_dir)


def test_a_huge_context_is_not_allocated(model_dir):
    """A model claiming a billion positions: the rotary table and the KV cache follow the context in use (the
    engine's default, or what is asked), not the claim."""
    from tinychat.engine import Engine, SamplingParams
    from tinychat.model import DEFAULT_CONTEXT

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 10**9
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model, tokenizer = load_model(model_dir)
    assert model.config.context_length == 10**9 and model.cos_sin.shape[0] == DEFAULT_CONTEXT
    engine = Engine(model, tokenizer)
    assert engine.max_seq_len == DEFAULT_CONTEXT
    engine = Engine(model, tokenizer, max_seq_len=5000)  # more than the first table: it grows to fit
    assert model.cos_sin.shape[0] == 5000 and model.max_seq_len == 5000
    tokens = list(engine.generate(tokenizer.encode("hello"), SamplingParams(max_new_tokens=3), stop_ids=()))
    assert len(tokens) == 3


def _edit_weights(model_dir, edit):
    weights = load_file(model_dir / "model.safetensors")
    edit(weights)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(model_dir, value):
    _edit_weights(model_dir, lambda w: w["model.layers.1.mlp.down_proj.weight"].view(-1)[7:9].fill_(value))
    with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' holds 2 NaN or inf"):
        load_model(model_dir)


def test_an_integer_weight_is_refused(model_dir):
    def to_int(w):
        w["model.norm.weight"] = w["model.norm.weight"].to(torch.int32)

    _edit_weights(model_dir, to_int)
    with pytest.raises(ModelLoadError, match=r"'model.norm.weight' has dtype torch.int32, expected a floating"):
        load_model(model_dir)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_shard_paths_stay_inside_the_model_directory(model_dir, shard):
    names = list(load_file(model_dir / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = shard
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=r"is not a file inside"):
        load_model(model_dir)


def test_overlapping_safetensors_data_is_refused(model_dir):
    """Two tensors pointed at the same bytes: the safetensors reader refuses the header, and the error names the
    file."""
    import struct

    raw = (model_dir / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], next(k for k in names[1:] if header[k]["dtype"] == header[names[0]]["dtype"])
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] +
                                 header[b]["data_offsets"][1] - header[b]["data_offsets"][0]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(model_dir)
