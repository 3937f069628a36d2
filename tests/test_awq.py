"""AWQ: scale folding, the scale and clip searches, quantize_model end to end, and the calibration loader."""

import copy
import dataclasses
import json
import sys
import warnings

import pytest
import torch

from tinychat.config import ModelConfig, RopeConfig
from tinychat.errors import TinychatError
from tinychat.model import DecoderLayer, Transformer, layer_linears, linear_names
from tinychat.pipeline.calib import BUILTIN_CORPUS, load_calibration
from tinychat.quant import awq
from tinychat.quant.awq import (
    ScaleGroup,
    _spaced_blocks,
    awq_scales,
    clip_weight,
    fold_scales,
    quantize_model,
    scale_groups,
    search_clip,
    search_scale,
)
from tinychat.quant.quantize import QuantConfig, apply_pseudo_quantized, pseudo_quantize, quantize

MHA = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4,
                  head_dim=16, max_position_embeddings=128)
MHA_BIAS = dataclasses.replace(MHA, qkv_bias=True, o_bias=True, mlp_bias=True, architecture="Qwen2ForCausalLM")
GQA = dataclasses.replace(MHA, num_kv_heads=2)
# Gemma 3's extras: a sliding layer (window 8 < the blocks) with its own rotary table, then a global one
GEMMA = dataclasses.replace(MHA, qk_norm=True, post_norms=True, hidden_act="gelu_tanh", sliding_window=8,
                            layer_types=("sliding_attention", "full_attention"), rope_local=RopeConfig(theta=100.0),
                            embed_scale=8.0, query_pre_attn_scalar=10.0, norm_offset=1.0,
                            architecture="Gemma3ForCausalLM")
Q32 = QuantConfig(w_bit=4, group_size=32)


def tiny_model(cfg: ModelConfig, outliers: bool = True) -> Transformer:
    """Random fp32 model; with `outliers`, a few norm channels ~20x larger, so activations have outlier channels
    as real LLMs do."""
    model = Transformer(cfg)
    torch.nn.init.normal_(model.embed.weight)
    for layer in model.layers:
        layer.attn_norm.data.uniform_(0.5, 1.5)
        layer.mlp_norm.data.uniform_(0.5, 1.5)
        if outliers:
            layer.attn_norm.data[:3] *= 20
            layer.mlp_norm.data[5:8] *= 15
    return model.eval().requires_grad_(False)


def tokens(n=4, seqlen=32, vocab=96, seed=1):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ---- (a) folding leaves the model's function unchanged ----


@pytest.mark.parametrize("cfg", [MHA, MHA_BIAS, GQA], ids=["mha", "mha-bias", "gqa"])
def test_fold_scales_keeps_logits(cfg):
    model = tiny_model(cfg, outliers=False)  # ~1-sized activations: fp32 rounding stays far below the tolerance
    x = tokens()
    ref = model(x)
    groups = scale_groups(cfg)
    every = [spec.name for spec in layer_linears(cfg)]
    assert [g.linear for g in groups] == (every if cfg.num_kv_heads == cfg.num_heads
                                          else ["attn.wqkv", "mlp.w13", "mlp.w2"])  # o-with-v skipped under GQA
    for group in groups:
        for layer in model.layers:
            linear = layer.get_submodule(group.linear)
            before = linear.weight.clone()
            s = torch.empty(linear.in_features).uniform_(0.5, 2.0)
            fold_scales(layer, group, s, cfg)
            assert not torch.equal(linear.weight, before)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5, msg=f"folding {group} changed the logits")


# ---- (b) the scale search protects outlier input channels ----


def outlier_inputs(n=4, seqlen=32, k=64, channels=(3, 20, 41), factor=50.0):
    x = torch.randn(n, seqlen, k, generator=torch.Generator().manual_seed(2))
    x[..., list(channels)] *= factor
    return x


@pytest.mark.parametrize("group", [ScaleGroup("mlp.w2", "mlp.w13", "up", "mlp.w2"),
                                   ScaleGroup("mlp.w13", "mlp_norm", None, "mlp")], ids=["linear", "mlp-block"])
