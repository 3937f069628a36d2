"""One Llama-family decoder for every supported architecture, driven by ModelConfig.

q/k/v and gate/up are fused into single projections at load time; `layer_linears` declares each linear of a decoder
layer and its row blocks, once, for every module that loads, quantizes, saves or swaps them. Norms, the rotary
embedding with the KV-cache write, attention and the MLP's activation go through `tinychat.ops` (compiled kernels
when built, PyTorch references otherwise); the model never asks which device it is on: the dispatcher picks the
kernel. Positions are a tensor, never a Python number, so that a decode step replays as a CUDA graph with its
positions in a static buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tinychat import ops
from tinychat.config import ModelConfig, rope_inv_freq

# The context allocated when none is asked for (the KV cache of Engine, `--ctx`'s default), at most the model's own;
# also the rotary table's first size (it grows with the context in use). llama.cpp's default context, too.
DEFAULT_CONTEXT = 4096
# Rows a sliding layer's KV cache keeps beyond its window (a ring: position p at row p % rows): a forward of more
# than WINDOW_SLACK + 1 tokens runs in pieces, so that no token's window is overwritten by a later token of its own
# forward (tinychat.ops.attention).
WINDOW_SLACK = 512


@dataclass(frozen=True)
class LinearSpec:
    """One linear of a decoder layer: where it lives, its input width, its bias, and its output rows as named
    blocks in row order (a fused linear has several: wqkv = q | k | v; the name map of a checkpoint format says
    which tensor each block comes from)."""

    name: str  # module path within a DecoderLayer, e.g. "attn.wqkv"
    in_features: int
    parts: tuple[tuple[str, int], ...]  # (block, rows) in row order, e.g. (("q", H*D), ("k", Hkv*D), ("v", Hkv*D))
    bias: bool

    @property
    def out_features(self) -> int:
        return sum(rows for _, rows in self.parts)

    def rows(self, part: str) -> slice:
        """The output rows of block `part`."""
        start = 0
        for name, n in self.parts:
            if name == part:
                return slice(start, start + n)
            start += n
        raise KeyError(f"{self.name} has no row block {part!r} (it has {', '.join(n for n, _ in self.parts)})")


def layer_linears(cfg: ModelConfig) -> tuple[LinearSpec, ...]:
    """The linears of each decoder layer, in execution order: the one place that says how they are fused."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return (
        LinearSpec("attn.wqkv", C, (("q", q), ("k", kv), ("v", kv)), cfg.qkv_bias),
        LinearSpec("attn.wo", q, (("o", C),), cfg.o_bias),
        LinearSpec("mlp.w13", C, (("gate", I), ("up", I)), cfg.mlp_bias),
        LinearSpec("mlp.w2", I, (("down", C),), cfg.mlp_bias),
    )


def linear_names(cfg: ModelConfig) -> list[str]:
    """Every decoder linear of a Transformer: "layers.{i}.attn.wqkv", ..."""
    return [f"layers.{i}.{spec.name}" for i in range(cfg.num_layers) for spec in layer_linears(cfg)]


def linear_spec(cfg: ModelConfig, name: str) -> LinearSpec:
    """The LinearSpec of the decoder linear `name` ("attn.wqkv", ...)."""
    for spec in layer_linears(cfg):
        if spec.name == name:
            return spec
    raise KeyError(f"a decoder layer has no linear {name!r}")


def _op_form(linear: nn.Module) -> tuple[list[int], list[torch.Tensor]] | None:
    """How the one-call decoder runs `linear`: [bits, group size, has offsets, has bias] and its tensors (a float
    nn.Linear: bits 0, the weight and bias; the group forms of tinychat/linear.py say theirs); None if it cannot."""
    if type(linear) is nn.Linear:
        return [0, 0, 0, int(linear.bias is not None)], [linear.weight] + ([linear.bias] if linear.bias is not None
                                                                          else [])
    op_form = getattr(linear, "op_form", None)
    return None if op_form is None else op_form()


