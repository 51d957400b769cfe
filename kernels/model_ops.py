"""Launchers of kernels/model_ops.cu: RMSNorm, RoPE with the q/k/v split, SiLU*up, K/V append at
per-sequence offsets read from device memory, the decode GEMVs, greedy argmax and device counters. Each checks what it is given and says what it refuses."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from packkv.kernels.launch import kernel_source, launch

THREADS = 256
MAX_ROWS = 16       # linear_rows handles up to this many rows (sequences of a decode step)
WARP_KERNEL_MAX_ROWS = 8   # the warp-per-feature GEMV's limit (model_ops.cu's MAX_ROWS)
MMA_MIN_ROWS = 2    # from this many rows on, linear_rows runs on tensor cores (bench/linear.py measures)
NULL = np.uintp(0)  # a null device pointer argument


@lru_cache(maxsize=None)
def _module():
    import cupy
    return cupy.RawModule(code=kernel_source("model_ops.cu"), options=("-std=c++17",))


def _kernel(name: str):
    return _module().get_function(name)


@lru_cache(maxsize=None)
def _static_shared_bytes(name: str) -> int:
    return int(_kernel(name).shared_size_bytes)


def _require(array, name: str, dtype, ndim: int) -> None:
    import cupy
    if not isinstance(array, cupy.ndarray):
        raise ValueError(f"{name} must be a CuPy array on the GPU, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _blocks(n: int) -> tuple[int]:
    return ((n + THREADS - 1) // THREADS,)


def rms_norm(x, weight, eps: float, out=None):
    """x fp32 [..., H], weight fp32 [H] -> fp16 [..., H]."""
    import cupy
    _require(weight, "weight", np.float32, 1)
    if x.dtype != np.float32 or x.shape[-1] != weight.shape[0] or not x.flags.c_contiguous:
        raise ValueError(f"rms_norm: x must be C-contiguous fp32 [..., {weight.shape[0]}], got {x.dtype} {x.shape}")
    out = cupy.empty(x.shape, np.float16) if out is None else out
    rows, hidden = x.size // weight.shape[0], weight.shape[0]
    threads = min(1024, -(-hidden // 128) * 32)    # ~4 elements per thread: few loads in each thread's chain
    launch(_kernel("rms_norm"), (rows,), (threads,), (x, weight, out, np.int32(hidden), np.float32(eps)))
    return out


def rope_split(qkv, start, cos_table, sin_table, q_heads: int, kv_heads: int, head_dim: int):
    """qkv fp16 [B, T, (q_heads + 2 kv_heads) * head_dim], start int32 [B] (position of each sequence's
    first new token) -> q [B, q_heads, T, D], k, v [B, kv_heads, T, D] fp16, q and k rotated."""
    import cupy
    B, T = _check_rope(qkv, start, q_heads, kv_heads, head_dim)
    q = cupy.empty((B, q_heads, T, head_dim), np.float16)
    k = cupy.empty((B, kv_heads, T, head_dim), np.float16)
    v = cupy.empty((B, kv_heads, T, head_dim), np.float16)
    _launch_rope(qkv, start, cos_table, sin_table, q, kv_heads, k=k, v=v)
    return q, k, v


def rope_split_into_cache(qkv, start, cos_table, sin_table, q_heads: int, kv_heads: int, head_dim: int,
                          cache_k, cache_v, write_start):
    """rope_split, with k (rotated) and v written into cache_k, cache_v [B, kv_heads, capacity, D] (fp16
    layer slices, contiguous per sequence) at token offsets write_start int32 [B] instead of returned:
    RoPE and the decode step's K/V append in one launch. Returns q."""
    import cupy
    B, T = _check_rope(qkv, start, q_heads, kv_heads, head_dim)
    _require(write_start, "write_start", np.int32, 1)
    capacity = _check_cache_slices(cache_k, cache_v, B, kv_heads, head_dim, write_start)
    q = cupy.empty((B, q_heads, T, head_dim), np.float16)
    _launch_rope(qkv, start, cos_table, sin_table, q, kv_heads, cache_k=cache_k, cache_v=cache_v,
                 write_start=write_start, batch_stride=cache_k.strides[0] // 2, capacity=capacity)
    return q


def _check_rope(qkv, start, q_heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    _require(qkv, "qkv", np.float16, 3)
    _require(start, "start", np.int32, 1)
    B, T, width = qkv.shape
    if width != (q_heads + 2 * kv_heads) * head_dim or start.shape[0] != B or head_dim % 2:
        raise ValueError(f"rope_split: qkv {qkv.shape} does not hold {q_heads} + 2 x {kv_heads} heads of "
                         f"{head_dim}, or start {start.shape} is not [{B}]")
    return B, T


def _launch_rope(qkv, start, cos_table, sin_table, q, kv_heads: int, k=NULL, v=NULL, cache_k=NULL, cache_v=NULL,
                 write_start=NULL, batch_stride: int = 0, capacity: int = 0) -> None:
    """rope_split's one kernel: k and v to their own arrays, or (cache_k given) into the cache's slots."""
    B, q_heads, T, head_dim = q.shape
    n = B * T * (q_heads + 2 * kv_heads) * head_dim // 2
    launch(_kernel("rope_split"), _blocks(n), (THREADS,), (qkv, start, cos_table, sin_table, q, k, v, np.int32(B),
                                                   np.int32(T), np.int32(q_heads), np.int32(kv_heads),
                                                   np.int32(head_dim), cache_k, cache_v, write_start,
                                                   np.int64(batch_stride), np.int32(capacity)))


def silu_mul(gate_up):
    """gate_up fp16 [..., 2I] -> silu(gate) * up, fp16 [..., I]."""
    import cupy
    if gate_up.dtype != np.float16 or gate_up.shape[-1] % 2 or not gate_up.flags.c_contiguous:
        raise ValueError(f"silu_mul: gate_up must be C-contiguous fp16 [..., 2I], got {gate_up.dtype} {gate_up.shape}")
    inner = gate_up.shape[-1] // 2
    act = cupy.empty(gate_up.shape[:-1] + (inner,), np.float16)
    rows = act.size // inner
    launch(_kernel("silu_mul"), _blocks(act.size), (THREADS,), (gate_up, act, np.int32(rows), np.int32(inner)))
    return act


def append_kv(k, v, cache_k, cache_v, start) -> None:
    """Write k, v fp16 [B, Hkv, T, D] into cache_k, cache_v [B, Hkv, capacity, D] (layer slices whose
    batch stride may exceed Hkv * capacity * D) at token offsets start int32 [B], read on the device."""
    _require(k, "k", np.float16, 4)
    _require(v, "v", np.float16, 4)
    _require(start, "start", np.int32, 1)
    B, H, T, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"append_kv: k {k.shape} and v {v.shape} differ")
    capacity = _check_cache_slices(cache_k, cache_v, B, H, D, start)
    batch_stride = cache_k.strides[0] // 2
    launch(_kernel("append_kv"), _blocks(k.size), (THREADS,), (k, v, cache_k, cache_v, start, np.int32(B), np.int32(H),
                                                       np.int32(T), np.int32(D), np.int64(batch_stride),
                                                       np.int32(capacity)))


def _check_cache_slices(cache_k, cache_v, B: int, H: int, D: int, start) -> int:
    """The capacity (tokens) of fp16 cache slices [B, H, capacity, D], contiguous per sequence."""
    if cache_k.shape[:2] != (B, H) or cache_k.shape[3] != D or cache_v.shape != cache_k.shape or start.shape[0] != B:
        raise ValueError(f"K/V of [{B}, {H}, T, {D}] do not fit caches {cache_k.shape}, {cache_v.shape} "
                         f"(with {start.shape[0]} offsets)")
    if cache_k.dtype != np.float16 or cache_v.dtype != np.float16 or cache_k.strides != cache_v.strides or \
            cache_k.strides[1:] != (cache_k.shape[2] * D * 2, D * 2, 2):
        raise ValueError("cache slices must be fp16 with contiguous [Hkv, capacity, D] per sequence")
    return cache_k.shape[2]


def linear_rows(x, weight, bias=None, residual=None, swiglu: bool = False, norm_weight=None, eps: float = 0.0,
                kernel: str = "auto"):
    """y = x . weight^T (+ bias) for x fp16 [..., in] with at most MAX_ROWS rows, weight fp16 [out, in]
    (in a multiple of 8), bias fp32 [out] or None -> fp16 [..., out]. Fused variants:
    norm_weight fp32 [in]: x is the fp32 residual stream and the product takes rms_norm(x, norm_weight, eps);
    residual fp32 [..., out]: residual += y in fp32, in place (returns residual; y is never rounded);
    swiglu: weight holds gate then up rows [2 I, in] -> silu(gate) * up, fp16 [..., I].
    kernel: "warp" (a warp per output feature, CUDA cores, up to 8 rows), "mma" (tensor cores), or "auto"
    (mma from MMA_MIN_ROWS rows on)."""
    import cupy
    _require(weight, "weight", np.float16, 2)
    out_features, in_features = weight.shape
    rows = x.size // in_features if x.shape[-1] == in_features else -1
    x_dtype = np.float16 if norm_weight is None else np.float32
    if x.dtype != x_dtype or rows < 1 or rows > MAX_ROWS or in_features % 8 or not x.flags.c_contiguous:
        raise ValueError(f"linear_rows: x must be C-contiguous {np.dtype(x_dtype).name} [..., {in_features}] with "
                         f"1..{MAX_ROWS} rows (and in_features a multiple of 8), got {x.dtype} {x.shape}")
    for name, vector, size in (("bias", bias, out_features), ("norm_weight", norm_weight, in_features)):
        if vector is not None and (vector.dtype != np.float32 or vector.shape != (size,)):
            raise ValueError(f"linear_rows: {name} must be fp32 [{size}], got {vector.dtype} {vector.shape}")
    if swiglu:
        if residual is not None or out_features % 2:
            raise ValueError("linear_rows: swiglu needs an even number of weight rows (gate, up) and no residual")
        out_features //= 2
    y = cupy.empty(x.shape[:-1] + (out_features,), np.float16) if residual is None else None
    if residual is not None and (residual.dtype != np.float32 or residual.shape != x.shape[:-1] + (out_features,)
                                 or not residual.flags.c_contiguous):
        raise ValueError(f"linear_rows: residual must be C-contiguous fp32 {x.shape[:-1] + (out_features,)}, got "
                         f"{residual.dtype} {residual.shape}")
    if kernel == "auto":
        kernel = "mma" if rows >= MMA_MIN_ROWS else "warp"
    if kernel not in ("warp", "mma") or (kernel == "warp" and rows > WARP_KERNEL_MAX_ROWS):
        raise ValueError(f"linear_rows: kernel must be 'auto', 'mma' or 'warp' (up to {WARP_KERNEL_MAX_ROWS} rows), "
                         f"got {kernel!r} for {rows} rows")
    # a warp per output feature, or a CTA per 16 features (linear_rows_mma)
    name, features_per_cta = ("linear_rows", THREADS // 32) if kernel == "warp" else ("linear_rows_mma", 16)
    shared = 0 if norm_weight is None else rows * in_features * 2       # the normalised rows, fp16
    function = _kernel(name)
    if shared and shared + _static_shared_bytes(name) > 48 * 1024:   # static (mma: partial tiles) + dynamic
        function.max_dynamic_shared_size_bytes = shared
    launch(function, ((out_features + features_per_cta - 1) // features_per_cta,), (THREADS,),
             (x, NULL if norm_weight is None else norm_weight, np.float32(eps), weight,
              NULL if bias is None else bias, NULL if y is None else y,
              NULL if residual is None else residual, np.int32(swiglu), np.int32(rows),
              np.int32(in_features), np.int32(out_features)), shared_mem=shared)
    return residual if y is None else y


def argmax_rows(logits, out) -> None:
    """logits fp32 [rows, n] (rows may be strided, elements contiguous) -> out int32 [rows] (C-contiguous),
    the first index of each row's largest value (NaN counts as largest, as in NumPy)."""
    import cupy
    if not isinstance(logits, cupy.ndarray) or logits.dtype != np.float32 or logits.ndim != 2 or logits.strides[1] != 4:
        raise ValueError(f"argmax_rows: logits must be fp32 [rows, n] on the GPU with contiguous rows, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {getattr(logits, 'shape', '')}")
    _require(out, "out", np.int32, 1)
    if out.shape[0] != logits.shape[0] or logits.shape[1] < 1:
        raise ValueError(f"argmax_rows: out {out.shape} must hold one id per row of logits {logits.shape}")
    launch(_kernel("argmax_rows"), (logits.shape[0],), (1024,), (logits, np.int64(logits.strides[0] // 4),
                                                        np.int32(logits.shape[1]), out))


def add_one(counters) -> None:
    """counters int32 [n] += 1 on the current stream."""
    _require(counters, "counters", np.int32, 1)
    launch(_kernel("add_one"), _blocks(counters.size), (THREADS,), (counters, np.int32(counters.size)))
