"""The attention op (the compiled CPU kernel) against its PyTorch reference and against SDPA, on every CPU path,
for the decode step and prefill (fresh, and in chunks over an existing cache), and the model built on it."""

import pytest
import torch
import torch.nn.functional as F

from tinychat import ops

# (B, T, H, Hkv, S, start, D): decode (T = 1) and prefill; one head, GQA groups of 3, 4 and 8, MHA; contexts of 1,
# odd lengths, one past a key block, the full cache; prefill fresh (start 0) and a chunk over a cache (start > 0);
# decode whose kv heads do not spread evenly over the threads (its query rows are split over them)
SHAPES = [(1, 1, 1, 1, 8, 0, 64), (1, 1, 9, 3, 100, 36, 64), (2, 1, 8, 2, 300, 64, 128), (3, 1, 4, 4, 64, 63, 16),
          (1, 1, 32, 8, 1030, 1028, 128), (1, 2, 9, 3, 40, 11, 64), (1, 17, 9, 3, 17, 0, 64),
          (2, 64, 8, 2, 200, 70, 64), (1, 300, 4, 1, 300, 0, 32), (1, 33, 32, 4, 100, 67, 128), (1, 5, 3, 3, 5, 0, 8),
          (1, 1, 9, 3, 300, 250, 64), (1, 1, 4, 1, 1030, 1000, 64)]  # decode with rows split over 2 threads


def tc():
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    return torch.ops.tinychat