def _linear(cfg: ModelConfig, name: str) -> nn.Linear:
    spec = linear_spec(cfg, name)
    return nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)


class KVCache(nn.Module):
    """Keys and values of one layer for positions 0 .. max_seq_len - 1, preallocated once: k, v [B, Hkv, S, D] with
    S = rows <= max_seq_len; position p is at row p % S (a ring, for a sliding window, where S < max_seq_len)."""

    def __init__(self, batch: int, max_seq_len: int, rows: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, rows, head_dim)
        self.max_seq_len = max_seq_len
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window, self.scale, self.eps = window, cfg.attn_scale, cfg.rms_norm_eps  # window 0: every position
        self.wqkv = _linear(cfg, "attn.wqkv")  # q | k | v
        self.wo = _linear(cfg, "attn.wo")
        # RMSNorm of each query and key head (Qwen3, Gemma 3)
        self.q_norm = nn.Parameter(torch.ones(cfg.head_dim)) if cfg.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(cfg.head_dim)) if cfg.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        # x [B, T, C]; positions [T] int64 (the cache rows of the T tokens); cos_sin [max_pos, D] fp32
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D)
        if self.q_norm is not None:
            q, k, v = qkv.split((H, Hkv, Hkv), dim=2)  # [B, T, H | Hkv | Hkv, D]
            qkv = torch.cat((ops.rms_norm(q, self.q_norm, self.eps), ops.rms_norm(k, self.k_norm, self.eps), v), 2)
        if self.kv_cache is not None:
            k_cache, v_cache = self.kv_cache.k, self.kv_cache.v  # [B, Hkv, S, D]
        else:  # no cache: the T tokens alone, at positions 0..T-1
            k_cache, v_cache = x.new_empty(B, Hkv, T, D), x.new_empty(B, Hkv, T, D)
        q = ops.rope_kv_write(qkv, positions, cos_sin, k_cache, v_cache)  # [B, T, H, D]; k, v into the caches
        y = ops.attention(q, k_cache, v_cache, positions, self.scale, self.window)  # [B, T, H, D]
        return self.wo(y.view(B, T, H * D))


