"""The report of a `tinychat bench` result: text tables and a PNG plot (matplotlib, imported only for a plot)."""

from __future__ import annotations

import os
from pathlib import Path

from tinychat.errors import TinychatError


def format_table(columns: list[str], rows: list[list]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(columns))]

    def line(values):
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


_WEIGHTS = {"random": "random", "loaded": "as loaded", "gguf-blocks": "the GGUF's blocks as stored", "awq": "AWQ 4-bit",
            "rtn": "RTN 4-bit of the loaded weights"}


def format_report(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cut = result["truncated"]
    layers = (f"first {result['layers']} of {result['total_layers']} layers" if cut
              else f"{result['layers']} layers")
    threads = f"{m['threads']} thread{'s' * (m['threads'] != 1)}"
    head = [f"tinychat bench: {result['model']} ({result['source']}, {layers})",
            (f"{m['device_name']}, {threads}, torch {m['torch']}; warm-up excluded, median of {s['repeats']}; "
             f"decode: {s['decode_tokens']} greedy tokens after a prefill to the context length")]
    est = ["est. full tok/s"] if cut else []
    rows = []
    for r in result["results"]:
        for p in r["prefill"]:
            rows.append([r["dtype"], "prefill", p["prompt_len"], p["tok_s"], p["ttft_s"] * 1000, None]
                        + ([p["est_full_tok_s"]] if cut else []))
        for d in r["decode"]:
            rows.append([r["dtype"], "decode", d["ctx_len"], d["tok_s"], d["ms_per_token"], d["gb_s"]]
                        + ([d["est_full_tok_s"]] if cut else []))
    speed = format_table(["dtype", "phase", "tokens", "tok/s", "ms (TTFT | per token)", "GB/s", *est], rows)
    mb = 1e6
    size_rows = [[r["dtype"], _WEIGHTS[r["weights"]], r["model_bytes"] / mb, r["linear_bytes"] / mb,
                  r["peak_memory_bytes"] / mb] + ([r["full_model_bytes"] / mb] if cut else [])
                 for r in result["results"]]
    mem_kind = result["results"][0]["peak_memory_kind"]
    sizes = format_table(["dtype", "weights", "model MB", "linears MB", "peak memory MB",
                          *(["full model MB"] if cut else [])], size_rows)
    notes = [("tokens: prompt length (prefill) or context length (decode); GB/s = model bytes x decode tok/s; "
              f"peak memory: {mem_kind}")]
    if any(r["weights"] == "rtn" for r in result["results"]):
        notes.append("int4 (RTN): round-to-nearest 4-bit of the loaded weights, no AWQ search; the same layout and op, "
                     "so the same speed, as an AWQ checkpoint")
    if cut:
        notes.append(f"measured on {layers}; est. full: decode scaled by weight bytes, prefill by layer count "
                     "(estimates, not measurements)")
    return "\n".join([*head, "", speed, "", sizes, "", *notes])


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise TinychatError("--plot needs matplotlib: pip install matplotlib (or the tinychat[bench] extra)") from None
    return matplotlib


def write_plot(result: dict, path: str | os.PathLike) -> Path:
    """Decode tok/s against context length and prefill tok/s against prompt length, one line per dtype (PNG)."""
    _matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_dec, ax_pre = fig.subplots(1, 2)
    for r in result["results"]:
        label = f"{r['dtype']} ({r['weights']})"
        ax_dec.plot([d["ctx_len"] for d in r["decode"]], [d["tok_s"] for d in r["decode"]], marker="o", label=label)
        ax_pre.plot([p["prompt_len"] for p in r["prefill"]], [p["tok_s"] for p in r["prefill"]], marker="o",
                    label=label)
    settings = result["settings"]
    for ax, title, xlabel, lens in ((ax_dec, "decode", "context length (tokens)", settings["ctx_lens"]),
                                    (ax_pre, "prefill", "prompt length (tokens)", settings["prompt_lens"])):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, labels=[str(n) for n in lens])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tok/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    cut = f", first {result['layers']} of {result['total_layers']} layers" if result["truncated"] else ""
    fig.suptitle(f"{result['model']}{cut} on {result['machine']['device_name']} "
                 f"({result['machine']['threads']} thread{'s' * (result['machine']['threads'] != 1)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path
