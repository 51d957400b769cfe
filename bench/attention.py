"""Decode attention over a PackKV-compressed cache vs fp16 baselines, per layer, on one GPU.

    python bench/attention.py [--contexts 1024 4096 16384 32768 65536 131072] [--data .stage/bench] [--slots 1 2]

Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128) and SmolLM2-135M (9/3/64), one
sequence. KV data: 'real' = SmolLM2 K/V of Brown-corpus text (bench/dump_kv.py's dump in .stage/kv; for the 8B shape two
SmolLM2 heads are concatenated to head_dim 128 and 8 such heads stacked), 'random' = Gaussian with
SmolLM2's per-channel standard deviations. The NumPy encoder is slow, so 32 distinct blocks per dataset
are encoded (default codec params: rel_k 0.1, rel_v 0.2, token-layer, greedy, pack 16, block 64) and their
records copied to fill each context ("tiled_from_blocks": 32); every layer copy is a distinct arena, so
nothing is served from L2 that a real decode step would not find there.

Methods (each timed as a CUDA graph replaying NL layer copies, NL chosen so the bytes swept exceed ~4x
the L2; time per layer = total / NL):
  packkv_fused   compressed_decode_attention: scores, softmax, V over all blocks + a 1-token window, as
                 PackkvCache launches it for PARAMS: the NARROW build (no > 4-bit unpack path) where their
                 bounds allow it, as PARAMS' do, and attention_kernels.item_slots' staging slots per warp
  packkv_fused_wide  the same in the wide build (what bounds tighter than 1/14.98 need), for comparison
  packkv_fused_1slot, packkv_fused_2slots  with --slots 1 2: the first row with one / two staging slots per
                 warp forced in item mode (one: 3 CTAs per SM, two: the double-buffered pipeline at 2; each
                 its own splits); tile mode (short contexts) is the same kernel as the first row
  packkv_k_gemv  K-GEMV: q . K_hat^T over compressed blocks (fp32 scores)
  packkv_v_gemv  V-GEMV: p . V_hat over compressed blocks (fp16 p)
  cublas_k       cupy.matmul fp16 K . q^T (batched over KV heads; K [L, D] row-major as stored, the GQA
                 group's queries as the G columns: the same products as q . K^T without copying K)
  cublas_v       cupy.matmul fp16 p . V
  sdpa_fp16      torch scaled_dot_product_attention fp16 decode (enable_gqa), when torch imports
fp16_equiv_gbps = fp16 bytes of the K/V the method covers / time; read_gbps = bytes actually read / time
(compressed records for packkv: the whole record for fused, token section + K or V sections for the
GEMVs). copy_gbps = a 1 GiB device-to-device copy, counted as bytes read + bytes written per second.
Writes bench/results/attention.json and attention.png.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, copy_gbps, graph_time_us, header, print_table, real_heads, write_json  # noqa: E402

from packkv import codec  # noqa: E402
from packkv.codec import CodecParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"llama-3.1-8b (32/8/128)": (32, 8, 128), "smollm2-135m (9/3/64)": (9, 3, 64)}
N_DISTINCT = 32
PARAMS = CodecParams(rel_k=0.1, rel_v=0.2, granularity="token-layer", repack="greedy", pack=16, block=64)
NARROW = codec.max_pack_width([PARAMS.rel_k, PARAMS.rel_v]) <= 4  # PackkvCache.narrow's rule for these bounds
SWEEP_BYTES = 200e6          # bytes swept per timed graph (L2 is 50 MB on H100)


# ---------------------------------------------------------------------------------------------------
# Data: 32 distinct encoded blocks per (shape, kv_data)
# ---------------------------------------------------------------------------------------------------

def make_kv(shape_name: str, kind: str, rng) -> tuple[np.ndarray, np.ndarray, str]:
    """fp16 K, V [32 blocks, Hkv, 64, D] and a note on where they come from."""
    _, Hkv, D = SHAPES[shape_name]
    T = PARAMS.block
    hk, hv = real_heads()                                                  # [12, N, 64]
    n_heads, N, D0 = hk.shape
    per_set = N // T                                                       # blocks per head set
    if kind == "real":
        sets_k, sets_v = [], []
        shift = 0
        while sum(s.shape[0] for s in sets_k) < N_DISTINCT:
            if D == D0 and Hkv == 3:    # SmolLM2 itself: one layer's 3 heads per set
                layer = shift % (n_heads // 3)
                K, V = hk[3 * layer:3 * layer + 3], hv[3 * layer:3 * layer + 3]
                note = "SmolLM2-135M K/V (post-RoPE) of Brown-corpus text, layers of the dump"
            else:                       # head_dim 128 from two SmolLM2 heads, Hkv such heads
                pick = lambda h, r: (h + r * (5 + shift)) % n_heads
                K = np.stack([np.concatenate([hk[pick(h, r)] for r in range(D // D0)], -1) for h in range(Hkv)])
                V = np.stack([np.concatenate([hv[pick(h, r)] for r in range(D // D0)], -1) for h in range(Hkv)])
                note = "SmolLM2-135M K/V heads concatenated to head_dim 128 (real values, synthetic layout)"
            blocks = lambda a: a[:, :per_set * T].reshape(Hkv, per_set, T, D).transpose(1, 0, 2, 3)
            sets_k.append(blocks(K)); sets_v.append(blocks(V))
            shift += 1
        k, v = np.concatenate(sets_k)[:N_DISTINCT], np.concatenate(sets_v)[:N_DISTINCT]
    else:
        sk, sv = hk.std(axis=1), hv.std(axis=1)                            # [12, 64] per-channel std
        sig_k = np.stack([np.concatenate([sk[(h + 5 * r) % n_heads] for r in range(-(-D // D0))])[:D] for h in range(Hkv)])
        sig_v = np.stack([np.concatenate([sv[(h + 5 * r) % n_heads] for r in range(-(-D // D0))])[:D] for h in range(Hkv)])
        k = rng.standard_normal((N_DISTINCT, Hkv, T, D)) * sig_k[None, :, None, :]
        v = rng.standard_normal((N_DISTINCT, Hkv, T, D)) * sig_v[None, :, None, :]
        note = "Gaussian with SmolLM2's per-channel standard deviations (random)"
    return k.astype(np.float16), v.astype(np.float16), note


def dataset(shape_name: str, kind: str, folder: Path) -> dict:
    """Encoded records (cached in folder): buffer, record offsets, byte breakdown, bits per element."""
    tag = shape_name.split()[0] + "-" + kind
    path = folder / f"{tag}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        out = {key: z[key] for key in z.files}
        out["note"] = str(out["note"])
        return out
    rng = np.random.default_rng(0)
    k, v, note = make_kv(shape_name, kind, rng)
    t0 = time.perf_counter()
    buf, offs, _ = codec.encode_blocks(k, v, PARAMS)
    print(f"  encoded {tag}: {len(offs) - 1} blocks in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    _, Hkv, D = SHAPES[shape_name]
    per = [codec.byte_breakdown(buf[offs[i]:offs[i + 1]]) for i in range(len(offs) - 1)]
    sizes = np.diff(offs)
    k_bytes = np.array([p["record_header"] + p["k_step"] + p["v_step"] + p["k_offset"] + p["v_offset"]
                        + p["k_pack_header"] + p["k_payload"] + p["padding"] // 2 for p in per])
    v_bytes = np.array([p["record_header"] + p["k_step"] + p["v_step"] + p["k_offset"] + p["v_offset"]
                        + p["v_pack_header"] + p["v_payload"] + p["padding"] // 2 for p in per])
    out = dict(buffer=buf, offsets=offs, sizes=sizes, k_bytes=k_bytes, v_bytes=v_bytes, note=np.array(note),
               bits_per_element=np.array(8 * buf.size / (len(sizes) * Hkv * PARAMS.block * D * 2)))
    np.savez(path, **out)
    out["note"] = note
    return out


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

def torch_graph_time_us(torch, calls, min_ms: float = 60.0) -> float:
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); graph.replay(); end.record(); end.synchronize()
    once = start.elapsed_time(end)
    reps = max(3, min(200, int(min_ms / max(once, 1e-3))))
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record(); end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


# ---------------------------------------------------------------------------------------------------
# One (shape, data, context)
# ---------------------------------------------------------------------------------------------------

def bench_packkv(cupy, ak, shape_name, data, context, rng, forced_slots=()) -> list[dict]:
    Hq, Hkv, D = SHAPES[shape_name]
    G, T = Hq // Hkv, PARAMS.block
    n = context // T
    sizes = data["sizes"]
    starts = data["offsets"][:-1]
    per_layer = float(np.mean(sizes)) * n
    NL = int(min(256, max(2, math.ceil(SWEEP_BYTES / per_layer))))
    # record i of layer l: a distinct copy of one of the 32 encoded records
    pick = (np.arange(n)[None, :] * 7 + np.arange(NL)[:, None] * 3) % len(sizes)
    lens = sizes[pick]
    offs = np.concatenate([[0], np.cumsum(lens.ravel())])[:-1].reshape(NL, n).astype(np.int64)
    buf = data["buffer"]
    arena = cupy.asarray(np.concatenate([buf[starts[r]:starts[r] + sizes[r]] for r in pick.ravel()]
                                        + [np.zeros(64, np.uint8)]))
    tables = [cupy.asarray(offs[l][None, :]) for l in range(NL)]
    nb = cupy.asarray(np.array([n], np.int32))
    q = cupy.asarray(rng.standard_normal((1, Hq, D)).astype(np.float16))
    wk = cupy.asarray(rng.standard_normal((1, Hkv, 64, D)).astype(np.float16))
    wv = cupy.asarray(rng.standard_normal((1, Hkv, 64, D)).astype(np.float16))
    wl = cupy.asarray(np.array([1], np.int32))
    n_splits = ak.default_splits(1, Hkv, G, n, T)                  # the GEMVs (item mode)
    variants = {"packkv_fused": (NARROW, None), "packkv_fused_wide": (False, None),    # method: (narrow, slots)
                **{f"packkv_fused_{k}slot{'s' if k > 1 else ''}": (NARROW, k) for k in forced_slots}}
    geometry = {slots: ak.decode_geometry(1, Hkv, G, D, n, T, slots=slots) for _, slots in variants.values()}
    fused_splits = max(splits for _, splits in geometry.values())
    ws = cupy.empty(max(ak.attention_workspace_size(1, Hq, D, max(n_splits, fused_splits)), Hq * n_splits * D),
                    np.float32)
    out = cupy.empty((1, Hq, D), np.float16)
    scores = cupy.empty((1, Hq, n * T), np.float32)
    p = cupy.asarray((rng.random((1, Hq, n * T)) / (n * T)).astype(np.float16))
    vout = cupy.empty((1, Hq, D), np.float32)
    # the arena's address in device memory, made once: made per call, its upload cannot be captured, and the
    # fused kernel fell back to eager launches (cuda_graph false) unnoticed
    arena_address = cupy.asarray([arena.data.ptr], dtype=np.uint64)
    fused = {method: [lambda t=t, narrow=narrow, slots=slots: ak.compressed_decode_attention(
                 q, arena, t, nb, wk, wv, wl, PARAMS, out=out, workspace=ws, n_splits=geometry[slots][1],
                 tiles=geometry[slots][0], arena_address=arena_address, narrow=narrow, slots=slots) for t in tables]
             for method, (narrow, slots) in variants.items()}
    kg = [lambda t=t: ak.k_gemv(q, arena, t, nb, PARAMS, Hkv, out=scores, n_splits=n_splits) for t in tables]
    vg = [lambda t=t: ak.v_gemv(p, arena, t, nb, PARAMS, Hkv, D, out=vout, workspace=ws, n_splits=n_splits)
          for t in tables]
    fp16_kv = context * Hkv * D * 2
    mean_rec, mean_k, mean_v = float(np.mean(sizes)), float(np.mean(data["k_bytes"])), float(np.mean(data["v_bytes"]))
    rows = []
    methods = [(method, fused[method], 2 * fp16_kv, mean_rec * n) for method in variants]
    methods += [("packkv_k_gemv", kg, fp16_kv, mean_k * n), ("packkv_v_gemv", vg, fp16_kv, mean_v * n)]
    for method, calls, fp16_bytes, read_bytes in methods:
        us, graphed = graph_time_us(cupy, calls)
        row = dict(method=method, us_per_layer=us, fp16_equiv_gbps=fp16_bytes / us / 1e3,
                   read_gbps=read_bytes / us / 1e3, layers_swept=NL, cuda_graph=graphed, n_splits=n_splits,
                   tiles=False)
        if method in variants:
            slots = variants[method][1]
            tiles, row["n_splits"] = geometry[slots]
            row.update(tiles=tiles, slots=None if tiles else ak.item_slots(slots, 1, Hkv, G, n, T))
        rows.append(row)
    del arena, tables
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


def bench_dense(cupy, torch, shape_name, context, rng) -> list[dict]:
    Hq, Hkv, D = SHAPES[shape_name]
    G = Hq // Hkv
    per_layer = 2 * context * Hkv * D * 2
    NL = int(min(256, max(2, math.ceil(SWEEP_BYTES / per_layer))))
    Ks = [cupy.asarray(rng.standard_normal((Hkv, context, D), dtype=np.float32).astype(np.float16))]
    Vs = [cupy.asarray(rng.standard_normal((Hkv, context, D), dtype=np.float32).astype(np.float16))]
    for _ in range(NL - 1):      # distinct copies (values do not matter for timing)
        Ks.append(Ks[0].copy()); Vs.append(Vs[0].copy())
    qg = cupy.asarray(rng.standard_normal((Hkv, G, D)).astype(np.float16))
    pg = cupy.asarray((rng.random((Hkv, G, context)) / context).astype(np.float16))
    qt = cupy.ascontiguousarray(qg.transpose(0, 2, 1))
    sk = cupy.empty((Hkv, context, G), np.float16)
    ov = cupy.empty((Hkv, G, D), np.float16)
    fp16_kv = context * Hkv * D * 2
    rows = []
    ck = [lambda K=K: cupy.matmul(K, qt, out=sk) for K in Ks]
    cv = [lambda V=V: cupy.matmul(pg, V, out=ov) for V in Vs]
    for method, calls in (("cublas_k", ck), ("cublas_v", cv)):
        us, graphed = graph_time_us(cupy, calls)
        rows.append(dict(method=method, us_per_layer=us, fp16_equiv_gbps=fp16_kv / us / 1e3,
                         read_gbps=fp16_kv / us / 1e3, layers_swept=NL, cuda_graph=graphed))
    if torch is not None:
        F = torch.nn.functional
        qt = torch.from_dlpack(cupy.asarray(rng.standard_normal((1, Hq, 1, D)).astype(np.float16)))
        kts = [torch.from_dlpack(K)[None] for K in Ks]
        vts = [torch.from_dlpack(V)[None] for V in Vs]
        calls = [lambda k=k, v=v: F.scaled_dot_product_attention(qt, k, v, enable_gqa=True) for k, v in zip(kts, vts)]
        try:
            us = torch_graph_time_us(torch, calls)
            rows.append(dict(method="sdpa_fp16", us_per_layer=us, fp16_equiv_gbps=2 * fp16_kv / us / 1e3,
                             read_gbps=2 * fp16_kv / us / 1e3, layers_swept=NL, cuda_graph=True))
        except Exception as exc:
            print(f"  sdpa failed: {exc}", file=sys.stderr)
        torch.cuda.synchronize()
    del Ks, Vs
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


def load_torch():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def plot(records, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(SHAPES)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    styles = {"packkv_fused": "o-", "packkv_fused_wide": "x-", "packkv_fused_1slot": "o-.",
              "packkv_fused_2slots": "x-.", "packkv_k_gemv": "s--", "packkv_v_gemv": "^--",
              "cublas_k": "s:",
              "cublas_v": "^:", "sdpa_fp16": "o:"}
    for i, shape in enumerate(shapes):
        for j, kind in enumerate(("real", "random")):
            ax = axes[i][j]
            for method, style in styles.items():
                rs = [r for r in records if r["shape"] == shape and r["method"] == method
                      and (r["kv_data"] == kind or not method.startswith("packkv"))]
                rs.sort(key=lambda r: r["context"])
                if rs:
                    ax.plot([r["context"] for r in rs], [r["us_per_layer"] for r in rs], style, label=method)
            ax.set_xscale("log", base=2); ax.set_yscale("log")
            ax.set_title(f"{shape}, packkv on {kind} KV", fontsize=10)
            ax.set_xlabel("context (tokens)"); ax.set_ylabel("us per layer")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--data", type=Path, default=ROOT / ".stage" / "bench")
    ap.add_argument("--prepare-only", action="store_true", help="encode the datasets (CPU) and stop")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--slots", type=int, nargs="*", choices=[1, 2], default=[],
                    help="also time the fused kernel with this many staging slots per warp forced in item mode "
                         "(1: 3 CTAs per SM; 2: the double-buffered pipeline at 2), a row per count")
    args = ap.parse_args()
    datasets = {(s, kind): dataset(s, kind, args.data) for s in args.shapes for kind in ("real", "random")}
    if args.prepare_only:
        for key, d in datasets.items():
            print(key, f"{float(d['bits_per_element']):.3f} bits/element", d["note"])
        return
    import cupy
    from packkv.kernels import attention_kernels as ak
    from packkv.backend import get_backend
    device = get_backend("gpu").device_name
    torch = load_torch()
    for s in args.shapes:
        for slots in (1, 2):
            ak.precompile(SHAPES[s][2], PARAMS.pack, slots=slots)
            if NARROW:
                ak.precompile(SHAPES[s][2], PARAMS.pack, narrow=True, slots=slots)
    rng = np.random.default_rng(1)
    copy = copy_gbps(cupy)
    print(f"device {device}; device-to-device copy {copy:.0f} GB/s (read + write)", file=sys.stderr)
    records = []
    for shape in args.shapes:
        for context in args.contexts:
            for row in bench_dense(cupy, torch, shape, context, rng):
                records.append(dict(shape=shape, kv_data="random", context=context, **row))
            for kind in ("real", "random"):
                for row in bench_packkv(cupy, ak, shape, datasets[(shape, kind)], context, rng, args.slots):
                    records.append(dict(shape=shape, kv_data=kind, context=context, **row))
            print(f"  {shape} {context}: done", file=sys.stderr)
    for r in records:
        for key in ("us_per_layer", "fp16_equiv_gbps", "read_gbps"):
            r[key] = round(float(r[key]), 2)
    print_table(records, ["shape", "kv_data", "context", "method", "tiles", "slots", "n_splits", "us_per_layer",
                          "fp16_equiv_gbps", "read_gbps"])
    summary = targets(records, copy)
    for line in summary:
        print(line)
    payload = header(device)
    payload.update(copy_gbps=round(copy, 1), copy_gbps_counts="bytes read + bytes written per second",
                   params=dict(rel_k=PARAMS.rel_k, rel_v=PARAMS.rel_v, granularity=PARAMS.granularity,
                               repack=PARAMS.repack, pack=PARAMS.pack, block=PARAMS.block),
                   tiled_from_blocks=N_DISTINCT,
                   datasets={f"{s} / {k}": dict(note=d["note"], bits_per_element=round(float(d["bits_per_element"]), 3))
                             for (s, k), d in datasets.items()},
                   dense_baselines_kv_data="random fp16 values (timing does not depend on them)",
                   window_tokens=1, batch=1, targets=summary, records=records)
    write_json("attention.json", payload)
    plot(records, RESULTS / "attention.png")


def targets(records, copy) -> list[str]:
    """The issue's targets, as ratios measured side by side in this run."""
    out = []
    shape = "llama-3.1-8b (32/8/128)"
    get = lambda m, c, k="real": next((r for r in records if r["shape"] == shape and r["method"] == m
                                       and r["context"] == c and (r["kv_data"] == k or not m.startswith("packkv"))), None)
    for kind in ("real", "random"):
        for c in (32768, 131072):
            f, s = get("packkv_fused", c, kind), get("sdpa_fp16", c)
            if f and s:
                out.append(f"{shape} {kind} {c}: fused {f['us_per_layer']:.1f} us vs SDPA {s['us_per_layer']:.1f} us "
                           f"= {s['us_per_layer'] / f['us_per_layer']:.2f}x (target >= 3)")
            kg, ck = get("packkv_k_gemv", c, kind), get("cublas_k", c)
            if kg and ck:
                out.append(f"{shape} {kind} {c}: K-GEMV {ck['us_per_layer'] / kg['us_per_layer']:.2f}x cuBLAS (target >= 5)")
            vg, cv = get("packkv_v_gemv", c, kind), get("cublas_v", c)
            if vg and cv:
                out.append(f"{shape} {kind} {c}: V-GEMV {cv['us_per_layer'] / vg['us_per_layer']:.2f}x cuBLAS (target >= 10)")
        f = get("packkv_fused", 131072, kind)
        if f:
            out.append(f"{shape} {kind} 131072: fused reads compressed bytes at {f['read_gbps']:.0f} GB/s = "
                       f"{f['read_gbps'] / copy:.0%} of copy bandwidth (target >= 70%)")
    return out


if __name__ == "__main__":
    main()