def test_scale_search_beats_rtn_on_outlier_channels(group):
    cfg = dataclasses.replace(MHA, intermediate_size=64)
    layer = DecoderLayer(cfg, 0).eval().requires_grad_(False)
    x = outlier_inputs()
    linear = layer.get_submodule(group.linear)
    w = linear.weight.clone()
    module = layer.get_submodule(group.inspect)
    found = search_scale(layer, group, x, Q32)
    assert torch.equal(linear.weight, w)  # the search leaves the layer as it was
    assert found.alpha > 0 and len(found.losses) == 20

    def output_error(weight):
        linear.weight.copy_(weight)
        err = (module(x) - ref).pow(2).mean().item()
        linear.weight.copy_(w)
        return err

    ref = module(x)
    s = found.scales
    rtn_err = output_error(pseudo_quantize(w, Q32))
    awq_err = output_error(pseudo_quantize(w * s, Q32) / s)
    assert awq_err < 0.5 * rtn_err, (awq_err, rtn_err)
    assert found.losses[0] == pytest.approx(rtn_err, rel=1e-4)  # alpha = 0 is plain RTN
    assert min(found.losses) == pytest.approx(awq_err, rel=1e-4)  # the reported loss is the real output error
    assert s[[3, 20, 41]].min() > s.median() * 3  # the outlier channels got the large scales


@pytest.mark.parametrize("group", [ScaleGroup("mlp.w2", "mlp.w13", "up", "mlp.w2"),
                                   ScaleGroup("mlp.w13", "mlp_norm", None, "mlp")], ids=["linear", "mlp-block"])
def test_scale_search_in_bfloat16_finds_fp32s_scales(group):
    """fwd, a bfloat16 copy of the layer, runs the search's forwards (the default in quantize_layers): the candidates
    still come from the fp32 weights, the losses stay within bfloat16's rounding of fp32's, the same alpha wins on
    these inputs, and both layers are left as they were."""
    cfg = dataclasses.replace(MHA, intermediate_size=64)
    layer = DecoderLayer(cfg, 0).eval().requires_grad_(False)
    fwd = copy.deepcopy(layer).to(torch.bfloat16)
    kept = {name: p.clone() for name, p in fwd.named_parameters()}
    x = outlier_inputs()
    exact = search_scale(layer, group, x, Q32)
    fast = search_scale(layer, group, x, Q32, fwd=fwd)
    assert all(torch.equal(p, kept[name]) for name, p in fwd.named_parameters())
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(exact.losses), rtol=0.05, atol=0)
    assert fast.losses != exact.losses  # really run in bfloat16
    assert fast.alpha == exact.alpha and torch.equal(fast.scales, exact.scales)


def test_block_losses_run_on_evenly_spaced_whole_blocks():
    group = ScaleGroup("mlp.w13", "mlp_norm", None, "mlp")
    layer = DecoderLayer(dataclasses.replace(MHA, intermediate_size=64), 0).eval().requires_grad_(False)
    x = outlier_inputs(n=7)  # [7, 32, 64]
    assert torch.equal(_spaced_blocks(x, 3 * 32 + 5), x[[0, 3, 6]])
    assert torch.equal(_spaced_blocks(x, 10), x[[0]]) and _spaced_blocks(x, None) is x
    full = search_scale(layer, group, x, Q32, search_tokens=None)
    assert search_scale(layer, group, x, Q32, search_tokens=7 * 32).losses == full.losses  # all fit: no sampling
    sampled = search_scale(layer, group, x, Q32, search_tokens=3 * 32 + 5)
    on_blocks = search_scale(layer, group, x[[0, 3, 6]], Q32, search_tokens=None)
    assert sampled.losses[0] == pytest.approx(on_blocks.losses[0], rel=1e-6)  # alpha = 0 (RTN) on blocks 0, 3, 6
    assert sampled.losses[0] != pytest.approx(full.losses[0], rel=1e-3)
    # the candidate scales come from mean|x| over every token, not only the sampled blocks
    torch.testing.assert_close(sampled.scales, awq_scales(x.abs().mean((0, 1)), sampled.alpha))


# ---- (c) clipping ----


