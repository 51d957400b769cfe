"""Real K/V for benchmarks: SmolLM2-135M's post-RoPE K and V of a text, for a few layers, saved as fp16.

    python bench/dump_kv.py [--text ../shared/data/brown.txt] [--tokens 1024] [--layers 1 10 19 28]

Runs on the CPU (the NumPy path). Writes .stage/kv/smollm2_brown1024.npz (k, v [layers, 3, tokens, 64],
layers, tokens): what bench/attention.py's 'real' data and bench/generate.py's --kv-data real are made of.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_TEXT, REAL_KV  # noqa: E402

from packkv.generate import Engine, prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 10, 19, 28])
    ap.add_argument("--out", type=Path, default=REAL_KV)
    args = ap.parse_args()
    engine = Engine(args.weights, device="cpu")
    ids = engine.tokenizer.encode(args.text.read_text(encoding="utf-8")[: args.tokens * 8])[: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.text} holds only {len(ids)} tokens")
    cache = engine.new_cache("dense", batch=1, tokens=args.tokens)
    prefill(engine, ids, cache, show_progress=True)
    k = np.stack([cache.k[layer, 0, :, :args.tokens] for layer in args.layers]).astype(np.float16)
    v = np.stack([cache.v[layer, 0, :, :args.tokens] for layer in args.layers]).astype(np.float16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, k=k, v=v, layers=np.array(args.layers), tokens=np.array(args.tokens))
    print(f"wrote {args.out}: k, v {k.shape}", file=sys.stderr)


if __name__ == "__main__":
    main()
