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