def inputs(B, T, H, Hkv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Hkv,S,start,D", SHAPES)
def test_matches_reference_and_sdpa(B, T, H, Hkv, S, start, D, dtype, isa, threads):
    q, k, v = inputs(B, T, H, Hkv, S, D, dtype)
    positions = torch.arange(start, start + T)
    out = tc().attention(q, k, v, positions, D**-0.5)
    assert out.shape == (B, T, H, D) and out.dtype == dtype and out.is_contiguous()
    ref = ops.attention_ref(q, k, v, positions, D**-0.5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    # the reference is SDPA's causal attention with the queries' triangle placed at the end of the keys
    L = start + T
    mask = torch.arange(L)[None, :] <= positions[:, None]  # [T, L]
    sdpa = F.scaled_dot_product_attention(q.float().transpose(1, 2), k[:, :, :L].float(), v[:, :, :L].float(),
                                          attn_mask=mask, enable_gqa=H != Hkv).transpose(1, 2)
    torch.testing.assert_close(ref.float(), sdpa, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,Hkv,S,start,D", SHAPES)
def test_a_half_cache_below_float32_queries(B, T, H, Hkv, S, start, D, kv_dtype, isa, threads):
    """A float16 / bfloat16 cache under float32 q (the CPU's default cache for a float32 model) is read as its values
    widened to fp32 (in registers at a decode step, once per call with the keys transposed at a prefill): the output
    is bit for bit the fp32 kernel's on those values (which reads the keys in place), and the reference's."""
    q, k, v = inputs(B, T, H, Hkv, S, D, torch.float32)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    positions = torch.arange(start, start + T)
    out = tc().attention(q, k, v, positions, D**-0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, tc().attention(q, k.float(), v.float(), positions, D**-0.5))
    torch.testing.assert_close(out, ops.attention_ref(q, k, v, positions, D**-0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_rope_kv_write_rounds_k_and_v_once_into_a_half_cache(kv_dtype):
    """float32 qkv into a half cache: q as with a float32 cache, k and v that cache's values rounded once."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 6 + 2 * 2, 32, generator=g)  # H 6, Hkv 2
    positions = torch.tensor([3, 0, 7, 1, 9])
    cos_sin = ops.rope_cos_sin(1.0 / 10000.0 ** (torch.arange(0, 32, 2).float() / 32), 16)  # [16, 32]
    k32, v32 = torch.zeros(2, 2, 12, 32), torch.zeros(2, 2, 12, 32)
    kh, vh = torch.zeros(2, 2, 12, 32, dtype=kv_dtype), torch.zeros(2, 2, 12, 32, dtype=kv_dtype)
    q32 = tc().rope_kv_write(qkv, positions, cos_sin, k32, v32)
    qh = tc().rope_kv_write(qkv, positions, cos_sin, kh, vh)
    assert torch.equal(qh, q32) and torch.equal(kh, k32.to(kv_dtype)) and torch.equal(vh, v32.to(kv_dtype))
    kr, vr = torch.zeros_like(kh), torch.zeros_like(vh)  # the reference writes the same (fp32 sums: within an ulp)
    torch.testing.assert_close(ops.rope_kv_write_ref(qkv, positions, cos_sin, kr, vr), qh, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kr, kh)
    assert torch.equal(vr, vh)


def test_arbitrary_positions_and_strided_query(isa):
    """Any positions, not only a run (each query sees its own prefix), and q viewed out of a wider tensor."""
    q_all, k, v = inputs(2, 6, 16, 4, 90, 64, torch.float32)
    q = q_all[:, :, 4:12]  # [B, T, 8, D] with the heads of a wider tensor: strided
    assert not q.is_contiguous()
    k, v = k[:, :2], v[:, :2]  # [B, 2, S, D], strided over the heads
    positions = torch.tensor([89, 0, 5, 64, 63, 40])
    torch.testing.assert_close(tc().attention(q, k, v, positions, 0.125),
                               ops.attention_ref(q, k, v, positions, 0.125), atol=1e-5, rtol=1e-5)


def test_large_scores_do_not_overflow(isa):
    q, k, v = inputs(1, 20, 2, 1, 200, 64, torch.float32)
    positions = torch.arange(180, 200)
    out = tc().attention(q * 100, k, v, positions, 1.0)  # scores in the thousands: online softmax must rescale
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ops.attention_ref(q * 100, k, v, positions, 1.0), atol=1e-4, rtol=1e-4)


def _bad():
    q, k, v = inputs(1, 3, 4, 2, 16, 8, torch.float32)
    pos = torch.arange(3)
    yield "position past the cache", (q, k, v, torch.tensor([0, 1, 16]), 1.0), r"positions must be in \[0, 16\)"
    yield "negative position", (q, k, v, torch.tensor([0, -1, 2]), 1.0), r"positions must be in \[0, 16\)"
    yield "positions shape", (q, k, v, torch.arange(4), 1.0), r"positions must be a contiguous \[T\] = \[3\]"
    yield "positions dtype", (q, k, v, pos.int(), 1.0), "positions must be int64"
    yield "heads", (torch.randn(1, 3, 3, 8), k, v, pos, 1.0), r"must be a multiple of the caches'"
    yield "dtype", (q, k.double(), v, pos, 1.0), r"the caches' dtype must be"
    yield "half q, float cache", (q.half(), k, v, pos, 1.0), r"dtype must be Half and the same for both, got Float"
    yield "k and v dtypes differ", (q, k.half(), v.bfloat16(), pos, 1.0), r"the same for both"
    yield "shape", (q, k, v[:, :, :8], pos, 1.0), r"same shape"
    yield "q rank", (q[0], k, v, pos, 1.0), r"q must have shape \[B, T, n_heads, head_dim\]"
    yield "head dim", (torch.randn(1, 3, 4, 16), k, v, pos, 1.0), r"the caches' shape .* must be \[1, Hkv, S, 16\]"


def _bad_window():
    q, k, v = inputs(1, 3, 4, 2, 16, 8, torch.float32)
    pos = torch.arange(3)
    yield "negative window", (q, k, v, pos, 1.0, -1), r"window must be >= 0"
    short = k[:, :, :2].contiguous()
    yield "ring shorter than the window", (q, short, short, pos + 5, 1.0, 3), r"sees 3 positions \(window 3\)"
    yield "negative position in a window", (q, k, v, torch.tensor([0, -1, 2]), 1.0, 4), r"positions must be >= 0"
    yield "position past the cache without a window", (q, k, v, pos + 14, 1.0, 0), r"positions must be in \[0, 16\)"


@pytest.mark.parametrize("case", [*_bad(), *_bad_window()], ids=lambda c: c[0])
def test_bad_input(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match="attention: .*" + message):
        tc().attention(*args)


def test_opcheck():
    q, k, v = inputs(1, 4, 4, 2, 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.tinychat.attention.default, (q, k, v, torch.arange(5, 9), 0.3))
    torch.library.opcheck(torch.ops.tinychat.attention.default, (q, k, v, torch.arange(5, 9), 0.3, 3))
    torch.library.opcheck(torch.ops.tinychat.attention.default, (q, k, v, torch.arange(20, 24), 0.3, 6))  # a ring


def test_model_cached_paths_match_full_forward():
    """Prefill in chunks, then decode one token at a time over the cache: the logits of one full forward pass."""
    from tinychat.config import ModelConfig
    from tinychat.model import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.eval()
    tokens = torch.randint(0, 64, (1, 70))
    with torch.no_grad():
        full = model(tokens)  # [1, 70, V], no cache
        model.setup_kv_cache(128)
        chunks = [model(tokens[:, :3]), model(tokens[:, 3:20], torch.arange(3, 20))]
        steps = [model(tokens[:, i : i + 1], torch.tensor([i]))[:, 0] for i in range(20, 70)]
    torch.testing.assert_close(torch.cat(chunks, 1), full[:, :20], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 20:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 32), (8, 1, 16)])
def test_each_row_is_the_same_whatever_the_chunk(H, Hkv, D, dtype, isa, threads):
    """A query row's output does not depend on which other rows share its call: a prompt prefilled in chunks, or
    token by token (decode), gives bit for bit the rows of one full prefill over the same cache. This is what makes
    greedy output independent of how much of a prompt the KV cache reused."""
    T = 150
    q, k, v = inputs(1, T, H, Hkv, T, D, dtype, seed=H + D)
    full = tc().attention(q, k, v, torch.arange(T), D**-0.5)
    for bounds in ([0, 1, 2, 70, 71, 150], [0, 64, 65, 129, 150], [0, 17, 149, 150]):
        for a, b in zip(bounds, bounds[1:]):
            chunk = tc().attention(q[:, a:b], k, v, torch.arange(a, b), D**-0.5)
            assert torch.equal(chunk, full[:, a:b]), (bounds, a, b)


def test_prefix_reuse_gives_bit_identical_logits(isa, threads):
    """The model on int4 linears: a prompt prefilled whole, in two parts (a cached prefix, then the rest) or token by
    token gives the same last logits bit for bit on the fp32 CPU paths (the int4 kernel computes each row the same way
    whatever the number of rows, and so does attention), so greedy decoding does not depend on how much of a prompt
    the cache reused. avx512_vnni rounds x by how many rows a call has (two int8 levels up to 8, none up to 64, one
    level past that): there the parts agree within that rounding (measured 0.8% of the largest logit)."""
    from tinychat.bench import random_model
    from tinychat.config import ModelConfig

    cfg = ModelConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    model = random_model(cfg, "int4")
    tokens = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.setup_kv_cache(128)
        whole = model(tokens, torch.arange(90), last_only=True)  # as the engine prefills: the head on the last row
        for split in (1, 37, 74, 89):
            model.setup_kv_cache(128)
            model(tokens[:, :split], torch.arange(split))
            rest = model(tokens[:, split:], torch.arange(split, 90), last_only=True)
            assert same(rest, whole, isa), split
        model.setup_kv_cache(128)
        for i in range(89):  # decode-sized steps
            model(tokens[:, i : i + 1], torch.tensor([i]))
        assert same(model(tokens[:, 89:], torch.tensor([89]), last_only=True), whole, isa)


def same(a, b, isa):
    """Bit for bit on the fp32 CPU paths; within 2% of the largest logit on avx512_vnni."""
    if isa == "avx512_vnni":
        return bool((a - b).abs().max() <= 0.02 * b.abs().max())
    return torch.equal(a, b)


# ---- sliding windows and ring caches ----

# (B, T, H, Hkv, S, start, D, window): decode (T = 1) and prefill, GQA groups of 3 and 4, MHA; windows of 1, 3,
# one past a key block, and larger than the sequence; head dims that are and are not a multiple of 16
WINDOW_SHAPES = [(1, 1, 9, 3, 100, 50, 64, 1), (1, 1, 4, 1, 300, 250, 64, 3), (2, 1, 8, 2, 300, 200, 128, 70),
                 (1, 17, 9, 3, 40, 20, 64, 3), (2, 64, 8, 2, 200, 70, 64, 65), (1, 33, 6, 2, 100, 10, 16, 500),
                 (1, 5, 3, 3, 9, 3, 8, 2), (1, 300, 4, 1, 300, 0, 32, 129), (1, 2, 9, 3, 40, 11, 64, 1)]


def band_sdpa(q, k, v, positions, window):
    """SDPA over the first max(positions) + 1 cache rows with a band mask: query t sees positions
    max(0, p_t - window + 1) .. p_t (window 0: 0 .. p_t)."""
    H, Hkv = q.shape[2], k.shape[1]
    L = int(positions.max()) + 1
    j = torch.arange(L)[None, :]  # [1, L]
    mask = (j <= positions[:, None]) & ((j > positions[:, None] - window) if window > 0 else True)  # [T, L]
    return F.scaled_dot_product_attention(q.float().transpose(1, 2), k[:, :, :L].float(), v[:, :, :L].float(),
                                          attn_mask=mask, enable_gqa=H != Hkv).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Hkv,S,start,D,window", WINDOW_SHAPES)
def test_window_matches_reference_and_sdpa(B, T, H, Hkv, S, start, D, window, dtype, isa, threads):
    q, k, v = inputs(B, T, H, Hkv, S, D, dtype, seed=window)
    positions = torch.arange(start, start + T)
    out = tc().attention(q, k, v, positions, D**-0.5, window)
    assert out.shape == (B, T, H, D) and out.dtype == dtype and out.is_contiguous()
    ref = ops.attention_ref(q, k, v, positions, D**-0.5, window)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(ref.float(), band_sdpa(q, k, v, positions, window),
                               atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
    if window >= start + T:  # a window past the sequence: the unwindowed kernel, bit for bit
        assert torch.equal(out, tc().attention(q, k, v, positions, D**-0.5))
    elif window < start + T - 1:  # the window changes something (the test would not see a window ignored)
        assert not torch.allclose(out.float(), tc().attention(q, k, v, positions, D**-0.5).float(), atol=1e-3)


def ring_of(full, S, upto):
    """The ring cache of S rows after positions 0 .. upto - 1 of `full` [B, Hkv, L, D] were written in order."""
    ring = torch.full((*full.shape[:2], S, full.shape[3]), float("nan"), dtype=full.dtype)
    for j in range(upto):
        ring[:, :, j % S] = full[:, :, j]
    return ring


# (T, start, window): decode and prefill over a ring of S = window + T - 1 rows that has wrapped (start past S),
# not yet wrapped, and wrapped several times
RING_CASES = [(1, 50, 3), (1, 200, 70), (1, 2, 5), (17, 40, 3), (5, 300, 64), (33, 10, 100), (64, 500, 65),
              (2, 1000, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,start,window", RING_CASES)
def test_ring_cache_matches_full_cache(T, start, window, dtype, isa, threads):
    """A ring of S = window + T - 1 rows (position j at row j % S) gives the full cache's output for the same
    positions (the reference on the full cache; the kernel on the full cache within fp32 rounding)."""
    B, H, Hkv, D = 2, 6, 2, 32
    L = start + T
    q, k, v = inputs(B, T, H, Hkv, L, D, dtype, seed=T + window)
    S = window + T - 1
    kr, vr = ring_of(k, S, L), ring_of(v, S, L)  # rows never written (S > L) hold NaN: never read
    positions = torch.arange(start, L)
    out = tc().attention(q, kr, vr, positions, D**-0.5, window)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ops.attention_ref(q, k, v, positions, D**-0.5, window), **tol)
    torch.testing.assert_close(out, tc().attention(q, k, v, positions, D**-0.5, window), **tol)
    if S <= L:  # every row written: the reference reads the ring by rows the same way
        torch.testing.assert_close(ops.attention_ref(q, kr, vr, positions, D**-0.5, window),
                                   ops.attention_ref(q, k, v, positions, D**-0.5, window), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_written_step_by_step_with_rope_kv_write(dtype, isa):
    """A sliding-window layer's life: rope_kv_write into a ring of window + T - 1 rows (prefill chunks, then decode
    steps) while the sequence wraps the ring several times; each call's attention is the one over a full cache."""
    B, H, Hkv, D, window, chunk = 1, 4, 2, 32, 7, 5
    S = window + chunk - 1
    L = 5 * S + 3
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, L, H + 2 * Hkv, D, generator=g).to(dtype)
    cos_sin = ops.rope_cos_sin(1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D), L)
    k_ring, v_ring = torch.zeros(B, Hkv, S, D, dtype=dtype), torch.zeros(B, Hkv, S, D, dtype=dtype)
    k_full, v_full = torch.zeros(B, Hkv, L, D, dtype=dtype), torch.zeros(B, Hkv, L, D, dtype=dtype)
    bounds = [0, 5, 8, 13, 18] + list(range(19, L + 1))  # prefill chunks of up to `chunk` tokens, then decode
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    for a, b in zip(bounds, bounds[1:]):
        positions = torch.arange(a, b)
        q = tc().rope_kv_write(qkv[:, a:b], positions, cos_sin, k_ring, v_ring)  # [B, b - a, H, D]
        q_full = tc().rope_kv_write(qkv[:, a:b], positions, cos_sin, k_full, v_full)
        assert torch.equal(q, q_full)
        rows = torch.arange(max(0, b - S), b)  # the positions the ring holds
        assert torch.equal(k_ring[:, :, rows % S], k_full[:, :, rows])
        assert torch.equal(v_ring[:, :, rows % S], v_full[:, :, rows])
        out = tc().attention(q, k_ring, v_ring, positions, D**-0.5, window)
        torch.testing.assert_close(out, ops.attention_ref(q, k_full, v_full, positions, D**-0.5, window), **tol)
        torch.testing.assert_close(out, tc().attention(q, k_full, v_full, positions, D**-0.5, window), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write_into_a_ring(dtype, threads):
    """Position p lands at row p % S: a run of positions past the ring's size wraps (and a plain cache's row p is
    unchanged); the reference does the same."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 4 + 2 * 2, 16, generator=g).to(dtype)  # H 4, Hkv 2
    positions = torch.arange(13, 18)  # rows 3, 4, 0, 1, 2 of a ring of 5
    cos_sin = ops.rope_cos_sin(1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16), 32)
    k, v = torch.zeros(2, 2, 5, 16, dtype=dtype), torch.zeros(2, 2, 5, 16, dtype=dtype)
    k_full, v_full = torch.zeros(2, 2, 20, 16, dtype=dtype), torch.zeros(2, 2, 20, 16, dtype=dtype)
    q = tc().rope_kv_write(qkv, positions, cos_sin, k, v)
    q_full = tc().rope_kv_write(qkv, positions, cos_sin, k_full, v_full)
    assert torch.equal(q, q_full)
    assert k_full[:, :, :13].abs().sum() == 0 and k_full[:, :, 18:].abs().sum() == 0  # rows 13..17 only
    held = torch.tensor([15, 16, 17, 13, 14])  # the position of each ring row
    assert torch.equal(k, k_full[:, :, held]) and torch.equal(v, v_full[:, :, held])
    kr, vr = torch.zeros_like(k), torch.zeros_like(v)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(ops.rope_kv_write_ref(qkv, positions, cos_sin, kr, vr), q, **tol)
    torch.testing.assert_close(kr, k, **tol)
    assert torch.equal(vr, v)


@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_windowed_row_is_the_same_whatever_the_chunk(window, dtype, isa, threads):
    """With a window, too, a query row's output does not depend on the other rows of its call, on a plain cache and
    on a ring (where the blocks of keys also end where the ring wraps)."""
    T, H, Hkv, D = 150, 9, 3, 64
    q, k, v = inputs(1, T, H, Hkv, T, D, dtype, seed=window)
    full = tc().attention(q, k, v, torch.arange(T), D**-0.5, window)
    for bounds in ([0, 1, 2, 70, 71, 150], [0, 64, 65, 129, 150], [0, 17, 149, 150]):
        for a, b in zip(bounds, bounds[1:]):
            chunk = tc().attention(q[:, a:b], k, v, torch.arange(a, b), D**-0.5, window)
            assert torch.equal(chunk, full[:, a:b]), (bounds, a, b)
    if window:  # decode over a ring of window rows: each step as the step alone on the same ring
        S = window
        for p in (40, 100, 149):
            kr, vr = ring_of(k, S, p + 1), ring_of(v, S, p + 1)
            step = tc().attention(q[:, p:p + 1], kr, vr, torch.tensor([p]), D**-0.5, window)
            torch.testing.assert_close(step, full[:, p:p + 1], atol=1e-5 if dtype == torch.float32 else 1e-2,
                                       rtol=1e-5 if dtype == torch.float32 else 1e-2)
