"""Decode speed of packkv against Hugging Face transformers, on the same model, prompt and GPU.

    python bench/generate.py [--weights DIR] [--contexts 512 4096 8000] [--decode-tokens 128]

For each prompt length: packkv's decode tok/s for each cache kind, and transformers' (fp16, sdpa) with its
dynamic and static caches when torch imports. Every engine is warmed up first; decode time excludes the
prefill (transformers: time of generating 1 + N tokens minus that of generating 1). Writes
bench/results/generate.json and generate.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_TEXT, header, print_table, write_json, RESULTS  # noqa: E402

from packkv.generate import Engine, SamplingParams, generate  # noqa: E402
from packkv.weights.default import default_weights_folder  # noqa: E402


def prompt_of_length(engine: Engine, text_path: Path, tokens: int) -> list[int]:
    ids = engine.tokenizer.encode(text_path.read_text(encoding="utf-8")[: tokens * 8])
    if len(ids) < tokens:
        raise SystemExit(f"{text_path} holds only {len(ids)} tokens, {tokens} asked")
    return ids[:tokens]


def packkv_decode_tok_s(engine: Engine, ids: list[int], decode_tokens: int, cache: str) -> float:
    result = generate(engine, ids, decode_tokens, SamplingParams(), cache_kind=cache, show_progress=False,
                      stop_at_eos=False)
    return result.stats()["decode_tok_s"]


def transformers_decode_tok_s(model, torch, ids: list[int], decode_tokens: int, cache: str) -> float:
    prompt = torch.tensor([ids], device="cuda")

    def timed(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       cache_implementation=cache, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(1 + decode_tokens)      # warm-up at this prompt length: allocations, the static cache's compile
    return (decode_tokens) / (timed(1 + decode_tokens) - timed(1))


def load_transformers(folder):
    try:
        import torch
        import transformers
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float16,
                                                          attn_implementation="sdpa").cuda().eval()
    return model, torch


def plot(records: list[dict], path: Path, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["engine"], r["cache"]) for r in records}):
        rows = sorted((r for r in records if (r["engine"], r["cache"]) == key), key=lambda r: r["context"])
        ax.plot([r["context"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o", label=f"{key[0]} {key[1]}")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode tokens / s (batch 1)")
    ax.set_title(f"{records[0]['model']} decode speed, {device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="Hugging Face folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 8000])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--caches", nargs="+", default=["dense"])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default="generate.json")
    args = ap.parse_args()

    folder = args.weights or str(default_weights_folder())
    engine = Engine(folder, device="gpu")
    model_name = Path(folder).name.lower()
    hf_model, torch = (None, None) if args.no_transformers else load_transformers(folder)
    packkv_decode_tok_s(engine, prompt_of_length(engine, args.text, 64), 16, args.caches[0])   # warm-up
    records = []
    for context in args.contexts:
        ids = prompt_of_length(engine, args.text, context)
        runs = [("packkv", cache, lambda c=cache: packkv_decode_tok_s(engine, ids, args.decode_tokens, c))
                for cache in args.caches]
        if hf_model is not None:
            runs += [("transformers", cache, lambda c=cache: transformers_decode_tok_s(
                hf_model, torch, ids, args.decode_tokens, c)) for cache in ("dynamic", "static")]
        for engine_name, cache, measure in runs:
            record = {"model": model_name, "engine": engine_name, "cache": cache, "context": context,
                      "batch": 1, "decode_tok_s": measure()}
            records.append(record)
            print(f"  {engine_name:12s} {cache:8s} context {context:6d}: {record['decode_tok_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    print_table(records, ["model", "engine", "cache", "context", "batch", "decode_tok_s"])
    payload = {**header(engine.backend.device_name), "decode_tokens": args.decode_tokens, "records": records}
    write_json(args.out, payload)
    plot(records, RESULTS / Path(args.out).with_suffix(".png").name, engine.backend.device_name)


if __name__ == "__main__":
    main()