# ModelConfig.hidden_act -> the gated activation op: x [..., 2I] = gate | up -> act(gate) * up [..., I]
GATED_ACTIVATIONS = {"silu": ops.silu_and_mul, "gelu_tanh": ops.gelu_tanh_and_mul}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = _linear(cfg, "mlp.w13")  # gate | up
        self.w2 = _linear(cfg, "mlp.w2")
        self.act = GATED_ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w13(x)))  # w13: [B, T, 2I] = gate | up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.attn = Attention(cfg, cfg.layer_window(i))
        self.mlp = MLP(cfg)
        self.attn_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.mlp_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        # norms of the attention's and the MLP's outputs (Gemma 3)
        self.post_attn_norm = nn.Parameter(torch.ones(cfg.hidden_size)) if cfg.post_norms else None
        self.post_mlp_norm = nn.Parameter(torch.ones(cfg.hidden_size)) if cfg.post_norms else None
        self.local_rope = cfg.layer_local_rope(i)  # its rotary table: Transformer.rope_table
        self.eps = cfg.rms_norm_eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is x + residual (residual None: x alone); returns the next (x, residual) [B, T, C].

        Keeping the two apart lets each residual add fuse with the RMSNorm that follows it.
        """
        if residual is None:
            residual, x = x, ops.rms_norm(x, self.attn_norm, self.eps)
        else:
            x, residual = ops.add_rms_norm(x, residual, self.attn_norm, self.eps)
        x = self.attn(x, positions, cos_sin)
        if self.post_attn_norm is not None:
            x = ops.rms_norm(x, self.post_attn_norm, self.eps)
        x, residual = ops.add_rms_norm(x, residual, self.mlp_norm, self.eps)
        x = self.mlp(x)
        if self.post_mlp_norm is not None:
            x = ops.rms_norm(x, self.post_mlp_norm, self.eps)
        return x, residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        # an explicit weight skips the random init (costly on the meta device, and overwritten at load anyway)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._decoder = None  # the one-call decoder over these tensors and caches once built, False if none can be
        with torch.device("cpu"):  # real values even when the loader builds the module on the meta device
            # [D/2] each, stay on the CPU: the global layers' and, where it differs, the sliding layers' (Gemma 3)
            self._inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, rope_freq_factors)
            self._inv_freq_local = rope_inv_freq(cfg.rope_local, cfg.head_dim) if cfg.rope_local else None
            rows = min(cfg.context_length, DEFAULT_CONTEXT)
            self.register_buffer("cos_sin", ops.rope_cos_sin(self._inv_freq, rows), persistent=False)  # [rows, D]
            self.register_buffer("cos_sin_local", None if self._inv_freq_local is None else
                                 ops.rope_cos_sin(self._inv_freq_local, rows), persistent=False)  # [rows, D]

    def _rope_rows(self, rows: int) -> None:
        """Grow the rotary table to `rows` positions (built on the CPU, as at init): it follows the context in use,
        never the model's maximum, which a config may set to a billion."""
        if self.cos_sin.shape[0] < rows:
            self.cos_sin = ops.rope_cos_sin(self._inv_freq, rows).to(self.cos_sin.device)
            if self.cos_sin_local is not None:
                self.cos_sin_local = ops.rope_cos_sin(self._inv_freq_local, rows).to(self.cos_sin.device)

    def swap_linears(self, make: Callable[[str, nn.Module], nn.Module]) -> Transformer:
        """Replace every decoder linear by make(name, linear) ("layers.{i}.attn.wqkv", ...): how float linears
        become 4-bit ones, at load and after quantization. Returns the model (changed in place)."""
        self._decoder = None
        for name in linear_names(self.config):
            parent, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent), attr, make(name, self.get_submodule(name)))
        return self

    def tie_weights(self) -> None:
        """A float output projection takes the embedding's weight (a quantized one is the embedding's table
        instead: tinychat.linear.GroupEmbedding)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the float weights' (norms, embedding rows)."""
        return self.norm.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def setup_kv_cache(self, max_seq_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """Allocate each layer's KV cache once, on the device of the weights, in `dtype` (default: the weights'; on a
        CPU also float16 or bfloat16 below float32 weights, which the kernels convert as they read). A sliding
        layer's holds its window and WINDOW_SLACK rows more (a ring), where that is less than `max_seq_len`."""
        cfg = self.config
        if max_seq_len > cfg.context_length:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context length {cfg.context_length}")
        self._rope_rows(max_seq_len)
        self._decoder = None
        for layer in self.layers:
            window = layer.attn.window
            rows = min(max_seq_len, window + WINDOW_SLACK) if window else max_seq_len
            layer.attn.kv_cache = KVCache(batch, max_seq_len, rows, cfg.num_kv_heads, cfg.head_dim,
                                          dtype or self.dtype, self.device)

    def _apply(self, fn, recurse=True):
        self._decoder = None  # a move or cast makes new tensors: the decoder is built again over them
        return super()._apply(fn, recurse)

    def __getstate__(self):
        """A copy or pickle leaves the one-call decoder out (it holds this model's tensors, and cannot be copied): the
        copy builds its own on first use."""
        return {**self.__dict__, "_decoder": None}

    def one_call_decoder(self):
        """The CpuDecoder (tinychat.ops.cpu_decoder) over this model's tensors and KV caches, built on first use:
        the same kernels as forward's, in the same order, in one C++ call. None where it cannot run: without the
        compiled extension, KV caches, or the CPU, or with a linear it does not know (a RowStack). It is built again
        (or found impossible again) after swap_linears, setup_kv_cache, a move or a cast; code that replaces a module
        by other means must call one of those (no code of tinychat does)."""
        if self._decoder is None and self.max_seq_len is not None and self.device.type == "cpu":
            self._decoder = self._build_decoder()
        return None if self._decoder is False else self._decoder

    def _build_decoder(self):
        """A CpuDecoder over this model's tensors, or False where its linears or the build cannot make one (kept, so
        that forward does not walk the layers again at every step)."""
        cfg = self.config
        spec = [cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, int(cfg.hidden_act == "gelu_tanh"),
                int(cfg.qk_norm), int(cfg.post_norms)]
        tensors = [self.norm]
        for layer in self.layers:
            spec += [layer.attn.window, int(layer.local_rope)]
            tensors += [layer.attn_norm, layer.mlp_norm]
            tensors += [layer.post_attn_norm, layer.post_mlp_norm] if cfg.post_norms else []
            tensors += [layer.attn.q_norm, layer.attn.k_norm] if cfg.qk_norm else []
            tensors += [layer.attn.kv_cache.k, layer.attn.kv_cache.v]
            forms = [_op_form(m) for m in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w13, layer.mlp.w2)]
            if None in forms:
                return False
            for numbers, ts in forms:
                spec += numbers
                tensors += ts
        head = _op_form(self.lm_head)
        if head is None:
            return False
        decoder = ops.cpu_decoder(tensors + head[1], spec + head[0], cfg.rms_norm_eps, cfg.attn_scale)
        return False if decoder is None else decoder  # None: no compiled extension

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's input for tokens [...]: their embedding rows [..., C], scaled by config.embed_scale (Gemma;
        rounded to the activations' dtype first, as transformers does)."""
        x = self.embed(tokens)
        scale = self.config.embed_scale
        return x if scale == 1.0 else x * torch.tensor(scale).to(x.dtype).item()

    def rope_table(self, layer: DecoderLayer) -> torch.Tensor:
        """The rotary table [rows, D] of `layer` (one of self.layers): the sliding layers' own where they have one."""
        return self.cos_sin_local if layer.local_rope else self.cos_sin

    @property
    def max_seq_len(self) -> int | None:
        cache = self.layers[0].attn.kv_cache if self.layers else None
        return cache.max_seq_len if cache is not None else None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                last_only: bool = False, one_call: bool = True) -> torch.Tensor:
        """tokens [B, T] at positions [T] (int64, on the tokens' device) -> logits [B, T, V] ([B, 1, V] with last_only).

        With KV caches set up, token t's key and value go to the caches at position positions[t] and it attends to
        positions 0..positions[t] (the last `window` of them in a sliding layer); without, the tokens attend to each
        other alone, and positions must be 0..T-1 (the default). On the CPU with caches, the layers run in one C++
        call where the one-call decoder can run them (one_call_decoder; the same logits bit for bit); one_call=False
        runs them op by op, the reference. More than WINDOW_SLACK + 1 tokens run in pieces where a sliding layer's
        cache is a ring.
        """
        cfg = self.config
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)  # [T]
        if self.max_seq_len is None:  # no cache: positions are 0 .. T-1 (a shape, no sync)
            self._rope_rows(T)
        elif T > (piece := WINDOW_SLACK + 1) and any(layer.attn.kv_cache.k.shape[2] < self.max_seq_len
                                                       for layer in self.layers):
            outs = [self(tokens[:, i : i + piece], positions[i : i + piece], last_only, one_call)
                    for i in range(0, T, piece)]
            return outs[-1] if last_only else torch.cat(outs, dim=1)
        x, residual = self.embed_tokens(tokens), None  # [B, T, C]
        decoder = self.one_call_decoder() if one_call else None
        if decoder is not None:
            return decoder.forward(x, positions, self.cos_sin, self.cos_sin_local, last_only)
        eps = cfg.rms_norm_eps
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rope_table(layer))
        x = ops.rms_norm(x, self.norm, eps) if residual is None else ops.add_rms_norm(x, residual, self.norm, eps)[0]
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)
