"""`python -m packkv.eval SUBCOMMAND`: how much a KV cache compresses real KV, and what that costs.

    ppl          perplexity of a text, every scored token read through the cache under test
    kl           KL divergence of the next-token distribution from the dense cache's, top-1 agreement
    passkey      retrieval of a number hidden at several depths of long filler text, accuracy in %
    compression  bits per element of real KV under packkv's codec, every byte counted
    sweep        compression ratio against perplexity increase and KL: packkv's bounds and the quant baseline
    tune         packkv's parameters of highest compression within a perplexity budget, saved as a profile
    layers       each layer's KL when it alone is compressed; per-layer bounds from it, saved as a profile

How a text is scored (ppl, kl, sweep, tune). The text's first --windows x --ctx tokens make --windows
windows of --ctx tokens; each runs through a fresh cache. Its first --prefill tokens go in as a prompt (in
prefill chunks, so the cache compresses every block that leaves its fp16 window), the rest in chunks of
--chunk tokens through model.forward(all_logits=True), each position's logits scoring the next token.
A chunk attends to its own tokens and to the fp16 window exactly, to everything older through the
compressed blocks, and the blocks that leave the window are compressed after each chunk, as in decode:
so the scored tokens read the compressed blocks. The one difference from decoding token by token
(--chunk 1, exact but slow on a CPU) is that the later tokens of a chunk see up to chunk - 1 more fp16
neighbours; chunks are at most the fp16 window (--kv-window), so every scored token sees at least the
window in fp16, as in decode, and at most window + block + chunk - 2 tokens instead of window + block - 1
(+ DEFER_STEPS while a decode step's blocks are being encoded: chunks of more than one token commit theirs
at once).
The default chunk, 32, is the quant baseline's block; both families get the same chunks.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from packkv import codec
from packkv.cache import CacheShape, ChannelScales, DenseCache, LayerScales
from packkv.errors import PackkvError
from packkv.generate import PREFILL_CHUNK, Engine, SamplingParams, generate
from packkv.options import (DEFAULT_WINDOW, add_cache_arguments, cache_params, profile_layer_scales, profile_scales,
                            read_profile, save_profile, sink_bounds, sink_tokens_for, weights_folder)
from packkv.quant import QUANT_BITS, QUANT_GROUPS, QuantParams

KIVI_SETTINGS = [(2, 32), (2, 64), (4, 32), (4, 64)]   # (bits, group): KIVI's common configurations


def progress(**kwargs):
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


# ---- real text and KV -----------------------------------------------------------------------------

def check_text(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PackkvError(f"--text file not found: {path}")
    return path


def text_tokens(engine: Engine, path, tokens: int) -> list[int]:
    """The first `tokens` tokens of a text file (read only as far as needed)."""
    path = check_text(path)
    chars = tokens * 8
    while True:
        text = path.read_text(encoding="utf-8", errors="replace")[:chars]
        ids = engine.tokenizer.encode(text)
        if len(ids) >= tokens or len(text) < chars:
            break
        chars *= 2
    if len(ids) < tokens:
        raise PackkvError(f"{path} holds {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def collect_kv(engine: Engine, ids: list[int]):
    """Run ids through the model with a dense cache: K (post-RoPE) and V of every layer as fp16,
    [layers, kv_heads, tokens, head_dim] each."""
    cache = engine.new_cache("dense", batch=1, tokens=len(ids))
    for start in progress(iterable=range(0, len(ids), PREFILL_CHUNK), desc="model forward", unit="chunk"):
        engine.model.forward(np.asarray([ids[start:start + PREFILL_CHUNK]]), cache)
    to_numpy = engine.backend.to_numpy
    return (to_numpy(cache.k[:, 0, :, :len(ids)]).astype(np.float16),
            to_numpy(cache.v[:, 0, :, :len(ids)]).astype(np.float16))


def as_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """[layers, kv_heads, tokens, D] -> [layers * n_blocks, kv_heads, block, D] (whole blocks only)."""
    L, H, T, D = x.shape
    n = T // block
    return x[:, :, :n * block].reshape(L, H, n, block, D).transpose(0, 2, 1, 3, 4).reshape(L * n, H, block, D)


# ---- the cache under test -------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheSpec:
    """A cache kind and the keyword arguments Engine.new_cache passes it (params=..., window=...)."""

    kind: str
    params: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args) -> "CacheSpec":
        return cls(args.cache, cache_params(args))

    def describe(self) -> dict:
        """The JSON form: kind, the kind's parameters, window."""
        p = self.params.get("params")
        return {"cache": self.kind, **(vars(p) if p is not None else {}),
                **({"window": self.params["window"]} if "window" in self.params else {}),
                **({"channel_scales": self.params.get("scales") is not None,
                    "sink": self.params.get("sink"),
                    **({"sink_tokens": self.params["sink_tokens"]} if self.params.get("sink_tokens") else {}),
                    "layer_scales": None if self.params.get("layer_scales") is None
                    else self.params["layer_scales"].as_json()} if self.kind == "packkv" else {})}

    def label(self) -> str:
        d = self.describe()
        if self.kind == "packkv":
            return (f"packkv k{d['rel_k']:g} v{d['rel_v']:g} {d['granularity']} {d['repack']}"
                    + (" scaled" if d["channel_scales"] else "")
                    + (" sink {:g},{:g}".format(*d["sink"]) if d["sink"] else "")
                    + (" x{} tokens".format(d["sink_tokens"]) if d.get("sink_tokens") else "")
                    + (" per-layer" if d["layer_scales"] else ""))
        if self.kind == "quant":
            return f"quant {d['bits']}-bit g{d['group']}"
        return self.kind


DENSE = CacheSpec("dense")


# ---- the metrics ----------------------------------------------------------------------------------

def log_softmax(xp, logits):
    """fp32 logits [T, vocab] -> log-probabilities."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood) in nats."""
    return float(np.exp(nll_sum / tokens))


def kl_sum(xp, ref_log_probs, log_probs) -> float:
    """Sum over rows of KL(ref || test) = sum_v p_ref (log p_ref - log p_test), nats."""
    return float((xp.exp(ref_log_probs) * (ref_log_probs - log_probs)).sum())


def top1_matches(ref_log_probs, log_probs) -> int:
    return int((ref_log_probs.argmax(axis=-1) == log_probs.argmax(axis=-1)).sum())


def ppl_increase_pct(ppl: float, dense_ppl: float) -> float:
    return 100.0 * (ppl / dense_ppl - 1.0)


