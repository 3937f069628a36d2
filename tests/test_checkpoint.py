"""Quantized checkpoints: save (AutoAWQ GEMM, atomically) -> load in tinychat and in transformers; bad input."""

import copy
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinychat.errors import ModelLoadError, TinychatError
from tinychat.io import checkpoint
from tinychat.io.awq_format import pack_awq_gemv, unpack_awq_gemm
from tinychat.io.checkpoint import save_awq_checkpoint
from tinychat.io.loader import load_model, open_source
from tinychat.linear import Int8Linear, WQLinear, int8_lm_head
from tinychat.model import linear_names
from tinychat.quant.quantize import QuantConfig, dequantize, quantize
from tinychat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"  # as conftest's make_hf_dir
GROUP = {"llama": 32, "qwen2": 64, "qwen3": 32, "gemma3": 64}  # AWQ group size per tiny architecture (conftest's TINY_ARCHS)
PROMPT = "hello world, the quick brown fox"


def quantized(src, G):
    """Load src, then RTN-quantize every fused decoder linear: (the LoadedModel record, qdict, qcfg)."""
    loaded = open_source(src).load()
    qcfg = QuantConfig(4, G)
    qdict = {name: quantize(loaded.model.get_submodule(name).weight, qcfg)
             for name in linear_names(loaded.model.config)}
    return loaded, qdict, qcfg


def fp16_reference(model, qdict, G):
    """The float model as the checkpoint holds it: W = dequantize(q, fp16-rounded scales, z); every other tensor
    (embeddings, norms, biases, lm_head) rounded through fp16; a norm g as the checkpoint's w = g - offset (Gemma)."""
    offset = model.config.norm_offset
    with torch.no_grad():
        for name, p in model.named_parameters():
            shift = offset if name.rpartition(".")[2].endswith("norm") else 0.0
            p.copy_((p - shift).half().float() + shift)
        for name, (q, scales, zeros) in qdict.items():
            model.get_submodule(name).weight.copy_(dequantize(q, scales.half().float(), zeros, G))
    return model


@pytest.fixture(scope="module", params=list(GROUP))
def saved(request, tmp_path_factory, make_hf_dir):
    """(arch, source dir, saved AWQ dir, reference float model, tokenizer)."""
    arch = request.param
    base = tmp_path_factory.mktemp(arch)
    src = make_hf_dir(base / "src", arch)
    loaded, qdict, qcfg = quantized(src, GROUP[arch])
    out = save_awq_checkpoint(loaded, qdict, qcfg, base / "awq")
    return arch, src, out, fp16_reference(loaded.model, qdict, qcfg.group_size), loaded.tokenizer


def logits(model, tokenizer, text=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)]))[0]


# ---- save -> load ----


