"""Decode speed of packkv's caches against each other and against Hugging Face transformers.

    python bench/generate.py --model smollm2 [--weights DIR] [--contexts 512 4096 8000]
    python bench/generate.py --model llama-3.1-8b --contexts 1024 32768 131072 --batches 1 8

SmolLM2 runs with its real weights on a real prompt (prefill, then decode). A random-weight model of a
real shape (`--model llama-3.1-8b`, llama-2-7b, tinyllama-1.1b) has its caches filled with K/V of the
given length instead of a prefill, then decodes: Gaussian (kv_data "random", the default) or, with
--kv-data real, SmolLM2's real K/V of Brown text tiled to the shape ("real-tiled"; bench/dump_kv.py
makes the dump), which compresses and decodes like real KV rather than like noise. Decode tok/s counts
the tokens of all sequences of the batch over the decode time, compression and host sampling included;
every engine is warmed up first, and the first decode step (the CUDA graph's capture) is not timed. Transformers (fp16, sdpa, dynamic and static cache) runs beside SmolLM2 at batch 1 when
torch imports. copy_gbps: a device-to-device copy in the same run; each record's weights_bound_fraction
puts its tok/s against a step that only streams the weights at that bandwidth. `capacity`: the longest context (batch 1) and the largest batch (at --capacity-context)
each cache kind holds in the GPU memory left beside the weights, from the bytes per token it reported.
Writes bench/results/<out>.json and a plot.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_TEXT, RESULTS, copy_gbps, header, print_table, real_heads, write_json  # noqa: E402

from packkv.generate import (Engine, GraphDecoder, SamplingParams, Sampler, decode_steps, make_decoder,  # noqa: E402
                             prefill)
from packkv.weights.random import PRESETS  # noqa: E402

WORKSPACE_BYTES = 2 << 30    # set aside for activations, logits and kernel workspaces in capacity estimates
WARMUP_STEPS = 4             # untimed decode steps after the first, which fill the step pipeline
# cache tokens beyond context + steps: the untimed steps, and the steps queued behind the last timed one
ROOM = 2 + WARMUP_STEPS + GraphDecoder.PIPELINE_DEPTH + 1


def prompt_of_length(engine: Engine, text_path: Path, tokens: int) -> list[int]:
    ids = engine.tokenizer.encode(text_path.read_text(encoding="utf-8")[: tokens * 8])
    if len(ids) < tokens:
        raise SystemExit(f"{text_path} holds only {len(ids)} tokens, {tokens} asked")
    return ids[:tokens]


def real_prompt_decode(engine, text, context, batch, cache_kind, steps) -> tuple[float, dict]:
    """Prefill `batch` real prompts of `context` tokens (shifted apart in the text), then time `steps`
    decode steps."""
    ids = prompt_of_length(engine, text, context + 64 * batch)
    cache = engine.new_cache(cache_kind, batch=batch, tokens=context + steps + ROOM)
    first = [prefill(engine, ids[64 * b: 64 * b + context], cache.row(b), show_progress=False)[0, -1]
             for b in range(batch)]
    sampler = Sampler(SamplingParams(), engine.backend)
    return timed_decode(engine, cache, [sampler(logits) for logits in first], steps)


def fill(cache, context: int, kv_of, chunk: int = 512) -> None:
    """Append `context` tokens to every sequence in chunks, as a prefill would: kv_of(layer, start, T)
    gives each layer's k, v [batch, kv_heads, T, head_dim] for tokens start .. start + T."""
    for start in range(0, context, chunk):
        T = min(chunk, context - start)
        for layer in range(cache.shape.layers):
            cache.append(layer, *kv_of(layer, start, T))
        cache.advance(T)


def fill_random(engine, cache, context: int) -> None:
    """Random K/V (N(0, 1), fp16)."""
    xp, s = engine.backend.xp, cache.shape
    rng = xp.random.default_rng(0)

    def gaussian(T):
        return rng.standard_normal((s.batch, s.kv_heads, T, s.head_dim), dtype=np.float32).astype(np.float16)
    fill(cache, context, lambda layer, start, T: (gaussian(T), gaussian(T)))