@dataclass
class Tally:
    """Sums over the scored tokens of every window, and the bytes each window's cache held at its end."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    fp16_bytes: int = 0        # the committed tokens as fp16 K and V
    used_bytes: int = 0        # every byte the cache held for them: blocks, offset table, fp16 window
    block_fp16_bytes: int = 0  # the compressed tokens alone, as fp16 ...
    block_bytes: int = 0       # ... and as stored: records and their offset-table entries

    def add_chunk(self, xp, log_probs, targets, reference=None) -> None:
        rows = xp.arange(len(targets))
        self.nll -= float(log_probs[rows, xp.asarray(targets)].sum())
        self.tokens += len(targets)
        if reference is not None:
            self.kl += kl_sum(xp, reference, log_probs)
            self.top1 += top1_matches(reference, log_probs)

    def add_cache(self, cache) -> None:
        self.fp16_bytes += cache.fp16_bytes()
        self.used_bytes += cache.bytes_used()
        if hasattr(cache, "arena"):    # a BlockCache
            blocks = int(cache.n_blocks.sum())
            self.block_fp16_bytes += blocks * cache.block * cache.token_fp16_bytes()
            self.block_bytes += cache.arena.used + blocks * cache.shape.layers * 8

    def result(self, with_reference: bool) -> dict:
        out = {"ppl": perplexity(self.nll, self.tokens), "nll": self.nll / self.tokens, "tokens": self.tokens,
               "compression_ratio": self.fp16_bytes / self.used_bytes,
               "block_compression_ratio": self.block_fp16_bytes / self.block_bytes if self.block_bytes else None}
        if with_reference:
            out.update(kl=self.kl / self.tokens, top1_agreement=self.top1 / self.tokens)
        return out


# ---- windows of text, chunk by chunk --------------------------------------------------------------

@dataclass(frozen=True)
class Windows:
    ids: list            # [windows][ctx] token ids
    prefill: int
    chunk: int
    spread: bool = False  # windows evenly spaced through the text (--spread), else consecutive from its start

    @property
    def scored(self) -> int:
        return sum(len(w) - self.prefill for w in self.ids)

    def describe(self) -> dict:
        return {"windows": len(self.ids), "ctx": len(self.ids[0]), "prefill": self.prefill, "chunk": self.chunk,
                "tokens": self.scored, **({"spread": True} if self.spread else {})}


def check_window_args(args) -> None:
    """What can be refused before the model loads."""
    check_text(args.text)
    if args.windows < 1:
        raise PackkvError(f"--windows must be >= 1, not {args.windows}")
    if not 1 <= args.prefill < args.ctx:
        raise PackkvError(f"--prefill must be in 1..{args.ctx - 1} (--ctx {args.ctx}), not {args.prefill}")
    if args.chunk < 1:
        raise PackkvError(f"--chunk must be >= 1, not {args.chunk}")


def text_windows(engine: Engine, args, text=None) -> Windows:
    """--windows consecutive windows of --ctx tokens from the start of the text; with --spread, windows
    evenly spaced through it instead (spread_windows)."""
    if args.ctx > engine.max_context:
        raise PackkvError(f"--ctx {args.ctx} is longer than the model's context of {engine.max_context} tokens")
    if getattr(args, "spread", False):
        return Windows(spread_windows(engine, text or args.text, args.windows, args.ctx), args.prefill, args.chunk,
                       spread=True)
    ids = text_tokens(engine, text or args.text, args.windows * args.ctx)
    return Windows([ids[i:i + args.ctx] for i in range(0, len(ids), args.ctx)], args.prefill, args.chunk)


def spread_windows(engine: Engine, path, windows: int, ctx: int) -> list[list[int]]:
    """`windows` windows of `ctx` tokens, the i-th from the first line that starts at or after character
    i/windows of the text: a sample of the whole text (a corpus of many genres, as brown.txt, in order)
    rather than of its beginning. The first window is the first of the consecutive ones."""
    text = check_text(path).read_text(encoding="utf-8", errors="replace")
    out = []
    for i in range(windows):
        at = len(text) * i // windows
        if at:
            line = text.find("\n", at - 1)
            at = len(text) if line < 0 else line + 1
        chars, ids = ctx * 8, []
        while True:
            ids = engine.tokenizer.encode(text[at:at + chars])
            if len(ids) >= ctx or at + chars >= len(text):
                break
            chars *= 2
        if len(ids) < ctx:
            raise PackkvError(f"{path}: window {i + 1} of {windows} from character {at} holds {len(ids)} tokens, "
                              f"fewer than --ctx {ctx} (fewer --windows, or a longer text)")
        out.append(ids[:ctx])
    return out


def window_log_probs(engine: Engine, ids: list[int], cache, prefill: int, chunk: int):
    """Feed one window through `cache`; yield (log-probabilities [T, vocab] on the device, target ids [T])
    for the tokens after the first `prefill`, chunk by chunk (see the module's docstring)."""
    forward, xp = engine.model.forward, engine.backend.xp
    for start in range(0, prefill - 1, PREFILL_CHUNK):
        forward(np.asarray([ids[start:min(start + PREFILL_CHUNK, prefill - 1)]]), cache)
    for start in range(prefill - 1, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        logits = forward(np.asarray([ids[start:end]]), cache, all_logits=True)[0]
        yield log_softmax(xp, logits), ids[start + 1:end + 1]


def score(engine: Engine, windows: Windows, spec: CacheSpec, reference=None, keep: bool = False):
    """Run every window through a fresh cache of `spec`. With `reference` (the log-probabilities a
    keep=True run returned: one [scored, vocab] array per window), also KL and top-1 agreement against
    it, position by position. Returns (result dict, kept log-probabilities or None)."""
    xp, tally, kept = engine.backend.xp, Tally(), []
    window = spec.params.get("window")
    chunk = windows.chunk if window is None else max(1, min(windows.chunk, window))
    bar = progress(total=windows.scored, desc=spec.label(), unit="tok", leave=False)
    for w, ids in enumerate(windows.ids):
        cache = engine.new_cache(spec.kind, batch=1, tokens=len(ids), **spec.params)
        row, chunks = 0, []
        for log_probs, targets in window_log_probs(engine, ids, cache, windows.prefill, chunk):
            ref = None if reference is None else reference[w][row:row + len(targets)]
            tally.add_chunk(xp, log_probs, targets, ref)
            chunks += [log_probs] if keep else []
            row += len(targets)
            bar.update(len(targets))
        tally.add_cache(cache)
        if keep:
            kept.append(xp.concatenate(chunks))
    bar.close()
    return {**tally.result(reference is not None), **spec.describe(), "chunk": chunk}, (kept if keep else None)


def score_against_dense(engine: Engine, windows: Windows, specs: list[CacheSpec], desc: str = "caches"):
    """The dense cache once, then each spec with KL and top-1 agreement against it and its perplexity
    increase. Returns (dense result, [results])."""
    dense, reference = score(engine, windows, DENSE, keep=True)
    results = []
    for spec in progress(iterable=specs, desc=desc, unit="cache"):
        result, _ = score(engine, windows, spec, reference)
        results.append({**result, "ppl_increase_pct": ppl_increase_pct(result["ppl"], dense["ppl"])})
    return dense, results


# ---- channel scales ---------------------------------------------------------------------------------

# s_k = rms(q)^-K_QUERY_POWER per channel: the error a K channel adds to q.k grows with that channel's
# query, so channels of large queries get finer steps (at power 1 every channel would add the same score
# error, the rate-distortion optimum at high rate, but the token-wise bound then spends its levels on
# channels it used to store in few bits; 0.5 gave ~20% less attention-output error at equal bits on brown.txt).
# s_v = max|v|^V_ABS_POWER per channel: a token's range is set by its largest channels; dividing by their
# size spreads the levels evenly over channels (~14% less error at equal bits). Measured offline on
# SmolLM2's K, V and q (bench/results/accuracy.json records the end-to-end effect).
K_QUERY_POWER, V_ABS_POWER = 0.5, 1.0


class ChannelStatsCache(DenseCache):
    """A dense cache that also sums q^2 per (layer, KV head, channel) over the query heads of each KV
    head, and keeps max |v| per (layer, KV head, channel): what channel scales are calibrated from."""

    def __init__(self, shape: CacheShape, backend, heads: int):
        super().__init__(shape, backend)
        dims = (shape.layers, shape.kv_heads, shape.head_dim)
        self.group = heads // shape.kv_heads
        self.q_square, self.queries = np.zeros(dims), 0
        self.v_abs = np.zeros(dims)

    def append(self, layer: int, k, v) -> None:
        super().append(layer, k, v)
        v_abs = np.abs(self.backend.to_numpy(v).astype(np.float32)).max(axis=(0, 2))
        self.v_abs[layer] = np.maximum(self.v_abs[layer], v_abs)

    def attend(self, layer: int, q):
        B, heads, T, D = q.shape
        q32 = self.backend.to_numpy(q).astype(np.float32).reshape(B, self.shape.kv_heads, self.group, T, D)
        self.q_square[layer] += (q32 ** 2).sum(axis=(0, 2, 3))
        self.queries += B * self.group * T if layer == 0 else 0
        return super().attend(layer, q)

    def scales(self) -> ChannelScales:
        q_rms = np.sqrt(self.q_square / self.queries)
        return ChannelScales(unit_geometric_mean(q_rms ** -K_QUERY_POWER), unit_geometric_mean(self.v_abs ** V_ABS_POWER))


def unit_geometric_mean(s: np.ndarray) -> np.ndarray:
    """s [..., D] (floored away from 0) divided by its geometric mean over D: a relative bound ignores a
    head's overall scale, and this keeps the stored values about as large as the originals (fp16 range)."""
    s = np.maximum(s, 1e-6 * s.max(axis=-1, keepdims=True) + 1e-30)
    return s / np.exp(np.log(s).mean(axis=-1, keepdims=True))


def calibrate_scales(engine: Engine, windows: Windows) -> ChannelScales:
    """Channel scales from the dense model's q and v over the windows' tokens (the calibration text)."""
    c = engine.config
    stats = None
    for ids in progress(iterable=windows.ids, desc="channel scales", unit="window"):
        shape = CacheShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 1, len(ids))
        window_stats = ChannelStatsCache(shape, engine.backend, c.num_attention_heads)
        if stats is not None:   # one running tally over every window
            window_stats.q_square, window_stats.queries, window_stats.v_abs = stats.q_square, stats.queries, stats.v_abs
        for start in range(0, len(ids), PREFILL_CHUNK):
            engine.model.forward(np.asarray([ids[start:start + PREFILL_CHUNK]]), window_stats)
        stats = window_stats
    return stats.scales()


def scales_json(scales: ChannelScales) -> dict:
    return {"k": scales.k.tolist(), "v": scales.v.tolist(),   # float32 values, exactly
            "k_query_power": K_QUERY_POWER, "v_abs_power": V_ABS_POWER}


# ---- passkey retrieval ----------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ANSWER_TOKENS = 8


def passkey_prompt(engine: Engine, filler: list[int], length: int, depth: float, key: int) -> list[int]:
    """Token ids of a prompt that, with ANSWER_TOKENS more, makes `length` tokens: the intro, filler
    with the needle at `depth` (0: first, 1: last), the question."""
    encode = engine.tokenizer.encode
    head = encode(PASSKEY_INTRO)
    needle = encode(PASSKEY_NEEDLE.format(key=key), add_special_tokens=False)
    question = encode(PASSKEY_QUESTION, add_special_tokens=False)
    room = length - ANSWER_TOKENS - len(head) - len(needle) - len(question)
    if room < 0:
        raise PackkvError(f"passkey length {length} is too short for the prompt ({length - room} tokens)")
    filler = (filler * (room // len(filler) + 1))[:room]
    at = int(round(depth * room))
    return head + filler[:at] + needle + filler[at:] + question


def passkey_trial(engine: Engine, spec: CacheSpec, prompt: list[int], key: int) -> dict:
    """Greedy-decode ANSWER_TOKENS tokens; correct when the first number in them is the key."""
    gen = generate(engine, prompt, ANSWER_TOKENS, SamplingParams(), spec.kind, show_progress=False, **spec.params)
    found = re.search(r"\d+", gen.text)
    return {"answer": gen.text, "correct": bool(found) and found.group() == str(key),
            "compression_ratio": gen.cache_stats["compression_ratio"]}


# ---- compression ratio against perplexity increase ------------------------------------------------

def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(increase, ratio) points -> the best trade-offs: sorted by increase, each ratio above all before."""
    best = []
    for x, ratio in sorted(points):
        if not best or ratio > best[-1][1]:
            best.append((x, ratio))
    return best


def ratio_at(points: list[tuple[float, float]], x: float) -> float | None:
    """A family's compression ratio at a perplexity increase of x: linear interpolation along its
    frontier; the frontier's last ratio past its end; None below its first point (not reached)."""
    f = frontier(points)
    if not f or x < f[0][0]:
        return None
    for (x0, r0), (x1, r1) in zip(f, f[1:]):
        if x0 <= x < x1:
            return r0 + (x - x0) / (x1 - x0) * (r1 - r0)
    return f[-1][1]


def compare_families(points: list[dict], metric: str = "ppl_increase_pct", fixed: tuple = ("1pct", 1.0)) -> dict:
    """packkv's compression ratio against the quant baseline's at equal `metric` (perplexity increase in %,
    or "kl"): at 4-bit quant's value (KIVI's group 32, else the smallest measured group) and at
    fixed = (name, value). Ratios are of the compressed blocks (records and offset table), what a long
    context approaches."""
    def curve(kind):
        return [(p[metric], p["block_compression_ratio"]) for p in points if p["cache"] == kind]

    four = sorted((p for p in points if p["cache"] == "quant" and p["bits"] == 4), key=lambda p: p["group"])
    four = [p for p in four if p["group"] == 32] or four
    at = ({"quant_4bit": four[0][metric]} if four else {}) | {fixed[0]: fixed[1]}
    out = {}
    for name, x in at.items():
        packkv, quant = ratio_at(curve("packkv"), x), ratio_at(curve("quant"), x)
        out[name] = {metric: x, "packkv_ratio": packkv, "quant_ratio": quant,
                     "packkv_over_quant": packkv / quant if packkv and quant else None}
    return out


def comparisons(points: list[dict]) -> dict:
    """At equal perplexity increase (4-bit quant's, 1%) and, less noisy, at equal KL (4-bit quant's, 0.02)."""
    return {"comparison": compare_families(points),
            "comparison_kl": compare_families(points, "kl", ("kl_0.02", 0.02))}


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = result["points"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, xlabel in ((axes[0], "ppl_increase_pct", "perplexity increase over the dense cache (%)"),
                               (axes[1], "kl", "mean KL to the dense cache (nats)")):
        for kind, color in (("packkv", "tab:blue"), ("quant", "tab:orange")):
            pts = [p for p in points if p["cache"] == kind]
            if not pts:
                continue
            for granularity, marker in (("token-layer", "o"), ("token-head", "s"), (None, "^")):
                sel = [p for p in pts if p.get("granularity") == granularity]
                ax.scatter([p[metric] for p in sel], [p["block_compression_ratio"] for p in sel], color=color,
                           marker=marker, label=f"{kind} {granularity or ''}".strip() if sel else None)
            f = frontier([(p[metric], p["block_compression_ratio"]) for p in pts])
            ax.plot(*zip(*f), color=color, lw=1)
            for p in pts:
                if kind == "quant":
                    ax.annotate(f"{p['bits']}b g{p['group']}", (p[metric], p["block_compression_ratio"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
        key = "comparison" if metric == "ppl_increase_pct" else "comparison_kl"
        for x in (c[metric] for c in result.get(key, {}).values()):
            ax.axvline(x, color="gray", ls=":", lw=1)
        if metric == "kl":
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("compression ratio vs fp16 (blocks, every byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {Path(result['text']).name}: {result['windows']['windows']} x "
                 f"{result['windows']['ctx']} tokens, {result['windows']['tokens']} scored")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- sizes ----------------------------------------------------------------------------------------

def measure_compression(k: np.ndarray, v: np.ndarray, params: codec.CodecParams) -> dict:
    """Compress whole blocks of k, v [layers, kv_heads, tokens, D]; every byte of the records counted.
    The record header and padding, shared by K and V, are split half and half between them."""
    kb, vb = as_blocks(k, params.block), as_blocks(v, params.block)
    buffer, offsets, _ = codec.encode_blocks(kb, vb, params)
    parts = codec.byte_breakdown(buffer, offsets)
    assert sum(parts.values()) == buffer.size
    shared = (parts["record_header"] + parts["padding"]) / 2
    k_bytes = shared + sum(n for key, n in parts.items() if key.startswith("k_"))
    v_bytes = shared + sum(n for key, n in parts.items() if key.startswith("v_"))
    table_bytes = 8 * kb.shape[0]               # the cache's block-offset table: one int64 per record
    elements = kb.size                          # per K (and per V)
    fp16_bytes = 2 * 2 * elements
    kv_bytes = buffer.size + table_bytes
    return {
        "fp16_bytes": fp16_bytes, "kv_bytes": kv_bytes, "compression_ratio": fp16_bytes / kv_bytes,
        "bits_per_element": {"k": 8 * (k_bytes + table_bytes / 2) / elements,
                             "v": 8 * (v_bytes + table_bytes / 2) / elements},
        "bytes": {**parts, "offset_table": table_bytes},
        "entropy_bits": zero_order_entropy(kb, vb, params),
        "params": {**vars(params)}, "tokens": kb.shape[0] // k.shape[0] * params.block,
    }


def zero_order_entropy(kb: np.ndarray, vb: np.ndarray, params: codec.CodecParams) -> dict:
    """Shannon entropy (bits) of the quantized levels, per K and V: what an ideal symbol coder would
    spend on the payload alone, headers and per-token parameters not included."""
    levels, _ = codec.quantize_blocks(kb, vb, params)

    def entropy(x):
        counts = np.bincount(x.ravel().astype(np.int64))
        p = counts[counts > 0] / x.size
        return float(-(p * np.log2(p)).sum())

    return {"k": entropy(levels.k_levels), "v": entropy(levels.v_levels)}


def kivi_bits_per_element(bits: int, group: int) -> float:
    """Plain group quantization as KIVI stores it: `bits` per element plus an fp16 scale and an fp16 zero
    per group of `group` elements (K: a channel over `group` tokens; V: a token over `group` channels)."""
    return bits + 2 * 16 / group


# ---- the subcommands ------------------------------------------------------------------------------

def load(args) -> Engine:
    engine = Engine(args.weights, args.device)
    args.model = weights_folder(args.weights).name
    return engine


def run_header(args, engine: Engine) -> dict:
    return {"model": args.model, "text": None if args.text is None else str(args.text),
            "device": engine.backend.device_name, "command": "python -m packkv.eval " + shlex.join(args.argv)}


def prepare(args) -> tuple[CacheSpec, Engine, Windows]:
    """The cache under test, the model, the text's windows: what ppl and kl share (checked in that order,
    so bad flags fail before the model loads)."""
    spec = CacheSpec.from_args(args)
    check_window_args(args)
    engine = load(args)
    return spec, engine, text_windows(engine, args)


def grid_base(args) -> tuple[dict, int]:
    """The packkv parameters a sweep or tune does not vary (--kv-pack, --kv-block, the codec's
    defaults; never a profile), and the fp16 window."""
    base = {"pack": args.kv_pack or codec.CodecParams.pack, "block": args.kv_block or codec.CodecParams.block}
    return base, DEFAULT_WINDOW if args.kv_window is None else args.kv_window


def ppl_command(args) -> dict:
    spec, engine, windows = prepare(args)
    result, _ = score(engine, windows, spec)
    print(f"{spec.label()}: perplexity {result['ppl']:.4f} over {result['tokens']} tokens, "
          f"{result['compression_ratio']:.2f}x vs fp16 (whole cache at {windows.describe()['ctx']} tokens)"
          + (f", {result['block_compression_ratio']:.2f}x in the compressed blocks"
             if result["block_compression_ratio"] else ""))
    return {**run_header(args, engine), **result, "windows": windows.describe()}


def kl_command(args) -> dict:
    spec, engine, windows = prepare(args)
    dense, (result,) = score_against_dense(engine, windows, [spec])
    print(f"{spec.label()}: KL {result['kl']:.5f} nats, top-1 agreement {100 * result['top1_agreement']:.2f}%, "
          f"perplexity {result['ppl']:.4f} vs dense {dense['ppl']:.4f} ({result['ppl_increase_pct']:+.3f}%)")
    return {**run_header(args, engine), **result, "dense_ppl": dense["ppl"], "windows": windows.describe()}


def passkey_command(args) -> dict:
    spec = CacheSpec.from_args(args)
    lengths, depths = parse_list(args.lengths, int, "--lengths"), parse_list(args.depths, float, "--depths")
    if args.text:
        check_text(args.text)
    if any(not 0 <= d <= 1 for d in depths):
        raise PackkvError(f"--depths must be in [0, 1], not {args.depths}")
    engine = load(args)
    if max(lengths) > engine.max_context:
        raise PackkvError(f"--lengths: {max(lengths)} tokens is longer than the model's context of "
                          f"{engine.max_context}")
    filler = (text_tokens(engine, args.text, max(lengths)) if args.text
              else engine.tokenizer.encode(PASSKEY_FILLER, add_special_tokens=False))
    rng = np.random.default_rng(args.seed)
    trials = [{"length": n, "depth": d, "key": int(rng.integers(10000, 100000))} for n in lengths for d in depths]
    prompts = [passkey_prompt(engine, filler, t["length"], t["depth"], t["key"]) for t in trials]
    for t, prompt in progress(iterable=list(zip(trials, prompts)), desc=f"passkey {spec.label()}", unit="trial"):
        t.update(prompt_tokens=len(prompt), **passkey_trial(engine, spec, prompt, t["key"]))
    by_length = {str(n): 100.0 * np.mean([t["correct"] for t in trials if t["length"] == n]) for n in lengths}
    accuracy = 100.0 * np.mean([t["correct"] for t in trials])
    print(f"{spec.label()}: passkey accuracy {accuracy:.1f}% ("
          + ", ".join(f"{n}: {a:.0f}%" for n, a in by_length.items()) + ")")
    return {**run_header(args, engine), "accuracy": accuracy, "by_length": by_length, **spec.describe(),
            "filler": args.text or "repeated sentences", "trials": trials}


def rel_pairs(args) -> list[tuple[float, float]]:
    """--pairs rk:rv,... as given, else the grid --rel-k x --rel-v."""
    if args.pairs:
        pairs = [pair.split(":") for pair in parse_list(args.pairs, str, "--pairs")]
        try:
            if any(len(p) != 2 for p in pairs):
                raise ValueError
            return [(float(k), float(v)) for k, v in pairs]
        except ValueError:
            raise PackkvError(f"--pairs: cannot read {args.pairs!r} as rel_k:rel_v,rel_k:rel_v,...") from None
    return [(k, v) for k in parse_list(args.rel_k, float, "--rel-k") for v in parse_list(args.rel_v, float, "--rel-v")]


def sweep_specs(args) -> list[CacheSpec]:
    """packkv over (rel_k, rel_v) x granularity x repack, and quant over bits x group."""
    base, window = grid_base(args)
    specs = []
    try:
        for granularity in parse_list(args.granularities, str, "--granularities"):
            for repack in parse_list(args.repacks, str, "--repacks"):
                for rel_k, rel_v in rel_pairs(args):
                    params = codec.CodecParams(rel_k, rel_v, granularity, repack, **base)
                    sink = sink_bounds(args.kv_sink, None)
                    sink_tokens = sink_tokens_for(args.kv_sink_tokens, None, sink)
                    for scales in sweep_scales(args):
                        specs.append(CacheSpec("packkv", {"params": params, "window": window,
                                                          **({"scales": scales} if scales else {}),
                                                          **({"sink": sink} if sink else {}),
                                                          **({"sink_tokens": sink_tokens} if sink_tokens else {})}))
        for bits in parse_list(args.bits, int, "--bits", allow_empty=True):
            for group in parse_list(args.groups, int, "--groups"):
                specs.append(CacheSpec("quant", {"params": QuantParams(bits, group), "window": window}))
    except ValueError as exc:
        raise PackkvError(f"sweep: {exc}") from exc
    return specs


def sweep_scales(args) -> list:
    """The channel scales each packkv point of a sweep runs with: none, and --scales-from's if given."""
    if not args.scales_from:
        return [None]
    scales = profile_scales(read_profile(Path(args.scales_from)))
    if scales is None:
        raise PackkvError(f"--scales-from {args.scales_from}: the profile has no channel scales")
    return [None, scales]


def sweep_command(args) -> dict:
    specs = sweep_specs(args)
    check_window_args(args)
    engine = load(args)
    channels = engine.config.num_key_value_heads * engine.config.head_dim
    skipped = [s.label() for s in specs if s.kind == "quant" and channels % s.params["params"].group]
    if skipped:
        print(f"sweep: skipping {', '.join(skipped)}: groups that do not tile the {channels} channels",
              file=sys.stderr)
    specs = [s for s in specs if s.label() not in skipped]
    windows = text_windows(engine, args)
    dense, points = score_against_dense(engine, windows, specs, desc="sweep")
    result = {**run_header(args, engine), "windows": windows.describe(), "dense": dense, "points": points,
              **comparisons(points)}
    for key, unit in (("comparison", "% perplexity"), ("comparison_kl", " nats KL")):
        for name, c in result[key].items():
            x = c["ppl_increase_pct" if key == "comparison" else "kl"]
            print(f"at {x:+.4g}{unit} ({name}): packkv {fmt(c['packkv_ratio'])}x, quant {fmt(c['quant_ratio'])}x, "
                  f"packkv/quant {fmt(c['packkv_over_quant'])}")
    if args.plot:
        plot_sweep(result, Path(args.plot))
    return result


def tune_command(args) -> dict:
    """The highest block compression ratio within the budget, found along the pass/fail boundary of the
    rel_k x rel_v grid (a staircase walk from (smallest rel_k, largest rel_v): the error grows with either
    bound, so each step either passes and moves to the next rel_k, or fails and moves to the next
    smaller rel_v), per granularity: at most len(rel_k) + len(rel_v) evaluations each.

    With --min-ratio R the objective turns round: the lowest KL among the points whose block compression
    ratio is at least R (and whose perplexity increase, and KL if --budget-kl, stay within budget). The
    walk follows the ratio's boundary instead (the ratio grows with either bound: a point at R or more
    moves to the next smaller rel_v, one below R to the next rel_k), so for each rel_k it reaches the
    smallest rel_v that still gives R, where that rel_k's KL is lowest; the same number of evaluations."""
    if not args.budget_ppl > 0:
        raise PackkvError(f"--budget-ppl must be > 0 (percent), not {args.budget_ppl}")
    if args.budget_kl is not None and not args.budget_kl > 0:
        raise PackkvError(f"--budget-kl must be > 0 (nats), not {args.budget_kl}")
    floor = args.min_ratio
    if floor is not None and not floor > 0:
        raise PackkvError(f"--min-ratio must be > 0 (a compression ratio), not {floor}")
    rel_k = sorted(parse_list(args.rel_k, float, "--rel-k"))
    rel_v = sorted(parse_list(args.rel_v, float, "--rel-v"))
    granularities = parse_list(args.granularities, str, "--granularities")
    base, window = grid_base(args)
    base["repack"] = args.kv_repack or codec.CodecParams.repack
    try:
        for rk in rel_k + rel_v:
            codec.CodecParams(rel_k=rk, **base)
    except ValueError as exc:
        raise PackkvError(f"tune: {exc}") from exc
    check_window_args(args)
    engine = load(args)
    windows = text_windows(engine, args)
    scales = calibrate_scales(engine, windows) if args.channel_scales == "on" else None
    sink = sink_bounds(args.kv_sink, None)      # --kv-sink: the first blocks' bounds, tuned around, saved
    sink_tokens = sink_tokens_for(args.kv_sink_tokens, None, sink)   # how many tokens (None: a block)
    layers = None       # --layer-scales-from: per-layer multipliers (`eval layers`), tuned around, saved
    if args.layer_scales_from:
        layers = profile_layer_scales(read_profile(Path(args.layer_scales_from)))
        if layers is None:
            raise PackkvError(f"--layer-scales-from {args.layer_scales_from}: the profile has no layer_scales")
    extra = {**({} if scales is None else {"scales": scales}), **({"sink": sink} if sink else {}),
             **({"sink_tokens": sink_tokens} if sink_tokens else {}), **({"layer_scales": layers} if layers else {})}
    dense, reference = score(engine, windows, DENSE, keep=True)
    tried = []
    bar = progress(desc="tune", unit="cache")
    for granularity in granularities:
        i, j = 0, len(rel_v) - 1
        while i < len(rel_k) and j >= 0:
            spec = CacheSpec("packkv", {"params": codec.CodecParams(rel_k[i], rel_v[j], granularity, **base),
                                        "window": window, **extra})
            result, _ = score(engine, windows, spec, reference)
            result["ppl_increase_pct"] = ppl_increase_pct(result["ppl"], dense["ppl"])
            result["within_budget"] = (result["ppl_increase_pct"] <= args.budget_ppl
                                       and (args.budget_kl is None or result["kl"] <= args.budget_kl))
            tried.append(result)
            bar.update()
            bar.set_postfix_str(f"{spec.label()}: {result['ppl_increase_pct']:+.2f}%, KL {result['kl']:.4f}, "
                                f"{result['block_compression_ratio']:.2f}x")
            if floor is None:
                i, j = (i + 1, j) if result["within_budget"] else (i, j - 1)
            else:
                result["meets_ratio"] = result["block_compression_ratio"] >= floor
                i, j = (i, j - 1) if result["meets_ratio"] else (i + 1, j)
    bar.close()
    if floor is None:
        passing = [r for r in tried if r["within_budget"]]
        if not passing:
            closest = min(tried, key=lambda r: r["ppl_increase_pct"])
            raise PackkvError(f"tune: no parameters tried stay within the budget (the tightest gave "
                              f"{closest['ppl_increase_pct']:+.2f}%, KL {closest['kl']:.4f}); add smaller --rel-k/--rel-v")
        best = max(passing, key=lambda r: r["block_compression_ratio"])
    else:
        passing = [r for r in tried if r["within_budget"] and r["meets_ratio"]]
        if not passing:
            raise PackkvError(f"tune: no parameters tried reach --min-ratio {floor:g} within the budget (best ratio "
                              f"{max(r['block_compression_ratio'] for r in tried):.2f}x; "
                              f"{sum(r['within_budget'] for r in tried)} of {len(tried)} within the budget)")
        best = min(passing, key=lambda r: r["kl"])
    params = {key: best[key] for key in ("rel_k", "rel_v", "granularity", "repack", "pack", "block")}
    profile = {"model": args.model, "params": params, "budget_ppl_pct": args.budget_ppl,
               "budget_kl": args.budget_kl, **({} if floor is None else {"min_ratio": floor}),
               "calibration": {"text": str(args.text), **windows.describe(), "window": window,
                               "dense_ppl": dense["ppl"], **{k: best[k] for k in (
                                   "ppl", "ppl_increase_pct", "kl", "top1_agreement", "compression_ratio",
                                   "block_compression_ratio")}},
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               **({} if scales is None else {"channel_scales": scales_json(scales)}),
               **({"sink": list(sink)} if sink else {}), **({"sink_tokens": sink_tokens} if sink_tokens else {}),
               **({"layer_scales": layers.as_json()} if layers else {})}
    path = save_profile(args.weights, profile, args.profile_out)
    print(f"tuned {CacheSpec('packkv', {'params': codec.CodecParams(**params), **extra}).label()}: "
          f"{best['block_compression_ratio']:.2f}x in the blocks, perplexity {best['ppl_increase_pct']:+.3f}% "
          f"(budget +{args.budget_ppl}%), KL {best['kl']:.4f}; saved {path}")
    return {**run_header(args, engine), "profile_path": str(path), "profile": profile, "dense": dense,
            "tried": tried}


# ---- per-layer bounds ------------------------------------------------------------------------------

def layer_multipliers(sensitivity: np.ndarray, power: float, clip: float, floor: float = 0.01,
                      base: np.ndarray | None = None) -> np.ndarray:
    """Per-layer multipliers of one bound (K's or V's) from each layer's measured KL when it alone is
    compressed at that bound: m_l = (s_l / geometric mean)^-power, clipped to [1/clip, clip] and kept at a
    geometric mean of 1 (bits go about as -log2(bound), so about the same bytes). If KL_l grew as
    a_l * bound^2, power 0.5 would equalise the layers' marginal KL per bit (the rate-distortion optimum);
    on SmolLM2 it overshoots (a loosened layer's KL grows faster), 0.35 did better. Layers below `floor`
    times the largest count as that. With `base` (the multipliers the sensitivities were measured at, for
    `layers --in-context`), a step from there: m_l = base_l * (s_l / geometric mean)^-power, then the same
    clipping and normalisation."""
    s = np.asarray(sensitivity, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all() or s.max() <= 0:
        raise PackkvError("layer sensitivities must be finite, one per layer, and not all zero")
    if not (power >= 0 and clip >= 1):
        raise PackkvError(f"--power must be >= 0 and --clip >= 1, not {power} and {clip}")
    base = np.ones_like(s) if base is None else np.asarray(base, dtype=np.float64)
    if base.shape != s.shape or not (np.isfinite(base).all() and (base > 0).all()):
        raise PackkvError(f"base multipliers must be finite, positive and one per layer ({len(s)})")
    s = np.maximum(s, floor * s.max())
    m = base * (s / np.exp(np.log(s).mean())) ** -power
    for _ in range(100):       # clipping moves the mean; renormalise until both hold
        m = np.clip(m / np.exp(np.log(m).mean()), 1 / clip, clip)
    return m


def layers_command(args) -> dict:
    """Each layer's sensitivity at the base bounds: the KL to dense when that layer's K (then V) alone is
    compressed at them and every other layer at the tight --rel-floor (the first blocks at --kv-sink, if
    set), minus the KL with every layer at the floor. Per-layer multipliers from it (layer_multipliers),
    then the base bounds with and without them; saves a profile with the multipliers.

    --in-context measures at the operating point instead: every layer at the base bounds times the
    multipliers the --kv-profile holds (1 without), and a layer's sensitivity is what it adds there, the
    operating point's KL minus the KL with that layer's K (then V) alone at --rel-floor. Layers interact
    (an error early on changes what later layers see), so this is each layer's share of the KL the tune
    will actually see, not of a nearly exact cache. The new multipliers are a step from the old ones
    (layer_multipliers with base=), toward equal shares: the rate-distortion optimum when every layer's KL
    grows alike with its bound; then the old and the new multipliers at the base bounds."""
    if not codec.MIN_REL <= args.rel_floor <= 1:
        raise PackkvError(f"--rel-floor must be in [2**-12, 1], not {args.rel_floor}")
    in_context = args.in_context
    spec = CacheSpec.from_args(argparse.Namespace(**{**vars(args), "cache": "packkv",
                                                      **({} if in_context else {"kv_layer_scales": "none"})}))
    params = spec.params["params"]
    check_window_args(args)
    engine = load(args)
    L = engine.config.num_hidden_layers
    base = spec.params.get("layer_scales") or LayerScales([1.0] * L, [1.0] * L)
    if len(base.k) != L:
        raise PackkvError(f"the profile's layer scales are for {len(base.k)} layers, the model has {L}")
    windows = text_windows(engine, args)
    dense, reference = score(engine, windows, DENSE, keep=True)
    tight_k, tight_v = args.rel_floor / params.rel_k, args.rel_floor / params.rel_v

    def kl_with(k_mult, v_mult) -> dict:
        result, _ = score(engine, windows, CacheSpec("packkv", {**spec.params, "layer_scales": LayerScales(k_mult, v_mult)}),
                          reference)
        return result

    # the reference point: every layer tight (one layer at a time is loosened to the base bounds), or the
    # operating point (one layer at a time is tightened)
    start_k, start_v = ((base.k.tolist(), base.v.tolist()) if in_context else ([tight_k] * L, [tight_v] * L))
    floor = kl_with(start_k, start_v)["kl"]
    kl_k, kl_v = np.zeros(L), np.zeros(L)
    bar = progress(total=2 * L, desc="layers", unit="cache")
    for layer in range(L):
        for out, which in ((kl_k, "k"), (kl_v, "v")):
            ks, vs = list(start_k), list(start_v)
            if in_context:
                (ks if which == "k" else vs)[layer] = tight_k if which == "k" else tight_v
            else:
                (ks if which == "k" else vs)[layer] = 1.0
            out[layer] = kl_with(ks, vs)["kl"]
            bar.update()
    bar.close()
    if in_context:
        sens_k, sens_v = np.maximum(floor - kl_k, 0), np.maximum(floor - kl_v, 0)
        layers = LayerScales(layer_multipliers(sens_k, args.power, args.clip, base=base.k),
                             layer_multipliers(sens_v, args.power, args.clip, base=base.v))
        compared = (("base", {"layer_scales": base}), ("per_layer", {"layer_scales": layers}))
    else:
        sens_k, sens_v = np.maximum(kl_k - floor, 0), np.maximum(kl_v - floor, 0)
        layers = LayerScales(layer_multipliers(sens_k, args.power, args.clip),
                             layer_multipliers(sens_v, args.power, args.clip))
        compared = (("uniform", {}), ("per_layer", {"layer_scales": layers}))
    results = {}
    for name, extra in compared:
        result, _ = score(engine, windows, CacheSpec("packkv", {**{k: v for k, v in spec.params.items()
                                                                  if k != "layer_scales"}, **extra}), reference)
        results[name] = {**result, "ppl_increase_pct": ppl_increase_pct(result["ppl"], dense["ppl"])}
    best = results["per_layer"]
    sink = spec.params.get("sink")
    profile = {"model": args.model, "params": {key: getattr(params, key) for key in PROFILE_PARAMS},
               "layer_scales": layers.as_json(),
               "layer_sensitivity": {"k": sens_k.tolist(), "v": sens_v.tolist(),
                                     ("operating_kl" if in_context else "floor_kl"): floor,
                                     "rel_floor": args.rel_floor, "power": args.power, "clip": args.clip,
                                     "in_context": in_context,
                                     **({"base_layer_scales": base.as_json()} if in_context else {})},
               "calibration": {"text": str(args.text), **windows.describe(), "window": spec.params["window"],
                               "dense_ppl": dense["ppl"], **{k: best[k] for k in (
                                   "ppl", "ppl_increase_pct", "kl", "top1_agreement", "compression_ratio",
                                   "block_compression_ratio")}},
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               **({"sink": list(sink)} if sink else {}),
               **({"sink_tokens": spec.params["sink_tokens"]} if sink and spec.params.get("sink_tokens") else {})}
    path = save_profile(args.weights, profile, args.profile_out)
    for name, r in results.items():
        print(f"{name}: {r['block_compression_ratio']:.2f}x in the blocks, perplexity {r['ppl_increase_pct']:+.3f}%, "
              f"KL {r['kl']:.4f}, top-1 {100 * r['top1_agreement']:.2f}%")
    print(f"saved {path}")
    return {**run_header(args, engine), "profile_path": str(path), "profile": profile, "dense": dense,
            "results": results, "kl_k": kl_k.tolist(), "kl_v": kl_v.tolist()}


PROFILE_PARAMS = ("rel_k", "rel_v", "granularity", "repack", "pack", "block")


def compression_command(args) -> dict:
    params = cache_params(argparse.Namespace(**{**vars(args), "cache": "packkv"}))["params"]
    engine = Engine(args.weights, args.device)
    k, v = collect_kv(engine, text_tokens(engine, args.text, args.tokens))
    result = measure_compression(k, v, params)
    result["kivi_bits_per_element"] = {f"{b}bit_g{g}": kivi_bits_per_element(b, g) for b, g in KIVI_SETTINGS}
    bits = result["bits_per_element"]
    print(f"{result['tokens']} tokens x {k.shape[0]} layers: {result['compression_ratio']:.2f}x vs fp16, "
          f"K {bits['k']:.3f} bits/element, V {bits['v']:.3f} (entropy of levels: K "
          f"{result['entropy_bits']['k']:.2f}, V {result['entropy_bits']['v']:.2f})")
    return result


# ---- command line ---------------------------------------------------------------------------------

def parse_list(text: str, kind, flag: str, allow_empty: bool = False) -> list:
    try:
        items = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise PackkvError(f"{flag}: cannot read {text!r} as a comma-separated list of {kind.__name__}") from None
    if not items and not allow_empty:
        raise PackkvError(f"{flag} is empty")
    return items


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def add_common(p: argparse.ArgumentParser, text_help: str, text_required: bool = True) -> None:
    p.add_argument("--weights", help="Hugging Face folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", required=text_required, help=text_help)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--json", help="write the result to this file")
    add_cache_arguments(p)


def add_windows(p: argparse.ArgumentParser, windows: int = 4) -> None:
    p.add_argument("--ctx", type=int, default=1024, help="tokens per window (at most the model's context)")
    p.add_argument("--windows", type=int, default=windows, help="windows, consecutive from the text's start")
    p.add_argument("--prefill", type=int, default=256, help="tokens of each window fed as a prompt, not scored")
    p.add_argument("--chunk", type=int, default=32, help="scored tokens per forward pass (at most --kv-window)")
    p.add_argument("--spread", action="store_true", help="windows evenly spaced through the text (each from a "
                                                         "line's start), not consecutive from its start")


def add_grid(p: argparse.ArgumentParser, rel_k: str, rel_v: str, granularities: str) -> None:
    p.add_argument("--rel-k", default=rel_k, help="packkv rel_k values, comma-separated")
    p.add_argument("--rel-v", default=rel_v, help="packkv rel_v values, comma-separated")
    p.add_argument("--granularities", default=granularities, help=f"from {', '.join(codec.GRANULARITIES)}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m packkv.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    text = "text file whose first --windows x --ctx tokens are scored"

    p = sub.add_parser("ppl", help="perplexity through the cache under test")
    add_common(p, text)
    add_windows(p)
    p = sub.add_parser("kl", help="KL divergence and top-1 agreement against the dense cache")
    add_common(p, text)
    add_windows(p)
    p = sub.add_parser("passkey", help="retrieval of a number hidden in long filler text")
    add_common(p, "filler text (default: the usual repeated sentences)", text_required=False)
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt + answer tokens, comma-separated")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="where the key sits in the filler, 0..1")
    p.add_argument("--seed", type=int, default=0, help="seeds the keys (the same for every cache)")
    p = sub.add_parser("compression", help="bits per element of real KV, every byte counted")
    add_common(p, "text file whose first tokens make the KV")
    p.add_argument("--tokens", type=int, default=2048)
    p = sub.add_parser("sweep", help="compression ratio against perplexity increase and KL, packkv and quant")
    add_common(p, text)
    add_windows(p)
    add_grid(p, "0.02,0.04,0.08", "0.05,0.1,0.2,0.4", "token-layer,token-head")
    p.add_argument("--pairs", help="packkv (rel_k, rel_v) pairs rk:rv,rk:rv,... instead of the --rel-k x --rel-v grid")
    p.add_argument("--repacks", default="greedy", help=f"from {', '.join(codec.REPACK_METHODS)}")
    p.add_argument("--bits", default=",".join(map(str, QUANT_BITS)), help="quant baseline bits ('' for none)")
    p.add_argument("--groups", default=",".join(map(str, QUANT_GROUPS)), help="quant baseline groups")
    p.add_argument("--plot", help="write the plot (PNG) here")
    p.add_argument("--scales-from", help="a profile with channel scales: every packkv point also runs with them")
    p = sub.add_parser("tune", help="packkv's parameters of highest compression within a perplexity budget")
    add_common(p, "calibration text (not the one you evaluate on)")
    add_windows(p)
    add_grid(p, "0.015,0.02,0.03,0.04,0.05,0.07,0.1", "0.05,0.08,0.12,0.16,0.2,0.3,0.4", "token-layer,token-head")
    p.add_argument("--budget-ppl", type=float, required=True, help="largest perplexity increase allowed, percent")
    p.add_argument("--budget-kl", type=float, help="also the largest mean KL to the dense cache allowed, nats")
    p.add_argument("--min-ratio", type=float, help="instead of the highest ratio within the budget: the lowest KL "
                                                   "among the points whose block compression ratio is at least this")
    p.add_argument("--channel-scales", choices=["on", "off"], default="off",
                   help="calibrate per-channel K and V scales on the calibration text first and tune with them "
                        "(saved in the profile; off by default: on SmolLM2 they trade KL for ratio, no clear win)")
    p.add_argument("--layer-scales-from", help="a profile with per-layer multipliers (`eval layers`): tune the "
                                               "base bounds with them, and save them in the profile")
    p.add_argument("--profile-out", help="save the profile here (default: next to the weights, else the cache "
                                         "folder, where generate and eval find it)")
    p = sub.add_parser("layers", help="per-layer bounds from each layer's measured sensitivity, saved as a profile")
    add_common(p, "calibration text (not the one you evaluate on)")
    add_windows(p, windows=1)
    p.add_argument("--rel-floor", type=float, default=0.001,
                   help="the bound of the layers not under test (with --in-context: of the layer under test)")
    p.add_argument("--in-context", action="store_true",
                   help="measure at the operating point: every layer at the base bounds times the --kv-profile's "
                        "multipliers, each layer's share = that KL minus the KL with the layer at --rel-floor; "
                        "the new multipliers are a step from the profile's")
    p.add_argument("--power", type=float, default=0.35, help="multiplier = (sensitivity / geometric mean)^-power")
    p.add_argument("--clip", type=float, default=4.0, help="multipliers within [1/clip, clip]")
    p.add_argument("--profile-out", help="save the profile here (default: next to the weights, else the cache "
                                         "folder, where generate and eval find it)")
    return ap


COMMANDS = {"ppl": ppl_command, "kl": kl_command, "passkey": passkey_command, "compression": compression_command,
            "sweep": sweep_command, "tune": tune_command, "layers": layers_command}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        result = COMMANDS[args.command](args)
        if args.json:
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            except OSError as exc:
                raise PackkvError(f"cannot write --json {args.json}: {exc}") from exc
    except PackkvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
