"""packkv's compressed KV cache, driven from plain NumPy on the CPU.

A stand-in for a model's attention layers: for 4 layers, 6 query heads over 2 KV heads (grouped-query
attention), head_dim 64, a batch of 2 sequences, it feeds the cache a 300-token prompt in one step and
then 60 decoded tokens one step at a time, and compares every attention output with NumPy's own
attention over the dense K/V. K and V look a little like a real model's: a per-channel offset (in K, a
few large "outlier" channels), a slow drift along the sequence, and noise.

    python examples/numpy_cache.py [--cache packkv|dense] [--rel-k 0.1] [--rel-v 0.2] [--window 128]

The whole protocol, per step, is: for every layer, cache.append(layer, k, v) then
out = cache.attend(layer, q). The step ends by itself after the last layer's attend.
"""
from __future__ import annotations

import argparse

import numpy as np

import packkv

LAYERS, KV_HEADS, HEADS, HEAD_DIM, BATCH = 4, 2, 6, 64, 2


def dense_attention(q, k, v):
    """The reference: causal softmax(q K^T / sqrt(D)) V over all L keys, the T queries being the last T
    positions; grouped-query attention (query head h reads KV head h // (heads / kv_heads)).
    q [B, heads, T, D]; k, v [B, kv_heads, L, D]; float64 throughout."""
    B, H, T, D = q.shape
    L = k.shape[2]
    group = H // k.shape[1]
    k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1).astype(np.float64)
    scores = q.astype(np.float64) @ k.swapaxes(-1, -2) / np.sqrt(D)                 # [B, H, T, L]
    visible = np.arange(L)[None, :] <= (L - T + np.arange(T))[:, None]              # [T, L]
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def kv_like(rng, offsets, start: int, T: int):
    """[B, kv_heads, T, D] float32: per-channel offsets + a slow drift along positions + noise."""
    positions = np.arange(start, start + T)[None, None, :, None]
    drift = np.sin(positions / 50.0 + np.arange(HEAD_DIM) / 7.0)
    return (offsets + drift + 0.5 * rng.standard_normal((BATCH, KV_HEADS, T, HEAD_DIM))).astype(np.float32)


def run(prompt: int = 300, decode: int = 60, seed: int = 0, record: bool = False, **cache_params) -> dict:
    """Drive a packkv.KVCache (cache_params: kind, rel_k, rel_v, window, ...) and return what it did:
    max_diff (largest |cache - dense attention| over every call), max_ref (largest |dense attention|), stats, and with record=True, `calls`
    (layer, q, out, ref, number of keys) and the dense K/V of every layer."""
    rng = np.random.default_rng(seed)
    cache = packkv.KVCache(LAYERS, KV_HEADS, HEAD_DIM, batch=BATCH, max_context=prompt + decode, device="cpu",
                           **cache_params)
    channel = (LAYERS, 1, KV_HEADS, 1, HEAD_DIM)
    k_offsets = rng.standard_normal(channel) * np.where(rng.random(channel) < 0.05, 6.0, 1.0)   # outlier channels
    v_offsets = 0.5 * rng.standard_normal(channel)
    dense_k = [np.zeros((BATCH, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(LAYERS)]
    dense_v = [np.zeros((BATCH, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(LAYERS)]
    max_diff, max_ref, calls = 0.0, 0.0, []
    for T in [prompt] + [1] * decode:              # one prefill step, then one token per step
        start = cache.length                       # the position of this step's first token
        for layer in range(LAYERS):
            k = kv_like(rng, k_offsets[layer], start, T)
            v = kv_like(rng, v_offsets[layer], start, T)
            q = rng.standard_normal((BATCH, HEADS, T, HEAD_DIM)).astype(np.float32)

            cache.append(layer, k, v)
            out = cache.attend(layer, q)           # [B, heads, T, D], float32 like q

            dense_k[layer] = np.concatenate([dense_k[layer], k], axis=2)
            dense_v[layer] = np.concatenate([dense_v[layer], v], axis=2)
            ref = dense_attention(q, dense_k[layer], dense_v[layer])
            max_diff = max(max_diff, float(np.abs(out - ref).max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
            if record:
                calls.append((layer, q, out, ref, dense_k[layer].shape[2]))
    result = {"max_diff": max_diff, "max_ref": max_ref, "stats": cache.stats(), "tokens": cache.length}
    if record:
        result.update(calls=calls, k=dense_k, v=dense_v)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="packkv", choices=["packkv", "dense"])
    ap.add_argument("--rel-k", type=float, help="relative error bound of K (default: the codec's)")
    ap.add_argument("--rel-v", type=float, help="relative error bound of V (default: the codec's)")
    ap.add_argument("--window", type=int, help="recent tokens kept in fp16 (default 128)")
    args = ap.parse_args(argv)
    params = {"kind": args.cache}
    if args.cache == "packkv":
        params.update({k: v for k, v in (("rel_k", args.rel_k), ("rel_v", args.rel_v), ("window", args.window))
                       if v is not None})
    r = run(**params)
    s = r["stats"]
    print(f"{r['tokens']} tokens x {LAYERS} layers x batch {BATCH} in a {s['cache']} cache: "
          f"{s['kv_bytes_used']:,} bytes used ({s['kv_bytes_reserved']:,} reserved)")
    if s.get("kv_params"):
        print(f"compression ratio vs fp16: {s['compression_ratio']:.2f}x, {s['bits_per_element']:.2f} bits per "
              f"element (the fp16 window of the last {s['kv_params']['window']}+ tokens included); {s['kv_params']}")
    print(f"max |cache attention - dense attention| over every call: {r['max_diff']:.4f} "
          f"(outputs up to {r['max_ref']:.2f})")


if __name__ == "__main__":
    main()
