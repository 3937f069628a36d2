"""GGUF blocks run as stored (tinychat/io/gguf_blocks.py): each block type's group form against `gguf`'s own
dequantize(), the bytes the ops read, tiny GGUF models on every CPU path against their dequantized selves, bad
blocks, and the shipped SmolLM2 (its Q4_1 blocks) against its fp32 dequantization."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from test_gguf import TINY, Q, assert_message, write_tiny_model

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError
from tinychat.io.gguf import read_gguf
from tinychat.io.gguf_blocks import NATIVE_BITS, bytes_per_weight, decode
from tinychat.io.loader import build_model
from tinychat.linear import GroupEmbedding, Int8Linear, RowStack, WQLinear

# block types gguf.quants can write from floats; the K types are written as random bytes with finite fp16 fields
QUANTIZABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of d (and dmin) in a superblock


def random_blocks(qtype, rows: int, cols: int, seed=0) -> np.ndarray:
    """uint8 [rows, bytes per row] of valid `qtype` blocks for a [rows, cols] tensor."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // per_block, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        raw[:, at:at + 2] = (rng.standard_normal((raw.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(NATIVE_BITS), ids=lambda t: t.name)
def test_group_form_equals_gguf_dequantize(qtype):
    """The weights the ops compute from a block type's group form equal gguf's dequantize(), value for value (a zero
    weight may come out as +0 where gguf gives -0: d * 0 with a negative d)."""
    per_block, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 7, 3 * 256 if per_block == 256 else 96
    raw = random_blocks(qtype, rows, cols)
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    gw = decode(raw, qtype, rows, cols)
    assert gw.bits == NATIVE_BITS[qtype] and gw.shape == (rows, cols)
    got = gw.dequantize().numpy()
    assert np.isfinite(expected).all() and np.array_equal(got, expected)
    # the codes fit the op: 0..15 for int4, int8 for the rest, and the q/k row order is a permutation of rows
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    torch.testing.assert_close(gw.rows(order).dequantize(), torch.from_numpy(expected)[order], rtol=0, atol=0)


def test_bytes_the_ops_read():
    """Per weight, against the block's own size: Q4_0 / Q4_1 / Q8_0 as stored (fp16 scales, exact), Q4_K in
    K-quant superblocks (+2.8%), the others as stated in the README's table."""
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K):
        block, op = bytes_per_weight(qtype)
        assert op <= 1.1 * block, qtype.name
    assert bytes_per_weight(Q.Q4_1) == (0.625, 0.625) and bytes_per_weight(Q.Q8_0) == (1.0625, 1.0625)
    assert bytes_per_weight(Q.Q4_K) == (0.5625, 148 / 256)


# ---- tiny models: every linear as stored, against the same file dequantized ----

NATIVE_TYPES = {  # a mix of block types (fused q|k|v and gate|up of differing forms run side by side)
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q5_1,
    "blk.0.attn_q.weight": Q.Q4_0,
    "blk.0.attn_k.weight": Q.Q4_0,
    "blk.0.attn_v.weight": Q.Q4_0,
    "blk.0.attn_output.weight": Q.Q4_1,
    "blk.0.ffn_gate.weight": Q.Q5_0,
    "blk.0.ffn_up.weight": Q.Q5_0,
    "blk.0.ffn_down.weight": Q.Q8_0,
    "blk.1.attn_q.weight": Q.Q4_1,
    "blk.1.attn_k.weight": Q.Q8_0,
    "blk.1.attn_v.weight": Q.F16,
    "blk.1.attn_output.weight": Q.Q5_1,
    "blk.1.ffn_gate.weight": Q.Q4_1,
    "blk.1.ffn_up.weight": Q.Q4_1,
    "blk.1.ffn_down.weight": Q.Q4_0,
}
K_SIZE = dict(TINY, hidden=256, inter=256)  # rows of 256 weights: one superblock


