"""From a full-precision model to a quantized checkpoint on disk: what `tinychat quantize` runs, and the cache that
gives `tinychat chat` its 4-bit default model.

4-bit: the source is streamed, one decoder layer at a time: a skeleton (embedding, final norm, output projection)
-> calibration blocks -> quantize_layers (AWQ, AWQ-GPTQ or RTN) reads each layer (`ModelSource.load_layer`) and hands
it, quantized, to awq_checkpoint_writer, which writes it as its own shard of an AutoAWQ GEMM checkpoint (tinychat,
transformers and vLLM load it): memory holds the skeleton, one layer and the calibration activations, whatever the
number of layers.
3-bit: the whole model is loaded -> quantize_model -> a float16 checkpoint of the dequantized weights (fake
quantization, for evaluation only).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tinychat.config import ModelConfig
from tinychat.errors import TinychatError
from tinychat.io.checkpoint import awq_checkpoint_writer, check_output_dir, save_fp16_checkpoint
from tinychat.io.loader import ModelSource, open_source, resolve_source
from tinychat.io.names import hf_tensor_shapes
from tinychat.pipeline.calib import load_calibration
from tinychat.quant.awq import DEFAULT_METHOD, METHODS, SEARCH_TOKENS, quantize_layers, quantize_model
from tinychat.quant.quantize import QuantConfig, apply_pseudo_quantized, auto_group_size

__all__ = ["QuantizeOptions", "cache_dir", "cached_quantized_model", "quantize_checkpoint",
           "search_dtype"]

FLOAT32_MAX_BYTES = 8 * 1024**3  # larger models' activations (and w3 models) are held in bfloat16 (search_dtype)
CACHE_FORMAT = 3  # bump when a change to the quantizer should invalidate cached checkpoints


@dataclass(frozen=True)
class QuantizeOptions:
    w_bit: int = 4
    group_size: int | None = None  # None: auto_group_size
    method: str = DEFAULT_METHOD  # one of tinychat.quant.awq.METHODS
    calib: str | None = None  # .txt / .jsonl path or a Hugging Face dataset name; None: the built-in corpus
    n_samples: int = 128  # calibration blocks
    seqlen: int | None = None  # tokens per calibration block; None: 512, or the model's context if shorter
    clip: bool = True
    duo_scaling: bool = False
    search_tokens: int | None = SEARCH_TOKENS
    quantized_inputs: bool = False  # each layer's search sees the previous layers quantized (AWQ: full precision)
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise TinychatError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.w_bit not in (3, 4):
            raise TinychatError(f"w_bit must be 4 (packed int4 checkpoint) or 3 (fake quantization), got {self.w_bit}")
        if self.group_size is not None and self.group_size <= 0:
            raise TinychatError(f"group_size must be > 0, got {self.group_size}")


def search_dtype(cfg: ModelConfig) -> str:
    """The dtype of what quantization holds of the model besides the layer it searches (fp32): the embedding, the
    calibration activations (the residual stream and each linear's inputs) and, for w3's in-memory path, the whole
    model: float32 up to FLOAT32_MAX_BYTES of weights, bfloat16 above (so that a 7B model held whole, 14 GB in
    bfloat16 plus a few GB of activations, fits 24 GiB)."""
    n_params = sum(math.prod(shape) for shape in hf_tensor_shapes(cfg).values())
    return "float32" if 4 * n_params <= FLOAT32_MAX_BYTES else "bfloat16"


def quantize_checkpoint(source: str | os.PathLike | ModelSource | None, out_dir,
                        opts: QuantizeOptions = QuantizeOptions(), *, overwrite: bool = False, progress: bool = True,
                        log=None) -> Path:
    """Quantize the model at `source` (a path, a hub id, an opened ModelSource; None: the default model) and write
    it to `out_dir` atomically.

    An unwritable or existing out_dir fails before the model loads; a bad calibration source and a group size
    that does not divide a linear (named) fail before the search starts. Nothing is left under out_dir unless
    the whole checkpoint was written.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = check_output_dir(out_dir, overwrite)
    src = open_source(source)
    check_output_dir(out, overwrite, source=src.path)  # and overwrite may not replace what it reads
    if src.quantized:
        raise TinychatError(f"{src.path}: the model is already quantized ({src.source_config['quantization_config']}); "
                            "quantize a full-precision model")
    dtype = search_dtype(src.config)
    stream = opts.w_bit == 4
    if stream:
        log(f"loading {src.path}'s embeddings ({dtype}); the decoder layers are read one at a time, in float32")
        loaded = src.load_skeleton(dtype)  # a GGUF's blocks dequantized: AWQ starts from float weights
    else:
        log(f"loading {src.path} ({dtype}; the search itself runs in float32, one layer at a time) ...")
        loaded = src.load(dtype=dtype, blocks=False)
    group_size = opts.group_size or auto_group_size(src.config)
    qcfg = QuantConfig(opts.w_bit, group_size)
    calib = None
    if opts.method != "rtn":
        seqlen = opts.seqlen or min(512, src.config.context_length)
        calib = load_calibration(opts.calib, loaded.tokenizer, opts.n_samples, seqlen, seed=opts.seed)
        where = opts.calib or "the built-in corpus"
        log(f"calibration: {calib.shape[0]} blocks of {calib.shape[1]} tokens from {where}")
    log(f"quantizing: {opts.method.upper()} w{opts.w_bit} g{group_size} on {opts.device}")
    settings = dict(method=opts.method, clip=opts.clip, duo_scaling=opts.duo_scaling, device=opts.device,
                    progress=progress, search_tokens=opts.search_tokens, quantized_inputs=opts.quantized_inputs)
    t0 = time.perf_counter()
    if stream:  # each layer written as it is finished; the checkpoint appears once all of it is written
        with awq_checkpoint_writer(loaded, qcfg, out, overwrite=overwrite) as write_layer:
            quantize_layers(loaded.model, lambda i: src.load_layer(i, device=opts.device), write_layer, calib, qcfg,
                            **settings)
            log(f"quantized in {time.perf_counter() - t0:.1f} s; writing the rest of {out}")
        return out
    qdict = quantize_model(loaded.model, calib, qcfg, **settings)
    log(f"quantized in {time.perf_counter() - t0:.1f} s; writing {out}")
    apply_pseudo_quantized(loaded.model, qdict, qcfg)
    note = {"method": opts.method, "bits": opts.w_bit, "group_size": group_size,
            "about": "weights are dequantized fake-quantized values, stored in float16 for evaluation"}
    return save_fp16_checkpoint(loaded, out, note=note, overwrite=overwrite)


def cache_dir() -> Path:
    """Where quantized-on-first-use models live: $TINYCHAT_CACHE, else $XDG_CACHE_HOME/tinychat, else
    ~/.cache/tinychat."""
    if os.environ.get("TINYCHAT_CACHE"):
        return Path(os.environ["TINYCHAT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tinychat"


def cached_quantized_model(source: str | os.PathLike | ModelSource | None = None,
                           opts: QuantizeOptions = QuantizeOptions(), *, progress: bool = True, log=None) -> Path:
    """The 4-bit AWQ checkpoint of `source` in the cache, made on first use (later calls return it at once);
    a source that is already quantized is returned as it is. `source` may be a ModelSource already opened.

    The cache key covers the source file or directory (path, size, modification time), the options and the
    quantizer's format version; a changed model or option gets a new entry. Writing is atomic, so an interrupted
    first use leaves no entry and the next call starts over.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if opts.w_bit != 4:
        raise TinychatError("the cache holds runnable 4-bit checkpoints only")
    src = source if isinstance(source, ModelSource) else None
    path = src.path if src is not None else resolve_source(source)
    if path.is_dir():  # a directory may already hold a quantized checkpoint (a GGUF file never is one)
        src = src or open_source(path)
        if src.quantized:
            return path
    path = path.resolve()
    stat = path.stat() if path.is_file() else (path / "config.json").stat()
    settings = sorted((k, v) for k, v in asdict(opts).items() if k != "device")  # same result on any device
    key = repr((CACHE_FORMAT, str(path), stat.st_size, stat.st_mtime_ns, settings))
    name = f"{path.stem}-{opts.method}-w{opts.w_bit}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    out = cache_dir() / name
    if (out / "config.json").exists():
        return out
    log(f"first use of {path.name} in 4 bits: quantizing it once with {opts.method.upper()} "
        f"(cached in {out}; pass --quant none for full precision)")
    try:
        return quantize_checkpoint(src or path, out, opts, progress=progress, log=log)
    except TinychatError:
        if (out / "config.json").exists():  # another process finished the same entry first
            return out
        raise