def test_checkpoint_files_and_tensors(saved):
    arch, src, out, _, _ = saved
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    config = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["architectures"] == source["architectures"] and config["torch_dtype"] == "float16"
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4,
                                             "group_size": GROUP[arch], "zero_point": True,
                                             "modules_to_not_convert": None}
    tensors = load_file(out / "model.safetensors")
    G = GROUP[arch]
    q = tensors["model.layers.1.self_attn.k_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (64, 32 // 8)  # [K, N/8]: k_proj is [2 heads * 16, 64]
    assert tensors["model.layers.1.mlp.down_proj.qzeros"].shape == (128 // G, 64 // 8)
    assert tensors["model.layers.0.mlp.gate_proj.scales"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.gate_proj.scales"].shape == (64 // G, 128)
    assert not any(name.endswith("_proj.weight") for name in tensors)
    assert ("lm_head.weight" in tensors) == (arch == "llama")
    assert ("model.layers.0.self_attn.v_proj.bias" in tensors) == (arch == "qwen2")
    assert all(t.dtype == torch.float16 for n, t in tensors.items() if not n.endswith(("qweight", "qzeros")))
    # <eos> (1) first, then the other stop ids (Llama's 2 comes from the source's generation_config.json)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == ([1, 2] if arch == "llama" else 1)


def test_load_matches_pseudo_quantized_model(saved):
    arch, _, out, reference, tokenizer = saved
    model, tok = load_model(out)
    assert isinstance(model.layers[0].attn.wqkv, WQLinear) and isinstance(model.layers[1].mlp.w2, WQLinear)
    assert (model.layers[0].attn.wqkv.bias is not None) == (arch == "qwen2")
    assert tok.encode(PROMPT) == tokenizer.encode(PROMPT)
    assert isinstance(model.lm_head, Int8Linear)  # the CPU backend's 8-bit output projection
    got = logits(model, tok)
    full_head = logits(reference, tokenizer)
    torch.testing.assert_close(got, logits(int8_lm_head(copy.deepcopy(reference)), tokenizer), atol=1e-5, rtol=1e-4)
    assert (got - full_head).abs().max() < 0.02 * full_head.abs().max()  # what the 8-bit head costs


def test_generate_end_to_end(saved):
    from tinychat.engine import Engine, SamplingParams

    model, tokenizer = load_model(saved[2], dtype="bfloat16")
    assert model.layers[0].attn.wqkv.scales.dtype == torch.float32
    engine = Engine(model, tokenizer, max_seq_len=64)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hello world"}])
    tokens = list(engine.generate(ids, SamplingParams(max_new_tokens=5), stop_ids=()))
    assert len(tokens) == 5 and engine.last_stats.finish_reason == "length"


def test_gemv_checkpoint_loads_the_same(saved, tmp_path):
    arch, _, out, _, _ = saved
    G = GROUP[arch]
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".qweight")]:
        p = name[: -len("qweight")]
        plain = unpack_awq_gemm(tensors[p + "qweight"], tensors[p + "qzeros"], tensors[p + "scales"], G)
        tensors[p + "qweight"], tensors[p + "qzeros"], tensors[p + "scales"] = pack_awq_gemv(*plain)
    gemv = tmp_path / "gemv"
    gemv.mkdir()
    for f in out.iterdir():
        (gemv / f.name).write_bytes(f.read_bytes())
    save_file(tensors, gemv / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (gemv / "config.json").write_text(json.dumps(config))
    model, tok = load_model(gemv)
    reference, _ = load_model(out)
    assert torch.equal(logits(model, tok), logits(reference, tok))


def test_sharded_checkpoint(tmp_path, make_hf_dir):
    src = make_hf_dir(tmp_path / "src", "llama")
    loaded, qdict, qcfg = quantized(src, 32)
    single = save_awq_checkpoint(loaded, qdict, qcfg, tmp_path / "single")
    sharded = save_awq_checkpoint(loaded, qdict, qcfg, tmp_path / "sharded",
                                  max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == (single / "model.safetensors").stat().st_size - _header_bytes(single)
    a, tok = load_model(single)
    b, _ = load_model(sharded)
    assert torch.equal(logits(a, tok), logits(b, tok))


def _header_bytes(directory) -> int:
    raw = (directory / "model.safetensors").read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


# ---- other readers of the checkpoint ----


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # ours overrides the checkpoint's backend
def test_transformers_loads_our_checkpoint(saved):
    """Hugging Face transformers reads the checkpoint (AWQ through GPT-QModel's pure-PyTorch torch_awq kernel, which
    runs on the CPU) and computes the same logits."""
    pytest.importorskip("gptqmodel", reason="needs gptqmodel==7.7.0 (pip install --no-deps, see .ci/run)")
    _, _, out, _, _ = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), device_map="cpu", dtype=torch.float32,
        quantization_config=transformers.AwqConfig(backend="torch_awq"),
    ).eval()
    assert "qweight" in dict(hf.model.layers[0].self_attn.q_proj.named_buffers())
    ours, tokenizer = load_model(out, int8_head=False)  # the checkpoint's own output projection
    ids = tokenizer.encode(PROMPT)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(PROMPT).input_ids == ids
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    expected = logits(ours, tokenizer)
    # their kernel computes in float16
    torch.testing.assert_close(theirs, expected, atol=2e-3 * expected.abs().max().item(), rtol=1e-2)


def get_from_keys(config: dict, keys: list[str]):
    """vLLM's QuantizationConfig.get_from_keys: the first of `keys` present, else an error."""
    for key in keys:
        if key in config:
            return config[key]
    raise ValueError(f"none of {keys} in the quantization config")


def test_config_fields_for_transformers_and_vllm(saved):
    arch, _, out, _, _ = saved
    G = GROUP[arch]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]

    # transformers: config.json's quantization_config.quant_method picks AwqConfig, built with
    # AwqConfig.from_dict -> AwqConfig(bits, group_size, zero_point, backend, modules_to_not_convert, **kwargs),
    # the legacy `version` field becoming `format` (gemm / gemv / gemv_fast / llm-awq).
    hf_cfg = transformers.AutoConfig.from_pretrained(str(out))
    assert hf_cfg.quantization_config["quant_method"] == "awq"
    awq = transformers.AwqConfig.from_dict(dict(qc))
    assert (awq.bits, awq.group_size, awq.zero_point, awq.format) == (4, G, True, "gemm")
    assert awq.modules_to_not_convert is None and awq.quant_method == "awq"

    # vLLM: get_quantization_config reads config.json's quantization_config; quant_method "awq" picks AWQConfig
    # (or awq_marlin on GPUs that can), whose from_config reads:
    #   weight_bits = get_from_keys(config, ["w_bit", "bits"])
    #   group_size = get_from_keys(config, ["q_group_size", "group_size"])
    #   zero_point = get_from_keys(config, ["zero_point"])
    #   modules_to_not_convert = get_from_keys_or(config, ["modules_to_not_convert"], None)
    # and AWQConfig.__init__ accepts only weight_bits == 4.
    assert qc["quant_method"] == "awq"
    assert get_from_keys(qc, ["w_bit", "bits"]) == 4
    assert get_from_keys(qc, ["q_group_size", "group_size"]) == G
    assert get_from_keys(qc, ["zero_point"]) is True
    assert qc.get("modules_to_not_convert") is None


