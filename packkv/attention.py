"""Attention over a cache: the reference computation, written against `xp`.

Later kinds of cache dispatch to fused GPU kernels; every kernel is tested against these functions.
"""
from __future__ import annotations

import numpy as np


def causal_mask(xp, key_lengths, new_tokens: int, key_capacity: int):
    """[B, T, L] bool: which of L keys each of the last T queries of every sequence may see, or None when
    every query sees every key (one new token per sequence, all of the same length: plain decode).

    Sequence b has key_lengths[b] valid keys, the last T of which are the queries' own tokens; query t sits
    at position key_lengths[b] - T + t and sees keys up to its own position. Built on the host and copied
    once per step (a host-to-device copy per layer would stall the launch queue)."""
    key_lengths = np.asarray(key_lengths, dtype=np.int64)
    if new_tokens == 1 and (key_lengths == key_capacity).all():
        return None
    query_pos = key_lengths[:, None] - new_tokens + np.arange(new_tokens)[None, :]
    return xp.asarray(np.arange(key_capacity)[None, None, :] <= query_pos[:, :, None])


def causal_attention(xp, q, k, v, mask):
    """Softmax(q K^T / sqrt(D)) V with GQA, for B sequences; `mask` from causal_mask (None: see all).

    q: [B, Hq, T, D]; k, v: [B, Hkv, L, D]. Scores and softmax are fp32; returns [B, Hq, T, D] in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = Hq // Hkv
    # Query heads of one KV group become extra rows of one matmul: [B, Hkv, group * T, D].
    qg = (q * np.float32(1.0 / np.sqrt(D)).astype(q.dtype)).reshape(B, Hkv, group * T, D)
    scores = (qg @ k.swapaxes(-1, -2)).astype(np.float32).reshape(B, Hkv, group, T, L)
    if mask is not None:
        scores = xp.where(mask[:, None, None], scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.astype(v.dtype).reshape(B, Hkv, group * T, L) @ v
    return out.reshape(B, Hq, T, D)


# ----------------------------------------------------------------------------------------------------
# NumPy reference twins of the compressed-cache kernels (kernels/packkv_*.cu). Each reads records of the
# v1 format through packkv.codec and computes with the kernels' own factorization (docs/FORMAT.md §4):
#   q . k_t = step_t * (q . level_t + off_t * sum(q)),   sum_t p_t v_t = sum_t (p_t step_t) (level_t + off_t)
# Tests check the twins against plain attention over codec.decode_blocks output, and the GPU kernels
# against the twins.
# ----------------------------------------------------------------------------------------------------

def record_at(buffer: np.ndarray, offset: int) -> np.ndarray:
    """The record that starts at buffer[offset] (its length is in its header)."""
    buffer = np.asarray(buffer)
    nbytes = int(buffer[offset + 8:offset + 12].view("<u4")[0])
    return buffer[offset:offset + nbytes]


def read_records(buffer, offsets, params, n_kv_heads: int, head_dim: int):
    """BlockLevels of the records at buffer[offsets[i]] (any order, repeats allowed), stacked on a first
    axis: levels uint16 [n, H, T, D], steps fp16 / offsets int32 [n, H, T], tokens in storage order."""
    from packkv import codec
    buffer = np.asarray(buffer)
    cache: dict[int, object] = {}
    parts = []
    for off in np.asarray(offsets, dtype=np.int64).ravel():
        off = int(off)
        if off not in cache:
            cache[off] = codec.read_record(record_at(buffer, off), params, n_kv_heads, head_dim)
        parts.append(cache[off])
    H, T, D = n_kv_heads, params.block, head_dim
    fields = codec.BlockLevels.__dataclass_fields__
    if not parts:
        empty = {"k_levels": np.zeros((0, H, T, D), np.uint16), "v_levels": np.zeros((0, H, T, D), np.uint16),
                 "k_step": np.zeros((0, H, T), np.float16), "v_step": np.zeros((0, H, T), np.float16),
                 "k_offset": np.zeros((0, H, T), np.int32), "v_offset": np.zeros((0, H, T), np.int32)}
        return codec.BlockLevels(**{f: empty[f] for f in fields})
    return codec.BlockLevels(**{f: np.stack([getattr(p, f) for p in parts]) for f in fields})


def decode_records(buffer, offsets, params, n_kv_heads: int, head_dim: int):
    """(k_hat, v_hat) float32 [n, H, T, D] of the records at buffer[offsets[i]], storage order: the
    reference of kernels' decompress_blocks (which rounds to fp16)."""
    return read_records(buffer, offsets, params, n_kv_heads, head_dim).dequantize()


def _scores_factored(q64, levels, step, offset):
    """q [Hkv, G, D] float64; levels [n, Hkv, T, D]; step, offset [n, Hkv, T] -> q . k_hat, [Hkv, G, n*T]."""
    n, H, T, D = levels.shape
    lv = levels.astype(np.float64).transpose(1, 0, 2, 3).reshape(H, n * T, D)
    st = step.astype(np.float64).transpose(1, 0, 2).reshape(H, n * T)
    of = offset.astype(np.float64).transpose(1, 0, 2).reshape(H, n * T)
    dots = np.einsum("hgd,htd->hgt", q64, lv)
    return st[:, None, :] * (dots + of[:, None, :] * q64.sum(axis=-1)[..., None])