def load_both(path):
    config, refs, _ = read_gguf(path)
    cfg = ModelConfig.from_hf(config, str(path))
    return build_model(cfg, refs, torch.float32, blocks=True).eval(), build_model(cfg, refs, torch.float32).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_runs_its_blocks(tmp_path, tied, isa, threads):
    """Every decoder linear and the output projection run the file's blocks (a tied head: the embedding's); the
    logits equal those of the dequantized file within fp32 summation order (the VNNI path rounds x to int8 per
    block of 32: within a looser bound)."""
    path = tmp_path / "tiny.gguf"
    write_tiny_model(path, types=NATIVE_TYPES, tied=tied)
    native, floats = load_both(path)
    layer0, layer1 = native.layers
    assert isinstance(layer0.attn.wqkv, WQLinear) and layer0.attn.wqkv.offsets is None  # Q4_0: m = -8 s
    assert isinstance(layer0.attn.wo, WQLinear) and layer0.attn.wo.scales.dtype == torch.float16
    assert isinstance(layer0.mlp.w13, Int8Linear) and isinstance(layer0.mlp.w2, Int8Linear)
    assert isinstance(layer1.attn.wqkv, RowStack)  # Q4_1 | Q8_0 | F16 rows side by side
    assert [type(p).__name__ for p in layer1.attn.wqkv.parts] == ["WQLinear", "Int8Linear", "Linear"]
    assert isinstance(native.lm_head, Int8Linear) and native.lm_head.group_size == 32
    assert (native.lm_head.offsets is None) == tied  # Q8_0 embedding (tied) or Q5_1 output
    assert isinstance(native.embed, GroupEmbedding)  # the Q8_0 embedding looked up in its blocks
    assert (native.embed.table is native.lm_head) == tied  # tied: one table for both
    assert_same_model(native, floats, isa, TINY["vocab"])