# ---- atomic writes and refusals ----


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def quantized_llama(tmp_path, make_hf_dir):
    src = make_hf_dir(tmp_path / "src", "llama")
    return quantized(src, 32)


@pytest.mark.parametrize("writer,error", [("_write_json", KeyboardInterrupt), ("_write_safetensors", RuntimeError)])
def test_interrupted_save_leaves_nothing(quantized_llama, tmp_path, monkeypatch, writer, error):
    loaded, qdict, qcfg = quantized_llama
    out = tmp_path / "out"
    before = _entries(tmp_path)
    real = getattr(checkpoint, writer)
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:  # the second file of its kind: the first is already on disk
            raise error("interrupted")
        return real(*args)

    monkeypatch.setattr(checkpoint, writer, failing)
    with pytest.raises(error):
        save_awq_checkpoint(loaded, qdict, qcfg, out, max_shard_bytes=40_000)
    assert len(calls) == 2
    assert not out.exists() and _entries(tmp_path) == before


def test_existing_out_dir(quantized_llama, tmp_path, monkeypatch):
    loaded, qdict, qcfg = quantized_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(TinychatError, match=r"out: already exists \(pass overwrite=True"):
        save_awq_checkpoint(loaded, qdict, qcfg, out)
    with pytest.raises(TinychatError, match="not a previous checkpoint"):  # overwrite replaces checkpoints only
        save_awq_checkpoint(loaded, qdict, qcfg, out, overwrite=True)
    (out / "config.json").write_text('{"quantization_config": {"quant_method": "awq"}}')  # an earlier one
    # an interrupted overwrite keeps the old directory
    monkeypatch.setattr(checkpoint, "_write_json", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_awq_checkpoint(loaded, qdict, qcfg, out, overwrite=True)
    assert _entries(out) == ["config.json", "old.txt"]
    monkeypatch.undo()
    save_awq_checkpoint(loaded, qdict, qcfg, out, overwrite=True)
    assert "old.txt" not in _entries(out) and "model.safetensors" in _entries(out)
    assert _entries(tmp_path) == ["out", "src"]
    load_model(out)


def test_unwritable_location(quantized_llama, tmp_path):
    loaded, qdict, qcfg = quantized_llama
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TinychatError, match=r"a_file/out: cannot write a checkpoint there"):
        save_awq_checkpoint(loaded, qdict, qcfg, tmp_path / "a_file" / "out")


def test_three_bit_cannot_be_saved(quantized_llama, tmp_path):
    loaded, qdict, _ = quantized_llama
    with pytest.raises(TinychatError, match=r"w_bit=3.*4-bit weights only.*w3 is evaluation-only fake quant"):
        save_awq_checkpoint(loaded, qdict, QuantConfig(3, 32), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_incomplete_qdict(quantized_llama, tmp_path):
    loaded, qdict, qcfg = quantized_llama
    partial = {k: v for k, v in qdict.items() if k != "layers.1.mlp.w2"}
    with pytest.raises(TinychatError, match=r"qdict lacks the quantization of 1 linear\(s\): layers\.1\.mlp\.w2"):
        save_awq_checkpoint(loaded, partial, qcfg, tmp_path / "out")


# ---- bad quantized checkpoints ----


@pytest.fixture
def awq_dir(saved, tmp_path):
    """A writable copy of the saved llama checkpoint."""
    out = saved[2]
    copy = tmp_path / "awq"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def _edit_quant_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_wrong_qweight_shape(awq_dir):
    f = awq_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.qweight"] = torch.zeros(64, 8, dtype=torch.int32)
    save_file(tensors, f)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.qweight' "
                                             r"has shape \(64, 8\), expected \(64, 16\)"):
        load_model(awq_dir)


def test_wrong_qweight_dtype(awq_dir):
    f = awq_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.o_proj.qweight"] = tensors["model.layers.0.self_attn.o_proj.qweight"].float()
    save_file(tensors, f)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\."
                                             r"qweight' has dtype torch\.float32, expected int32"):
        load_model(awq_dir)


