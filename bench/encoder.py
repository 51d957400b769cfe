"""GB/s of the GPU encoder (kernels/encoder.py): fp16 K+V input compressed per second.

    python bench/encoder.py [--threads 512] [--reps 3] [--quick] [--breakdown] [--profile] [--out encoder.json]

Shapes: Llama-3.1-8B (32 layers, 8 KV heads, head_dim 128) and SmolLM2-135M (30 layers, 3 KV heads,
head_dim 64); batches of one decode step's blocks (every layer's block at once), an 8K-token prefill
and a 128K-token prefill (all layers' blocks in one call). Default params (token-layer, greedy, pack 16,
block 64, rel_k 0.1, rel_v 0.2) and, for the 8B prefill, the other repack methods and token-head.
Input: synthetic post-RoPE-like K (unit gaussian, 1/16 of the channels x10) and gaussian V, fp16 on the
GPU. Each timing is one `encode` call as the cache makes it (meta/work uploads, the launch, the 64-byte
read-back: it synchronizes), the median of --reps after a warm-up call; the first and last blocks of each
batch are checked byte for byte against packkv.codec.

The 128K-token prefill's compression time is put against the 8B prefill's own time, estimated from its
FLOPs at the fp16 matmul throughput measured in the same run (an 8192^3 cupy matmul):
linear layers 2 * tokens * 6.98e9 weights (q, k, v, o, gate, up, down of 32 layers; the LM head runs on
the last token only), causal attention 2 (QK^T, PV) * 2 * tokens^2 / 2 * head_dim * 32 heads * 32 layers.
That estimate assumes the whole prefill runs at matmul peak, so it underestimates the prefill time and
the fraction is an upper bound.

Writes bench/results/encoder.json, or --out (device, records with shape, params, blocks, seconds,
input_gbps): a build's numbers beside the committed ones.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, print_table, write_json  # noqa: E402

from packkv import codec  # noqa: E402
from packkv.codec import CodecParams  # noqa: E402

SHAPES = {"llama-3.1-8b": dict(layers=32, kv_heads=8, head_dim=128, heads=32, hidden=4096, ffn=14336),
          "smollm2-135m": dict(layers=30, kv_heads=3, head_dim=64, heads=9, hidden=576, ffn=1536)}


def synthetic_blocks(cp, n, H, T, D, seed):
    """k, v fp16 [n, H, T, D] on the GPU, made in chunks (bounded fp32 temporaries)."""
    rs = cp.random.RandomState(seed)
    k = cp.empty((n, H, T, D), dtype=cp.float16)
    v = cp.empty((n, H, T, D), dtype=cp.float16)
    scale = cp.ones(D, dtype=cp.float32)
    scale[:: 16] = 10.0
    chunk = max(1, (256 << 20) // (H * T * D * 4))
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        k[i:j] = (rs.standard_normal((j - i, H, T, D), dtype=cp.float32) * scale).astype(cp.float16)
        v[i:j] = rs.standard_normal((j - i, H, T, D), dtype=cp.float32).astype(cp.float16)
    return k, v


def matmul_tflops(cp, n=8192, reps=20):
    a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    for _ in range(3):
        a @ b
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        a @ b
    stop.record()
    stop.synchronize()
    seconds = cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps
    return 2 * n ** 3 / seconds / 1e12


def prefill_flops(shape, tokens):
    s = shape
    kv = s["kv_heads"] * s["head_dim"]
    weights = s["layers"] * (2 * s["hidden"] * s["hidden"] + 2 * s["hidden"] * kv + 3 * s["hidden"] * s["ffn"])
    linear = 2 * tokens * weights
    attention = s["layers"] * s["heads"] * 2 * 2 * (tokens * tokens / 2) * s["head_dim"]
    return linear + attention, linear, attention


def time_encode(cp, encoder, k, v, arena, reps):
    encoder.encode(k, v, arena, 0)               # warm-up (compile on the first call of a variant)
    times = []
    for _ in range(reps):
        cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        offsets, used = encoder.encode(k, v, arena, 0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), offsets, used


def check_against_codec(cp, k, v, params, arena, offsets, picks):
    offs = cp.asnumpy(cp.asarray(offsets))
    for b in picks:
        ref, _ = codec.encode_block(cp.asnumpy(k[b]), cp.asnumpy(v[b]), params)
        got = cp.asnumpy(arena[int(offs[b]):int(offs[b + 1])])
        if not np.array_equal(got, ref):
            raise SystemExit(f"block {b}: GPU record differs from codec.encode_block ({params})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[512],
                    help="CTA sizes; the first for every batch, the others for the 8B 128K batch only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the 128K-token batches")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the 8B 128K batch with phases switched off (quantize only, + repack, "
                         "+ pack statistics, + look-back): where the time goes")
    ap.add_argument("--profile", action="store_true",
                    help="also run the 8B 128K greedy batch with the encoder's profile build (each phase's "
                         "clock64 cycles, summed over the CTAs; diagnostics: the timing is not the plain build's)")
    ap.add_argument("--out", default="encoder.json", help="file name under bench/results")
    args = ap.parse_args()

    import cupy as cp
    from packkv.kernels.encoder import BlockEncoder, max_record_bytes

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    device = name.decode() if isinstance(name, bytes) else name
    tflops = matmul_tflops(cp)
    print(f"{device}: fp16 matmul 8192^3 {tflops:.0f} TFLOP/s", flush=True)

    block = 64
    base = CodecParams()
    runs = []   # (model, label, tokens, params, threads)
    for model in SHAPES:
        for label, tokens in (("decode step", block), ("prefill 8K", 8192), ("prefill 128K", 131072)):
            if args.quick and tokens > 8192:
                continue
            runs.append((model, label, tokens, base, args.threads[0]))
            if model == "llama-3.1-8b" and tokens == 131072:
                runs += [(model, label, tokens, base, t) for t in args.threads[1:]]
                runs += [(model, label, tokens, p, args.threads[0]) for p in (
                    replace(base, repack="none"), replace(base, repack="sort"),
                    replace(base, granularity="token-head"))]

    records, data = [], {}
    for model, label, tokens, params, threads in runs:
        s = SHAPES[model]
        H, D, L = s["kv_heads"], s["head_dim"], s["layers"]
        n = L * (tokens // params.block)
        key = (model, n)
        if key not in data:
            data.clear()
            cp.get_default_memory_pool().free_all_blocks()
            data[key] = synthetic_blocks(cp, n, H, params.block, D, seed=n)
        k, v = data[key]
        encoder = BlockEncoder(params, H, D, threads=threads)
        arena = cp.zeros(n * max_record_bytes(params, H, D) + 16, dtype=cp.uint8)
        seconds, offsets, used = time_encode(cp, encoder, k, v, arena, args.reps)
        check_against_codec(cp, k, v, params, arena, offsets, sorted({0, 1, n // 2, n - 1}))
        input_bytes = 2 * k.size * 2
        rec = dict(model=model, batch=label, tokens=tokens,
                   shape=dict(layers=L, kv_heads=H, head_dim=D, block=params.block),
                   params={f: getattr(params, f) for f in ("granularity", "repack", "pack", "block",
                                                            "rel_k", "rel_v")},
                   threads=threads, lane_bits=encoder.plan.E, level_matrix="shared" if encoder.plan.lv_shared
                   else "global", blocks=n, input_bytes=input_bytes, seconds=seconds,
                   input_gbps=input_bytes / seconds / 1e9, compressed_bytes=int(used),
                   ratio=input_bytes / int(used), checked_blocks="first, second, middle, last: identical")
        records.append(rec)
        print(f"{model:13s} {label:12s} {params.granularity:11s} {params.repack:6s} threads {threads:4d}: "
              f"{n:6d} blocks {seconds * 1e3:9.2f} ms {rec['input_gbps']:7.1f} GB/s ratio {rec['ratio']:.2f}",
              flush=True)
        del arena

    breakdown = profile = None
    s = SHAPES["llama-3.1-8b"]
    H, D, L = s["kv_heads"], s["head_dim"], s["layers"]
    n = L * (131072 // block)
    if (args.breakdown or args.profile) and not args.quick:
        if (("llama-3.1-8b", n)) not in data:
            data.clear()
            cp.get_default_memory_pool().free_all_blocks()
            data[("llama-3.1-8b", n)] = synthetic_blocks(cp, n, H, block, D, seed=n)
        k, v = data[("llama-3.1-8b", n)]
    if args.profile and not args.quick:
        arena = cp.zeros(n * max_record_bytes(base, H, D) + 16, dtype=cp.uint8)
        encoder = BlockEncoder(base, H, D, threads=args.threads[0], profile=True)
        seconds, _, _ = time_encode(cp, encoder, k, v, arena, 1)
        cycles = encoder.phase_cycles()
        from numba import cuda
        khz = cuda.get_current_device().CLOCK_RATE   # the largest SM clock, kHz
        total = sum(cycles.values())
        profile = dict(seconds=seconds, ctas=encoder.max_ctas, max_sm_clock_khz=khz, blocks=n,
                       phases={name: dict(cycles_per_block=c / n, share=c / total,
                                          ms_per_sm_at_max_clock=c / encoder.max_ctas / khz)
                               for name, c in cycles.items()})
        print(f"8B 128K greedy, profile build ({seconds * 1e3:.1f} ms, {encoder.max_ctas} CTAs): " +
              ", ".join(f"{name} {c / n / 1e3:.1f}k cycles/block ({100 * c / total:.1f}%)"
                        for name, c in cycles.items()), flush=True)
        del arena
    if args.breakdown and not args.quick:
        arena = cp.zeros(n * max_record_bytes(base, H, D) + 16, dtype=cp.uint8)
        breakdown = {}
        for params in (base, replace(base, repack="none")):
            encoder = BlockEncoder(params, H, D, threads=args.threads[0])
            t = {}
            for mode in (0, 1, 2, 6, 14):   # bits: 1 no write, 2 no look-back, 4 no pack stats, 8 no repack
                encoder.encode(k, v, arena, 0, _phase_mode=mode)
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    encoder.encode(k, v, arena, 0, _phase_mode=mode)
                    times.append(time.perf_counter() - t0)
                t[mode] = float(np.median(times))
            phases = {"quantize (+ launch, uploads)": t[14], "repack": t[6] - t[14],
                      "pack statistics, sizes, payload offsets": t[2] - t[6], "look-back": t[1] - t[2],
                      "write": t[0] - t[1], "total": t[0]}
            breakdown[params.repack] = {name: round(x, 4) for name, x in phases.items()}
            print(f"8B 128K {params.repack}: " + ", ".join(f"{name} {1e3 * x:.1f} ms" for name, x in phases.items()),
                  flush=True)
        del arena

    prefill = None
    main_rec = [r for r in records if r["model"] == "llama-3.1-8b" and r["tokens"] == 131072
                and r["params"]["repack"] == "greedy" and r["params"]["granularity"] == "token-layer"]
    if main_rec:
        r = min(main_rec, key=lambda x: x["seconds"])
        flops, linear, attention = prefill_flops(SHAPES["llama-3.1-8b"], 131072)
        est = flops / (tflops * 1e12)
        prefill = dict(model="llama-3.1-8b", tokens=131072, flops=flops, linear_flops=linear,
                       attention_flops=attention, matmul_tflops=tflops, prefill_seconds_at_matmul_peak=est,
                       encoder_seconds=r["seconds"], fraction=r["seconds"] / est,
                       how="prefill FLOPs (linear 2*tokens*weights + causal attention 2*2*tokens^2/2*head_dim*"
                           "heads*layers) / measured fp16 matmul FLOP/s: a lower bound on the prefill's time, "
                           "so the fraction is an upper bound")
        print(f"128K-token prefill of Llama-3.1-8B: {flops / 1e15:.2f} PFLOP -> >= {est:.2f} s at "
              f"{tflops:.0f} TFLOP/s; compressing its KV cache takes {r['seconds']:.3f} s = "
              f"{100 * r['seconds'] / est:.2f}% of it")
    print_table(records, ["model", "batch", "threads", "blocks", "seconds", "input_gbps", "ratio"])
    write_json(args.out, {**header(device), "matmul_tflops_fp16": tflops, "records": records,
                                "prefill_128k": prefill, "phase_breakdown_8b_128k_seconds": breakdown,
                                "phase_profile_8b_128k": profile,
                                "target": "100 GB/s of fp16 K+V input for llama-3.1-8b, token-layer, greedy, "
                                          "pack 16, block 64"})


if __name__ == "__main__":
    main()