def assert_same_model(native, floats, isa, vocab):
    """Each linear as stored computes the dequantized file's weights (x = identity: exact in int8 too, so on every
    path), and the logits match the dequantized model's on the fp32 paths (the VNNI path rounds x to int8 per block
    of 32, which the random weights of a tiny model amplify layer after layer: the real model's perplexity bounds
    that path, tests/test_smollm2.py)."""
    every_token = torch.arange(vocab)
    torch.testing.assert_close(native.embed(every_token), floats.embed(every_token), rtol=0, atol=0)  # bit for bit
    names = [n for n, m in native.named_modules() if n.count(".") <= 3 and n.endswith(("wqkv", "wo", "w13", "w2"))]
    for name in names + ["lm_head"]:
        a, b = native.get_submodule(name), floats.get_submodule(name)
        x = torch.eye(b.in_features)
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6 * b.weight.abs().max().item(), msg=name)
            if isa != "avx512_vnni":  # a few rows of x: the GEMV, with the offsets' sums of x
                x = torch.randn(3, b.in_features, generator=torch.Generator().manual_seed(2))
                bound = 1e-5 * (x.abs() @ b.weight.abs().t()).max().item()
                torch.testing.assert_close(a(x), b(x), rtol=0, atol=bound, msg=name)
    if isa == "avx512_vnni":
        return
    tokens = torch.randint(0, vocab, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = native(tokens), floats(tokens)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_tiny_model_k_quants(tmp_path, isa):
    """Q4_K (int4, nibbles repacked), Q5_K and Q6_K (int8, G 16) rows in a model, against the dequantized file."""
    path = tmp_path / "tiny-k.gguf"
    raw = {name: (random_blocks(t, *shape, seed=i), t) for i, (name, t, shape) in enumerate(
        [("blk.0.ffn_gate.weight", Q.Q4_K, (256, 256)), ("blk.0.ffn_up.weight", Q.Q5_K, (256, 256)),
         ("blk.1.ffn_down.weight", Q.Q6_K, (256, 256))])}
    write_tiny_model(path, size=K_SIZE, replace=raw)
    native, floats = load_both(path)
    gate_up = native.layers[0].mlp.w13
    assert isinstance(gate_up, RowStack) and [type(p) for p in gate_up.parts] == [WQLinear, Int8Linear]
    assert native.layers[1].mlp.w2.group_size == 16
    assert_same_model(native, floats, isa, TINY["vocab"])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_embedding_stays_in_its_blocks(tmp_path, qtype):
    """An embedding of any block type with a group form is looked up in its blocks (no float copy of the table):
    each row dequantized equals the dequantized file's, at any token shape, and follows the model's dtype casts."""
    path = tmp_path / "tiny-embed.gguf"
    V, C = TINY["vocab"], K_SIZE["hidden"]
    write_tiny_model(path, size=K_SIZE, replace={"token_embd.weight": (random_blocks(qtype, V, C), qtype)})
    native, floats = load_both(path)
    assert isinstance(native.embed, GroupEmbedding) and "embed.weight" not in dict(native.named_parameters())
    assert isinstance(native.embed.table, WQLinear if NATIVE_BITS[qtype] == 4 else Int8Linear)
    tokens = torch.tensor([[3, 0, V - 1], [7, 7, 1]])
    want = floats.embed(tokens)  # [2, 3, C]
    assert want.abs().max() > 0
    torch.testing.assert_close(native.embed(tokens), want, rtol=0, atol=0)
    assert native.to(torch.bfloat16).embed(tokens).dtype == torch.bfloat16


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: its file is the last field
                inside = line.rstrip().endswith(str(path))
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_loading_leaves_the_file_out_of_resident_memory(tmp_path):
    """Each tensor's pages of the file mapping leave the process's RSS once copied (a loaded model does not count
    the file it came from); the mapping stays readable (a tensor read again is the same)."""
    path = (tmp_path / "tiny.gguf").resolve()
    write_tiny_model(path, size=dict(TINY, vocab=4096, hidden=256, inter=512), types=NATIVE_TYPES)
    config, refs, reader = read_gguf(path)
    ModelConfig.from_hf(config, str(path))
    before = _mapped_kb(path)  # the header and metadata pages read so far
    for ref in refs.values():
        ref.groups() if ref.groups is not None else ref.load()
    assert path.stat().st_size > 1000 * 1024 and _mapped_kb(path) <= before + 8
    embed = refs["model.embed_tokens.weight"].groups()
    torch.testing.assert_close(embed.dequantize(), refs["model.embed_tokens.weight"].load(), rtol=0, atol=0)


# ---- bad blocks ----


def test_nan_scale_is_refused(tmp_path):
    raw = gguf.quants.quantize(np.ones((TINY["inter"], TINY["hidden"]), np.float32), Q.Q4_1)
    raw[5, 0:2] = np.array([np.nan], np.float16).view(np.uint8)  # the fp16 scale of row 5's first block
    path = tmp_path / "nan.gguf"
    write_tiny_model(path, replace={"blk.0.ffn_up.weight": (raw, Q.Q4_1)})
    config, refs, _ = read_gguf(path)
    with pytest.raises(ModelLoadError) as exc:
        build_model(ModelConfig.from_hf(config, str(path)), refs, torch.float32, blocks=True)
    assert_message(exc, path, "blk.0.ffn_up.weight", "Q4_1", "1 NaN or infinite block scales")


# ---- what quant= does with each source ----


def _source(kinds: dict, awq=None):
    """A ModelSource whose tensors have these kinds (TensorRef.kind; None: a Hugging Face tensor)."""
    from pathlib import Path

    from tinychat.io.hf import TensorRef
    from tinychat.io.loader import ModelSource

    refs = {name: TensorRef(Path("m"), (1,), lambda: None, kind=kind) for name, kind in kinds.items()}
    return ModelSource(Path("m"), {}, None, refs, None, awq)


def test_plan_runs_quantized_sources_as_stored():
    q = "model.layers.0.self_attn.q_proj.weight"
    blocks = _source({"model.embed_tokens.weight": "Q8_0", q: "Q4_1"})
    assert [blocks.plan(x) for x in ("auto", "awq", "none")] == ["blocks", "awq", "none"]
    floats = _source({"model.embed_tokens.weight": "Q8_0", q: "F16"})  # only the embedding quantized: full precision
    assert not floats.has_blocks and floats.plan("auto") == "awq"
    hf = _source({q: None})
    assert [hf.plan(x) for x in ("auto", "awq", "none")] == ["awq", "awq", "none"]
    assert _source({q: None}, awq=object()).plan("none") == "checkpoint"
    with pytest.raises(ValueError, match="quant must be one of auto, awq, none, got 'int8'"):
        hf.plan("int8")


def test_awq_on_blocks_says_it_requantizes(smollm2_gguf, monkeypatch):
    """quant='awq' on a GGUF's blocks warns that it dequantizes and requantizes them (the AWQ run itself is
    replaced here by the file, so the test takes seconds), and runs the float weights it is given."""
    import tinychat.pipeline.quantize as pipeline
    from tinychat.api import load_transformer

    monkeypatch.setattr(pipeline, "cached_quantized_model", lambda src, opts: smollm2_gguf)
    with pytest.warns(UserWarning, match="dequantizes its quantized blocks and quantizes them again with AWQ"):
        model, _, _ = load_transformer(quant="awq")
    assert type(model.layers[0].attn.wqkv) is torch.nn.Linear
    model, _, _ = load_transformer()  # auto: the blocks, no warning
    assert isinstance(model.layers[0].attn.wqkv, WQLinear)


def test_rows_not_in_whole_blocks_are_refused(tmp_path):
    """A tensor whose rows are not a whole number of blocks (a crafted header: gguf's writer cannot make one) is
    refused by name before its bytes are read as blocks."""
    from types import SimpleNamespace

    from tinychat.io.gguf import _group_loader

    t = SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=Q.Q4_0, data=np.zeros(4 * 27, np.uint8))
    with pytest.raises(ModelLoadError) as exc:
        _group_loader(None, t, tmp_path / "x.gguf", (4, 48), None)()  # refused before the reader is used
    assert_message(exc, "blk.0.ffn_up.weight", "Q4_0", "rows of 48 weights, not a whole number of 32-weight blocks")