def test_float_checkpoint_with_awq_config(awq_dir, saved):
    """A quantization_config over float weights: the tensors are named as missing."""
    (awq_dir / "model.safetensors").write_bytes((saved[1] / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=r"unexpected tensor\(s\) .*_proj\.weight.* \(AWQ-quantized\) config"):
        load_model(awq_dir)


@pytest.mark.parametrize("changes,message", [
    ({"bits": 3}, r"AWQ checkpoints with bits=3 are not supported \(only 4-bit\)"),
    ({"version": "marlin"}, r"unknown AWQ version 'marlin'; supported: gemm, gemv"),
    ({"zero_point": False}, r"AWQ without zero point"),
    ({"group_size": -1}, r"AWQ group_size must be a positive integer, got -1"),
    ({"group_size": 48}, r"cannot be AWQ-packed with group size 48"),
    ({"version": "gemv", "group_size": 16}, r"gemv checkpoints have group size 32, 64 or >= 128, not 16"),
    ({"quant_method": "gptq"}, r"quantization method 'gptq' is not supported"),
    ({"modules_to_not_convert": ["down_proj"]}, r"modules_to_not_convert \['down_proj'\] leaves decoder linears"),
    ({"w_bit": 3}, r"says bits=4 and w_bit=3; the two names of one setting must agree"),
    ({"q_group_size": 4096}, r"says group_size=\d+ and q_group_size=4096; the two names of one setting must agree"),
])
def test_bad_quantization_config(awq_dir, changes, message):
    _edit_quant_config(awq_dir, **changes)
    with pytest.raises(ModelLoadError, match=r"config\.json: .*" + message):
        load_model(awq_dir)


def test_autoawq_spelling_of_the_config(awq_dir, saved):
    """AutoAWQ's own field names (w_bit, q_group_size) and a modules_to_not_convert outside the decoder load too."""
    config = json.loads((awq_dir / "config.json").read_text())
    qc = config["quantization_config"]
    qc.update({"w_bit": qc.pop("bits"), "q_group_size": qc.pop("group_size"), "modules_to_not_convert": ["visual"]})
    (awq_dir / "config.json").write_text(json.dumps(config))
    model, tok = load_model(awq_dir)
    reference, _ = load_model(saved[2])
    assert torch.equal(logits(model, tok), logits(reference, tok))


# ---- Tokenizer.save_pretrained ----

TEXTS = ["hello world, the quick brown fox", "the lazy dog<eos> jumps", "", "  two  spaces"]


def _check_saved_tokenizer(tok, directory):
    saved = Tokenizer.from_dir(directory)
    for text in TEXTS:
        assert saved.encode(text) == tok.encode(text), text
        assert saved.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text
    assert (saved.bos_token_id, saved.eos_token_id, saved.add_bos) == (tok.bos_token_id, tok.eos_token_id, tok.add_bos)
    assert saved.chat_template == tok.chat_template and saved.special_token_ids == tok.special_token_ids
    return saved


def test_tokenizer_save_pretrained_tokenizer_json(tmp_path, byte_level_tokenizer_json):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text(byte_level_tokenizer_json)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<eos>", "bos_token": "<bos>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}))
    tok = Tokenizer.from_dir(src)
    assert tok.add_bos
    tok.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    _check_saved_tokenizer(tok, tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS:
        assert hf(text).input_ids == tok.encode(text), text
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A Llama-style sentencepiece tokenizer.model (byte fallback) with an added special token past its pieces."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world runs away".split()
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    directory = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=300,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "added_tokens_decoder": {"300": {"content": "<|end|>", "special": True}},
    }))
    return directory


def test_tokenizer_save_pretrained_sentencepiece(sp_dir, tmp_path):
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.token_to_id("<|end|>") == 300
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    saved = _check_saved_tokenizer(tok, tmp_path)
    assert saved.encode("fox<|end|>") == tok.encode("fox<|end|>") and saved.encode("fox<|end|>")[-1] == 300
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    except Exception as exc:  # noqa: BLE001 - the conversion needs protobuf
        pytest.skip(f"transformers cannot convert the sentencepiece model offline: {exc}")
    for text in ["the quick brown fox", "hello world<|end|>"]:  # no leading space: see test_tokenizer.py
        assert hf(text).input_ids == tok.encode(text), text


def test_tokenizer_save_pretrained_unwritable(sp_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TinychatError, match=r"a_file/tok: cannot write the tokenizer"):
        Tokenizer.from_dir(sp_dir).save_pretrained(tmp_path / "a_file" / "tok")


def test_save_then_load_keeps_stop_ids(saved):
    _, _, out, _, tokenizer = saved
    _, loaded = load_model(out)
    assert loaded.stop_token_ids == tokenizer.stop_token_ids
    assert os.path.getsize(out / "tokenizer.json") > 0