def fill_real(engine, cache, context: int) -> None:
    """Real-valued K/V: SmolLM2's post-RoPE K and V of Brown text (bench/dump_kv.py), a KV head of the
    shape made of dump heads concatenated along head_dim (heads i, i + 5, ... of the dump), a different
    mix per layer and head, tiled along the tokens."""
    xp, s = engine.backend.xp, cache.shape
    heads_k, heads_v = real_heads()
    n_heads, n = heads_k.shape[:2]

    def mixed(heads, layer):          # [kv_heads, n, head_dim] fp16, on the device
        def one(i):
            return np.concatenate([heads[(i + 5 * r) % n_heads] for r in range(-(-s.head_dim // heads.shape[2]))],
                                  axis=-1)[:, :s.head_dim]
        return xp.asarray(np.stack([one(layer * s.kv_heads + h) for h in range(s.kv_heads)]).astype(np.float16))

    streams = [(mixed(heads_k, layer), mixed(heads_v, layer)) for layer in range(s.layers)]

    def tiled(layer, start, T):
        index = xp.asarray((start + np.arange(T)) % n)
        return tuple(xp.broadcast_to(x[:, index][None], (s.batch, s.kv_heads, T, s.head_dim)) for x in streams[layer])
    fill(cache, context, tiled)


def synthetic_kv_decode(engine, context, batch, cache_kind, steps, kv_data: str) -> tuple[float, dict]:
    cache = engine.new_cache(cache_kind, batch=batch, tokens=context + steps + ROOM)
    (fill_real if kv_data == "real" else fill_random)(engine, cache, context)
    return timed_decode(engine, cache, [1] * batch, steps)


def timed_decode(engine, cache, ids: list[int], steps: int, decoder=None) -> tuple[float, dict]:
    """Greedy decode tok/s over `steps` steps, as generate runs them (packkv.generate.decode_steps: on a
    captured graph, pipelined up to GraphDecoder.PIPELINE_DEPTH steps ahead of the host), with `decoder` or
    make_decoder's; the first step, which captures the CUDA graph (or warms up), is not timed: a generation
    pays it once. The clock runs from one step's ids to the ids `steps` steps later with the pipeline full
    at both ends, so it holds exactly `steps` steps of device work. (Until 2026-11-24 it started after a
    synchronize that let the PIPELINE_DEPTH steps queued behind the first finish off the clock: `steps`
    tokens over steps - 3 steps of time, tok/s too high by steps / (steps - 3), 23% at --steps 16, the same
    for every cache kind, so the ratios between them held.)"""
    decoder = decoder or make_decoder(engine, cache)
    tokens = decode_steps(decoder, Sampler(SamplingParams(), engine.backend), ids)
    for _ in range(1 + WARMUP_STEPS):
        next(tokens)
    start = time.perf_counter()
    for _ in range(steps):
        ids = next(tokens)
    elapsed = time.perf_counter() - start
    tokens.close()
    return len(ids) * steps / elapsed, cache.stats()


def transformers_decode_tok_s(folder, ids: list[int], steps: int, cache: str) -> float | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float16,
                                                          attn_implementation="sdpa").cuda().eval()
    prompt = torch.tensor([ids], device="cuda")

    def timed(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       cache_implementation=cache, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(1 + steps)           # warm-up at this prompt length: allocations, the static cache's compile
    return steps / (timed(1 + steps) - timed(1))


def capacity(engine, records: list[dict], model: str, capacity_context: int) -> list[dict]:
    """Tokens that fit beside the weights, per cache kind, from the bytes per token each one reported at
    its longest measured context (so window and headers are included at that length)."""
    import cupy
    free = cupy.cuda.runtime.memGetInfo()[1] - engine.model.weight_bytes() - WORKSPACE_BYTES
    out = []
    for kind in sorted({r["cache"] for r in records if r["engine"] == "packkv"}):
        longest = max((r for r in records if r["cache"] == kind and r["engine"] == "packkv"),
                      key=lambda r: r["context"] * r["batch"])
        per_token = longest["kv_bytes_used"] / (longest["context"] * longest["batch"])
        tokens = int(free / per_token)
        out.append({"model": model, "cache": kind, "batch": 1,
                    "max_context": min(tokens, engine.config.max_position_embeddings),
                    "max_tokens_in_memory": tokens, "bytes_per_token": per_token})
        out.append({"model": model, "cache": kind, "batch": tokens // capacity_context,
                    "max_context": capacity_context, "max_tokens_in_memory": tokens, "bytes_per_token": per_token})
    return out


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in records})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for key in sorted({(r["engine"], r["cache"]) for r in records if r["batch"] == batch}):
            rows = sorted((r for r in records if (r["engine"], r["cache"]) == key and r["batch"] == batch),
                          key=lambda r: r["context"])
            ax.plot([r["context"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o",
                    label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens / s")
        ax.set_title(f"{title}, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", *PRESETS])
    ap.add_argument("--weights", help="SmolLM2's (or another real model's) Hugging Face folder")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 8000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--caches", nargs="+", default=["dense", "packkv", "quant"])
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per measurement")
    ap.add_argument("--kv-data", choices=["random", "real"], default="random",
                    help="random-weight shapes: the prefilled K/V, Gaussian or SmolLM2's real K/V tiled (bench/dump_kv.py)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--capacity-context", type=int, default=8192)
    ap.add_argument("--out", default="generate.json")
    args = ap.parse_args()

    real = args.model == "smollm2"
    longest = max(args.contexts) + args.steps + ROOM       # random KV: no prompt shift, no prefill
    engine = Engine(args.weights, device="gpu", max_context=None if real else longest,
                    random_weights=None if real else args.model)
    model_name = "smollm2-135m" if real else args.model
    measure = ((lambda c, b, kind: real_prompt_decode(engine, args.text, c, b, kind, args.steps)) if real else
               (lambda c, b, kind: synthetic_kv_decode(engine, c, b, kind, args.steps, args.kv_data)))
    for kind in args.caches:                             # warm-up: kernels compiled, encoders built
        measure(min(args.contexts), 1, kind)
    records = []
    for batch in args.batches:
        for context in args.contexts:
            for kind in args.caches:
                tok_s, stats = measure(context, batch, kind)
                records.append({"model": model_name, "engine": "packkv", "cache": kind, "context": context,
                                "batch": batch, "decode_tok_s": tok_s,
                                "kv_data": "real" if real else "random" if args.kv_data == "random" else "real-tiled",
                                "kv_bytes_used": stats["kv_bytes_used"], "compression_ratio": stats["compression_ratio"],
                                "compress_seconds": stats.get("compress_seconds")})
                print(f"  {kind:7s} context {context:6d} batch {batch:2d}: {tok_s:8.1f} tok/s", file=sys.stderr,
                      flush=True)
            if real and batch == 1 and not args.no_transformers:
                ids = prompt_of_length(engine, args.text, context)
                for hf_cache in ("dynamic", "static"):
                    tok_s = transformers_decode_tok_s(args.weights or str(engine_folder()), ids, args.steps, hf_cache)
                    if tok_s is not None:
                        records.append({"model": model_name, "engine": "transformers", "cache": hf_cache,
                                        "context": context, "batch": 1, "decode_tok_s": tok_s, "kv_data": "real"})
    print_table(records, ["model", "engine", "cache", "context", "batch", "decode_tok_s", "compression_ratio"])
    import cupy
    copy = copy_gbps(cupy)
    weights_bound = copy * 1e9 / engine.model.weight_bytes()   # steps/s if a step only read the weights
    for r in records:
        if r["engine"] == "packkv":
            r["weights_bound_fraction"] = r["decode_tok_s"] / (r["batch"] * weights_bound)
    payload = {**header(engine.backend.device_name), "steps": args.steps, "records": records,
               "capacity": capacity(engine, records, model_name, args.capacity_context),
               "weight_bytes": engine.model.weight_bytes(), "copy_gbps": copy,
               "weights_bound_steps_s": weights_bound,
               "weights_bound_note": "weights_bound_fraction = decode tok/s / (batch x copy_gbps / weight_bytes): "
                                     "the share of the speed a step that only streamed the weights would reach"}
    print_table(payload["capacity"], ["model", "cache", "batch", "max_context", "max_tokens_in_memory"])
    write_json(args.out, payload)
    plot(records, RESULTS / Path(args.out).with_suffix(".png").name, f"{model_name}, {engine.backend.device_name}")


def engine_folder() -> Path:
    from packkv.weights.default import default_weights_folder
    return default_weights_folder()


if __name__ == "__main__":
    main()
