"""The KV-cache interface, and its dense fp16 kind.

A model step with T new tokens per sequence does, for every layer i:
    cache.append(i, k, v)      # k, v [B, kv_heads, T, head_dim], K after RoPE
    out = cache.attend(i, q)   # q [B, heads, T, head_dim]: attention over everything cached, causal
and then, once, `cache.advance(T)`: the new tokens become part of every sequence. A cache that compresses
does its block work in `advance`, for all layers at once, never inside the per-layer calls.

Sequences of one batch may have different lengths; `positions(T)` gives each new token's position.
Every cache reports the bytes it holds (`bytes_used`) and the bytes it has set aside (`bytes_reserved`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packkv.attention import causal_attention, causal_mask
from packkv.backend import Backend, out_of_memory_error
from packkv.errors import PackkvError


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    batch: int
    max_context: int


class KVCache:
    """What every kind shares: per-sequence lengths, positions, and the stats line."""

    kind = "abstract"

    def __init__(self, shape: CacheShape, backend: Backend):
        self.shape, self.backend = shape, backend
        self.lengths = np.zeros(shape.batch, dtype=np.int64)   # committed tokens per sequence (host)
        self.pending = 0                                         # tokens appended this step, not yet committed

    def positions(self, new_tokens: int):
        """[B, T] positions of the next T tokens of every sequence; refuses to grow past max_context."""
        longest = int(self.lengths.max()) + new_tokens
        if longest > self.shape.max_context:
            raise PackkvError(f"the sequence would reach {longest} tokens, more than the cache's context of "
                              f"{self.shape.max_context} (raise --max-context, up to the model's limit)")
        return self.backend.xp.asarray(self.lengths[:, None] + np.arange(new_tokens)[None, :])

    def check_append(self, layer: int, k, v) -> int:
        s = self.shape
        expected = (s.batch, s.kv_heads, k.shape[2], s.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"append(layer {layer}): k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                             f"[batch, kv_heads, T, head_dim] = {expected}")
        if not 0 <= layer < s.layers:
            raise ValueError(f"append: layer {layer} is outside 0..{s.layers - 1}")
        if layer == 0:
            self.pending = k.shape[2]
        elif k.shape[2] != self.pending:
            raise ValueError(f"append(layer {layer}): {k.shape[2]} tokens, but layer 0 appended {self.pending}")
        return k.shape[2]

    def advance(self, new_tokens: int) -> None:
        self.lengths += new_tokens
        self.pending = 0

    def fp16_bytes(self) -> int:
        """What the committed tokens take as plain fp16 K and V: the yardstick of compression."""
        s = self.shape
        return int(self.lengths.sum()) * s.layers * s.kv_heads * s.head_dim * 2 * 2

    def stats(self) -> dict:
        used = self.bytes_used()
        return {"cache": self.kind, "kv_bytes_used": used, "kv_bytes_reserved": self.bytes_reserved(),
                "compression_ratio": self.fp16_bytes() / used if used else None}


class DenseCache(KVCache):
    """K and V as they come (fp16 on the GPU, fp32 on the CPU), preallocated for max_context tokens."""

    kind = "dense"

    def __init__(self, shape: CacheShape, backend: Backend):
        super().__init__(shape, backend)
        xp = backend.xp
        dims = (shape.layers, shape.batch, shape.kv_heads, shape.max_context, shape.head_dim)
        nbytes = 2 * int(np.prod(dims)) * np.dtype(backend.dtype).itemsize
        try:
            self.k = xp.zeros(dims, dtype=backend.dtype)
            self.v = xp.zeros(dims, dtype=backend.dtype)
        except (MemoryError, _gpu_oom_type()) as exc:
            raise out_of_memory_error(nbytes, f"the dense KV cache for {shape.max_context} tokens") from exc

    def append(self, layer: int, k, v) -> None:
        T = self.check_append(layer, k, v)
        if layer == 0:  # one mask per step, shared by every layer
            key_lengths = self.lengths + T
            self.step_mask = causal_mask(self.backend.xp, key_lengths, T, int(key_lengths.max()))
        for b, start in enumerate(self.lengths):
            self.k[layer, b, :, start:start + T] = k[b]
            self.v[layer, b, :, start:start + T] = v[b]

    def attend(self, layer: int, q):
        end = int(self.lengths.max()) + self.pending
        return causal_attention(self.backend.xp, q, self.k[layer, :, :, :end], self.v[layer, :, :, :end],
                                self.step_mask)

    def bytes_per_token(self) -> int:
        s = self.shape
        return 2 * s.layers * s.kv_heads * s.head_dim * np.dtype(self.backend.dtype).itemsize

    def bytes_used(self) -> int:
        return int(self.lengths.sum()) * self.bytes_per_token()

    def bytes_reserved(self) -> int:
        return self.shape.batch * self.shape.max_context * self.bytes_per_token()


def _gpu_oom_type():
    try:
        import cupy
        return cupy.cuda.memory.OutOfMemoryError
    except ImportError:
        return MemoryError


CACHE_KINDS = {"dense": DenseCache}


def make_cache(kind: str, shape: CacheShape, backend: Backend, **params) -> KVCache:
    if kind not in CACHE_KINDS:
        raise PackkvError(f"unknown cache kind {kind!r} (available: {', '.join(CACHE_KINDS)})")
    return CACHE_KINDS[kind](shape, backend, **params)
