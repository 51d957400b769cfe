"""GPU memory over a long generation: in use, against the weights plus the cache's reserved bytes.

    python bench/memory.py --model llama-3.1-8b --prompt 28672 --tokens 100000 --cache packkv

Random weights of the shape (made on the device), a prompt of random token ids, its prefill, then greedy
decoding as generate runs it (packkv.generate.decode_steps: the captured graph, pipelined) of --tokens
tokens. Every --every tokens one sample:
  used       device memory in use by everything (cudaMemGetInfo: total - free): the CUDA context, CuPy's
             pools (the decode graph's own included), the encoder's Numba scratch, library workspaces,
             less the free blocks CuPy's default pool caches for reuse;
  reserved   the cache's bytes_reserved (its arena grows by doubling), and bytes_used;
  workspace  used - weights - reserved.
The claim under test: workspace stays fixed, so used never exceeds weights + reserved + the workspace of
the first sample (taken after the graph's capture). `exceeded_bytes` is the largest excess over that over
the run (0 when the claim holds). Progress on stderr; the JSON is rewritten at every sample, so a run cut
short keeps what it measured; a plot at the end. --device cpu runs the same loop without memory readings
(a smoke test on a small shape).
Writes bench/results/<out>.json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_json  # noqa: E402

from packkv.generate import Engine, SamplingParams, Sampler, decode_steps, make_decoder, prefill  # noqa: E402
from packkv.weights.random import PRESETS  # noqa: E402


def device_used_bytes(engine) -> int | None:
    """Device memory held by the process (cudaMemGetInfo), less the blocks CuPy's default pool keeps free
    for reuse (a grown arena's old buffer goes back there, not to the driver)."""
    if not engine.backend.is_gpu:
        return None
    xp = engine.backend.xp
    free, total = xp.cuda.runtime.memGetInfo()
    return int(total - free) - int(xp.get_default_memory_pool().free_bytes())


def sample(engine, cache, tokens: int, seconds: float) -> dict:
    used, weights = device_used_bytes(engine), engine.model.weight_bytes()
    reserved = cache.bytes_reserved()
    return {"generated": tokens, "context": int(cache.lengths[0]), "seconds": seconds, "used_bytes": used,
            "weight_bytes": weights, "reserved_bytes": reserved, "kv_bytes_used": cache.bytes_used(),
            "workspace_bytes": None if used is None else used - weights - reserved}


def summary(samples: list[dict]) -> dict:
    if samples[0]["used_bytes"] is None:
        return {}
    fixed = samples[0]["workspace_bytes"]
    excess = max(s["used_bytes"] - (s["weight_bytes"] + s["reserved_bytes"] + fixed) for s in samples)
    return {"fixed_workspace_bytes": fixed, "max_workspace_bytes": max(s["workspace_bytes"] for s in samples),
            "exceeded_bytes": max(0, excess), "claim_holds": excess <= 0}


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [s["context"] for s in samples]
    fig, ax = plt.subplots(figsize=(7, 4))
    gib = 1 / 2 ** 30
    ax.plot(x, [s["used_bytes"] * gib for s in samples], label="device memory in use")
    ax.plot(x, [(s["weight_bytes"] + s["reserved_bytes"] + samples[0]["workspace_bytes"]) * gib for s in samples],
            "--", label="weights + cache reserved + first workspace")
    ax.plot(x, [(s["weight_bytes"] + s["kv_bytes_used"]) * gib for s in samples], ":", label="weights + cache used")
    ax.set_xlabel("tokens in the sequence")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--cache", default="packkv", choices=["dense", "packkv", "quant"])
    ap.add_argument("--prompt", type=int, default=28672, help="prompt tokens (random ids)")
    ap.add_argument("--tokens", type=int, default=100000, help="tokens to generate")
    ap.add_argument("--every", type=int, default=1000, help="tokens between memory samples")
    ap.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--out", default="memory.json")
    args = ap.parse_args()

    total = args.prompt + args.tokens + 2
    engine = Engine(None, device=args.device, max_context=total, random_weights=args.model)
    cache = engine.new_cache(args.cache, batch=1, tokens=total)
    ids = np.random.default_rng(0).integers(0, engine.config.vocab_size, args.prompt).tolist()
    first = int(prefill(engine, ids, cache, show_progress=True)[0, -1].argmax())
    steps = decode_steps(make_decoder(engine, cache), Sampler(SamplingParams(), engine.backend), [first])
    meta = {**header(engine.backend.device_name), "model": args.model, "cache": args.cache, "prompt": args.prompt,
            "tokens": args.tokens, "kv_data": "the random-weight model's own K/V"}
    samples, start = [], time.perf_counter()
    with tqdm(total=args.tokens, desc="decode", unit="tok", file=sys.stderr) as bar:
        for generated in range(1, args.tokens + 1):
            next(steps)
            bar.update(1)
            if generated % args.every == 0 or generated == args.tokens:
                samples.append(sample(engine, cache, generated, time.perf_counter() - start))
                write_json(args.out, {**meta, **summary(samples), "samples": samples}, quiet=True)
    steps.close()
    print(summary(samples), file=sys.stderr)
    write_json(args.out, {**meta, **summary(samples), "samples": samples})
    if engine.backend.is_gpu:
        plot(samples, RESULTS / Path(args.out).with_suffix(".png").name,
             f"{args.model}, {args.cache} cache, {engine.backend.device_name}")


if __name__ == "__main__":
    main()