def group_errors(w, x, q_w, group_size):
    """Per (output channel, weight group) MSE of the group's share of the output: [N, K/G]."""
    N, K = w.shape
    xg = x.reshape(-1, K // group_size, group_size)  # [T, K/G, G]
    ref = torch.einsum("tgk,ngk->tng", xg, w.view(N, -1, group_size))
    out = torch.einsum("tgk,ngk->tng", xg, q_w.view(N, -1, group_size))
    return (out - ref).pow(2).mean(0)


def test_clip_search_never_increases_the_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 128, generator=g)  # Gaussian tails: the max of a group is a rare, costly value
    x = torch.randn(600, 128, generator=g)
    lo, hi = search_clip(w, x, Q32)
    assert lo.shape == hi.shape == (128, 4)
    wg = w.view(128, 4, 32)
    w_min, w_max = wg.amin(-1), wg.amax(-1)
    for bound, full in ((lo, w_min), (hi, w_max)):  # ratios in (0.5, 1]
        ratio = bound / full
        assert (ratio <= 1 + 1e-6).all() and (ratio > 0.5 - 1e-6).all()
    clipped = clip_weight(w, lo, hi, 32)
    xs = x[:: 600 // 512]  # the tokens the search samples
    err_clip = group_errors(w, xs, pseudo_quantize(clipped, Q32), 32)
    err_plain = group_errors(w, xs, pseudo_quantize(w, Q32), 32)
    assert (err_clip <= err_plain * (1 + 1e-5) + 1e-9).all()  # never worse, group by group
    assert err_clip.sum() < 0.97 * err_plain.sum()  # and better overall (about 6% here)
    out_err = lambda q_w: (x @ (q_w - w).t()).pow(2).mean()  # noqa: E731
    assert out_err(pseudo_quantize(clipped, Q32)) < out_err(pseudo_quantize(w, Q32))  # the whole output too


# ---- (d) quantize_model end to end ----


def awq_and_rtn(cfg, **kwargs):
    model = tiny_model(cfg)
    calib = tokens(8, 64)
    ref = model(calib)
    awq_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    awq = quantize_model(awq_model, calib, Q32, method="awq", progress=False, **kwargs)
    rtn = quantize_model(rtn_model, calib, Q32, method="rtn", progress=False)
    return model, calib, ref, (awq_model, awq), (rtn_model, rtn)


@pytest.mark.parametrize("cfg", [MHA, GQA, GEMMA], ids=["mha", "gqa", "gemma"])
def test_quantize_model_shapes_and_error(cfg):
    model, calib, ref, (awq_model, awq), (rtn_model, rtn) = awq_and_rtn(cfg)
    names = linear_names(cfg)
    for result in (awq, rtn):
        assert list(result) == names
        for name, (q, scales, zeros) in result.items():
            N, K = model.get_submodule(name).weight.shape
            assert q.dtype == torch.uint8 and q.shape == (N, K) and int(q.max()) <= 15
            assert scales.dtype == zeros.dtype == torch.float32 and scales.shape == zeros.shape == (N, K // 32)
    for name in names:  # the result quantizes the model's final (scaled, clipped) weights
        q, scales, zeros = quantize(awq_model.get_submodule(name).weight, Q32)
        assert torch.equal(q, awq[name][0]) and torch.equal(scales, awq[name][1])
    assert not torch.equal(awq_model.layers[0].attn_norm, model.layers[0].attn_norm)  # scales were folded
    apply_pseudo_quantized(awq_model, awq, Q32)
    apply_pseudo_quantized(rtn_model, rtn, Q32)
    awq_err = (awq_model(calib) - ref).pow(2).mean()
    rtn_err = (rtn_model(calib) - ref).pow(2).mean()
    assert awq_err < rtn_err, (awq_err, rtn_err)


@pytest.mark.parametrize("cfg", [MHA, GEMMA], ids=["mha", "gemma"])
@pytest.mark.parametrize("w_bit", [4, 3])
def test_awq_gptq_beats_awq(cfg, w_bit):
    """The same search and fold, then GPTQ's rounding within the clip ranges and the scale refit, on the shrunk
    Hessian: the quantized model's logits are closer to the full-precision ones than AWQ's (on the calibration blocks
    and on other text); same format; deterministic."""
    qcfg = QuantConfig(w_bit=w_bit, group_size=32)
    model = tiny_model(cfg)
    calib, other = tokens(8, 64), tokens(4, 64, seed=7)
    ref, ref_other = model(calib), model(other)
    errors = {}
    for method in ("awq", "awq-gptq"):
        m = copy.deepcopy(model)
        result = quantize_model(m, calib, qcfg, method=method, progress=False)
        for name, (q, scales, zeros) in result.items():
            N, K = model.get_submodule(name).weight.shape
            assert q.dtype == torch.uint8 and q.shape == (N, K) and int(q.max()) <= qcfg.max_int
            assert scales.shape == zeros.shape == (N, K // 32) and torch.equal(zeros, zeros.round())
        if method == "awq-gptq":
            again = quantize_model(copy.deepcopy(model), calib, qcfg, method=method, progress=False)
            assert all(torch.equal(a, b) for n in result for a, b in zip(result[n], again[n]))
        apply_pseudo_quantized(m, result, qcfg)
        errors[method] = [(m(x) - r).pow(2).mean().item() for x, r in ((calib, ref), (other, ref_other))]
    assert all(g < a for g, a in zip(errors["awq-gptq"], errors["awq"])), errors


def test_awq_without_clip_preserves_the_function_and_is_deterministic():
    model, calib, ref, (awq_model, awq), _ = awq_and_rtn(MHA, clip=False)
    torch.testing.assert_close(awq_model(calib), ref, atol=1e-5, rtol=1e-5)  # only folds: same logits
    again = quantize_model(copy.deepcopy(model), calib, Q32, method="awq", clip=False, progress=False)
    for name, tensors in awq.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, again[name])), name


def test_awq_without_clip_preserves_a_gemma_like_function():
    model, calib, ref, (awq_model, _), _ = awq_and_rtn(GEMMA, clip=False)
    torch.testing.assert_close(awq_model(calib), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("forward_dtype", [torch.float32, torch.bfloat16])
def test_awq_searches_on_the_model_own_activations(monkeypatch, forward_dtype):
    """Each layer's searches see the activations of the model's own forward: a sliding layer's window and rotary
    table included (the input of attn.wo is its attention's output); computed in bfloat16 (the default), within
    its rounding."""
    model = tiny_model(GEMMA, outliers=False)
    calib = tokens(2, 32)
    want, seen = {}, []
    hooks = [layer.attn.wo.register_forward_hook(lambda m, args, out, i=i: want.__setitem__(i, args[0].clone()))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    search = awq.search_scale

    def spy(layer, group, x, *args, **kwargs):
        if group.linear == "attn.wo":
            seen.append(x.clone())
        return search(layer, group, x, *args, **kwargs)

    monkeypatch.setattr(awq, "search_scale", spy)
    quantize_model(copy.deepcopy(model), calib, Q32, progress=False, forward_dtype=forward_dtype)
    assert len(seen) == 2
    for i in range(2):
        if forward_dtype == torch.float32:
            torch.testing.assert_close(seen[i], want[i], atol=1e-5, rtol=1e-5)
        else:
            scale = want[i].abs().max().item()
            torch.testing.assert_close(seen[i], want[i], atol=0.03 * scale, rtol=0.03)
            assert (seen[i] - want[i]).abs().max() > 1e-4 * scale  # really computed in bfloat16


def test_awq_is_deterministic_and_quantized_inputs_option():
    model = tiny_model(MHA)
    calib = tokens(4, 32)
    runs = [quantize_model(copy.deepcopy(model), calib, Q32, progress=False) for _ in range(2)]
    for name, tensors in runs[0].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, runs[1][name])), name
    qin = quantize_model(copy.deepcopy(model), calib, Q32, progress=False, quantized_inputs=True)
    assert list(qin) == list(runs[0])
    assert torch.equal(qin["layers.0.attn.wqkv"][0], runs[0]["layers.0.attn.wqkv"][0])  # layer 0: same inputs
    assert not torch.equal(qin["layers.1.mlp.w2"][1], runs[0]["layers.1.mlp.w2"][1])  # layer 1 saw other inputs


def test_awq_on_bf16_model():
    model = tiny_model(MHA).to(torch.bfloat16)
    model.cos_sin = model.cos_sin.float()  # as the loader builds it: weights in bf16, rotary table in fp32
    result = quantize_model(model, tokens(2, 32), Q32, progress=False)
    assert len(result) == 8 and model.layers[0].attn_norm.dtype == torch.bfloat16
    apply_pseudo_quantized(model, result, Q32)
    assert torch.isfinite(model(tokens(1, 16)).float()).all()


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_group_size_that_does_not_divide_fails_before_any_work(method):
    model = tiny_model(MHA)  # hidden 64, intermediate 96: group size 64 divides all but w2's 96 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TinychatError, match=r"layers\.0\.mlp\.w2.*64.*96"):
        quantize_model(model, tokens(2, 16), QuantConfig(4, 64), method=method, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_arguments():
    model = tiny_model(MHA)
    with pytest.raises(ValueError, match="method"):
        quantize_model(model, tokens(), Q32, method="gptq")
    with pytest.raises(TinychatError, match="context"):
        quantize_model(model, tokens(1, 200), Q32, progress=False)
    with pytest.raises(TinychatError, match="int64"):
        quantize_model(model, tokens().int(), Q32, progress=False)
    with pytest.raises(TinychatError, match="needs calibration tokens"):
        quantize_model(model, None, Q32, progress=False)
    assert len(quantize_model(model, None, Q32, method="rtn")) == 8  # RTN needs no calibration


# ---- (e) calibration data ----


class ByteTokenizer:
    """One token per UTF-8 byte: predictable token counts for the loader tests."""

    def encode(self, text):
        return list(text.encode())


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "meta": {"source": "test"}}) + "\n" for t in texts))
    return path