def _weighted_values_factored(p64, levels, step, offset):
    """p [Hkv, G, n*T] float64 -> sum_t p_t v_hat_t, [Hkv, G, D]."""
    n, H, T, D = levels.shape
    lv = levels.astype(np.float64).transpose(1, 0, 2, 3).reshape(H, n * T, D)
    ps = p64 * step.astype(np.float64).transpose(1, 0, 2).reshape(H, 1, n * T)
    of = offset.astype(np.float64).transpose(1, 0, 2).reshape(H, 1, n * T)
    return np.einsum("hgt,htd->hgd", ps, lv) + (ps * of).sum(axis=-1)[..., None]


def _check_batch(q_or_p, block_offsets, n_blocks):
    block_offsets = np.asarray(block_offsets, dtype=np.int64)
    n_blocks = np.asarray(n_blocks, dtype=np.int64)
    B = np.shape(q_or_p)[0]
    if block_offsets.ndim != 2 or block_offsets.shape[0] != B or n_blocks.shape != (B,):
        raise ValueError(f"block_offsets must be [B={B}, max_blocks] and n_blocks [B], got "
                         f"{block_offsets.shape} and {n_blocks.shape}")
    return block_offsets, np.clip(n_blocks, 0, block_offsets.shape[1])


def compressed_attention_reference(q, buffer, block_offsets, n_blocks, window_k, window_v, window_len, params):
    """Twin of kernels.attention_kernels.compressed_decode_attention, float32 [B, Hq, D]:
    softmax(q K^T / sqrt(D)) V per sequence over its n_blocks[b] compressed blocks (records at
    buffer[block_offsets[b, i]]) followed by its window_len[b] fp16 window tokens (window_k/v
    [B, Hkv, W_cap, D]); zeros where a sequence has nothing to attend to."""
    q = np.asarray(q, dtype=np.float64)
    window_k, window_v = np.asarray(window_k), np.asarray(window_v)
    block_offsets, n_blocks = _check_batch(q, block_offsets, n_blocks)
    B, Hq, D = q.shape
    Hkv = window_k.shape[1]
    G = Hq // Hkv
    out = np.zeros((B, Hq, D), np.float32)
    scale = 1.0 / np.sqrt(D)
    for b in range(B):
        qb = q[b].reshape(Hkv, G, D)
        lv = read_records(buffer, block_offsets[b, :n_blocks[b]], params, Hkv, D)
        wl = int(np.clip(window_len[b], 0, window_k.shape[2]))
        wk = window_k[b, :, :wl].astype(np.float64)
        wv = window_v[b, :, :wl].astype(np.float64)
        scores = np.concatenate([_scores_factored(qb, lv.k_levels, lv.k_step, lv.k_offset),
                                 np.einsum("hgd,htd->hgt", qb, wk)], axis=-1) * scale
        if scores.shape[-1] == 0:
            continue
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        n_c = scores.shape[-1] - wl
        num = (_weighted_values_factored(p[..., :n_c], lv.v_levels, lv.v_step, lv.v_offset)
               + np.einsum("hgt,htd->hgd", p[..., n_c:], wv))
        out[b] = (num / p.sum(axis=-1, keepdims=True)).reshape(Hq, D)
    return out


def k_gemv_reference(q, buffer, block_offsets, n_blocks, params, n_kv_heads: int):
    """Twin of kernels.attention_kernels.k_gemv: scores float32 [B, Hq, max_blocks * block] =
    q . K_hat^T over each sequence's compressed blocks in storage order (no 1/sqrt(D)); 0 past
    n_blocks[b] * block."""
    q = np.asarray(q, dtype=np.float64)
    block_offsets, n_blocks = _check_batch(q, block_offsets, n_blocks)
    B, Hq, D = q.shape
    G, T = Hq // n_kv_heads, params.block
    out = np.zeros((B, Hq, block_offsets.shape[1] * T), np.float32)
    for b in range(B):
        lv = read_records(buffer, block_offsets[b, :n_blocks[b]], params, n_kv_heads, D)
        s = _scores_factored(q[b].reshape(n_kv_heads, G, D), lv.k_levels, lv.k_step, lv.k_offset)
        out[b, :, :s.shape[-1]] = s.reshape(Hq, -1)
    return out


def v_gemv_reference(p, buffer, block_offsets, n_blocks, params, n_kv_heads: int, head_dim: int):
    """Twin of kernels.attention_kernels.v_gemv: out float32 [B, Hq, D] = p . V_hat over each sequence's
    compressed blocks, p [B, Hq, max_blocks * block] in storage order (entries past n_blocks[b] * block
    are ignored)."""
    p = np.asarray(p, dtype=np.float64)
    block_offsets, n_blocks = _check_batch(p, block_offsets, n_blocks)
    B, Hq, _ = p.shape
    G, T = Hq // n_kv_heads, params.block
    out = np.zeros((B, Hq, head_dim), np.float32)
    for b in range(B):
        lv = read_records(buffer, block_offsets[b, :n_blocks[b]], params, n_kv_heads, head_dim)
        pb = p[b, :, :n_blocks[b] * T].reshape(n_kv_heads, G, -1)
        out[b] = _weighted_values_factored(pb, lv.v_levels, lv.v_step, lv.v_offset).reshape(Hq, head_dim)
    return out
