"""Launcher of kernels/dense_attention.cu: one query token per sequence over an fp16 K/V cache, with
the sequences' lengths read from device memory (graph-capturable)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from packkv.kernels.launch import kernel_source, launch

TILE, THREADS, MERGE_THREADS, MAX_ACC = 32, 128, 1024, 16


@lru_cache(maxsize=None)
def _kernels(head_dim: int):
    import cupy
    module = cupy.RawModule(code=kernel_source("dense_attention.cu"),
                            options=("-std=c++17", f"-DHEAD_DIM={head_dim}"))
    return module.get_function("dense_attention_split"), module.get_function("dense_attention_merge")


@lru_cache(maxsize=None)
def _multiprocessors() -> int:
    import cupy
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def default_splits(batch: int, kv_heads: int, capacity: int) -> int:
    """At most four CTAs per SM (the kernel's residency), so that the grid is one wave (rounding up left
    a second, mostly idle one: 576 CTAs on 528 slots for 8 sequences x 8 KV heads), each with at least two
    tiles of keys at full capacity (fewer, longer splits when the context is short)."""
    wanted = 4 * _multiprocessors() // (batch * kv_heads)
    return max(1, min(wanted, -(-capacity // (2 * TILE))))


def dense_decode_attention(q, k_cache, v_cache, starts, extra: int = 1, splits: int | None = None):
    """q fp16 [B, Hq, D]; k_cache, v_cache fp16 [B, Hkv, capacity, D] (each sequence's [Hkv, capacity, D]
    contiguous; the batch stride may be larger, e.g. a layer slice); starts int32 [B] on the device:
    sequence b attends to its first starts[b] + extra keys. Returns fp16 [B, Hq, D]."""
    import cupy
    for name, array, ndim in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(array, cupy.ndarray) or array.dtype != np.float16 or array.ndim != ndim:
            raise ValueError(f"dense_decode_attention: {name} must be a {ndim}-d fp16 CuPy array, got "
                             f"{type(array).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}")
    B, Hq, D = q.shape
    _, Hkv, capacity, _ = k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or v_cache.shape != k_cache.shape or Hq % Hkv:
        raise ValueError(f"dense_decode_attention: q {q.shape} does not fit k_cache {k_cache.shape} / v_cache {v_cache.shape}")
    if k_cache.strides != v_cache.strides or k_cache.strides[1:] != (capacity * D * 2, D * 2, 2):
        raise ValueError("dense_decode_attention: each sequence's [Hkv, capacity, D] must be contiguous, K and V alike")
    if D % 8 or D > 256 or (Hq // Hkv) * D > THREADS * MAX_ACC:
        raise ValueError(f"dense_decode_attention: head_dim {D} with {Hq // Hkv} query heads per KV head is not "
                         f"supported (head_dim a multiple of 8 up to 256, group * head_dim <= {THREADS * MAX_ACC})")
    if not isinstance(starts, cupy.ndarray) or starts.dtype != np.int32 or starts.shape != (B,):
        raise ValueError(f"dense_decode_attention: starts must be an int32 CuPy array of shape ({B},)")
    G = Hq // Hkv
    splits = splits or default_splits(B, Hkv, capacity)
    q = cupy.ascontiguousarray(q)
    partial_acc = cupy.empty(B * Hkv * splits * G * D, np.float32)
    partial_ml = cupy.empty(B * Hkv * splits * G * 2, np.float32)
    out = cupy.empty((B, Hq, D), np.float16)
    split_kernel, merge_kernel = _kernels(D)
    shared = (G * D + G * TILE + 3 * G) * 4 + 2 * TILE * (D + 2) * 2      # K and V tiles
    launch(split_kernel, (splits, Hkv, B), (THREADS,),
                 (q, k_cache, v_cache, starts, np.int32(extra), np.int32(Hkv), np.int32(G),
                  np.int32(capacity), np.int64(k_cache.strides[0] // 2), np.float32(1 / np.sqrt(D)),
                  partial_acc, partial_ml), shared_mem=shared)
    launch(merge_kernel, (B, Hq), (MERGE_THREADS,), (partial_acc, partial_ml, np.int32(splits), np.int32(G), np.int32(D), out),
                 shared_mem=splits * 4)
    return out