def test_calibration_from_jsonl_and_txt(tmp_path):
    docs = [f"document {i}: " + "abcdefgh " * (5 + i % 7) for i in range(60)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", docs)
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    a = load_calibration(jsonl, ByteTokenizer(), n_samples=8, seqlen=64, seed=0)
    b = load_calibration(txt, ByteTokenizer(), n_samples=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b)  # same documents, same shuffle
    assert torch.equal(a, load_calibration(jsonl, ByteTokenizer(), n_samples=8, seqlen=64, seed=0))
    assert not torch.equal(a, load_calibration(jsonl, ByteTokenizer(), n_samples=8, seqlen=64, seed=1))
    text = bytes(a.flatten().tolist()).decode()
    assert text.startswith("document ") and "\n" not in text  # whole stripped documents, concatenated


def test_calibration_skips_long_documents_and_returns_fewer_blocks_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["x" * 600, "short one " * 20, "", "another short " * 20])
    with pytest.warns(UserWarning, match="2 of the 8"):
        blocks = load_calibration(path, ByteTokenizer(), n_samples=8, seqlen=200)
    assert blocks.shape == (2, 200)
    assert b"xxxx" not in bytes(blocks.flatten().tolist())  # the 600-token document was skipped (> 512)


@pytest.mark.parametrize("content, suffix, message", [
    ("\n\n  \n", ".txt", "empty"),
    ("", ".jsonl", "empty"),
    ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', ".jsonl", "line 3: invalid JSON"),
    ('{"text": "ok"}\n{"body": "no text field"}\n', ".jsonl", 'line 2: expected an object with a string "text"'),
    ("a short text", ".txt", r"found 12 tokens in 1 document\(s\), need 64"),
])
def test_calibration_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(TinychatError, match=message):
        load_calibration(path, ByteTokenizer(), seqlen=64)


def test_calibration_unreadable_and_missing_files(tmp_path, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xc3")
    with pytest.raises(TinychatError, match="cannot read"):
        load_calibration(bad, ByteTokenizer())
    with pytest.raises(TinychatError, match="no such file"):
        load_calibration(tmp_path / "missing.jsonl", ByteTokenizer())
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(TinychatError, match="unsupported"):
        load_calibration(csv, ByteTokenizer())
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(TinychatError, match="datasets"):
        load_calibration("mit-han-lab/pile-val-backup", ByteTokenizer())


def test_builtin_corpus_is_small_and_gives_blocks():
    assert len(BUILTIN_CORPUS.encode()) < 6000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built-in corpus is small by design: no warning
        blocks = load_calibration(None, ByteTokenizer(), n_samples=128, seqlen=256, max_doc_tokens=None)
    assert blocks.shape[0] >= 15 and blocks.shape[1] == 256
    assert bytes(blocks.flatten().tolist()).decode().isascii()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    from tinychat.io.loader import load_model

    return load_model(smollm2_gguf)[1]


@pytest.fixture(scope="module")
def calib_file(shared_data):
    return shared_data("calib_mix_c4_wiki_tinystories.jsonl")


def test_shared_calibration_corpus(calib_file, smollm2_tokenizer):
    blocks = load_calibration(calib_file, smollm2_tokenizer, n_samples=128, seqlen=512)
    assert blocks.shape == (128, 512) and blocks.dtype == torch.int64
    assert 0 <= int(blocks.min()) and int(blocks.max()) < smollm2_tokenizer.vocab_size
    default = load_calibration(None, smollm2_tokenizer, n_samples=128, seqlen=512)
    assert default.shape[0] >= 2 and default.shape[1] == 512
