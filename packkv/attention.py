"""Attention over a cache: the reference computation, written against `xp`.

Later kinds of cache dispatch to fused GPU kernels; every kernel is tested against these functions.
"""
from __future__ import annotations

import numpy as np


def causal_attention(xp, q, k, v, key_lengths):
    """Softmax(q K^T / sqrt(D)) V for B sequences of different lengths, with GQA.

    q: [B, Hq, T, D], the queries of each sequence's last T tokens.
    k, v: [B, Hkv, L, D]; sequence b has key_lengths[b] <= L valid keys, the last T of which are the
    queries' own tokens. Query t of sequence b sits at position key_lengths[b] - T + t and sees keys at
    positions up to its own (causal). Scores and softmax are fp32; returns [B, Hq, T, D] in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = Hq // Hkv
    # Query heads of one KV group become extra rows of one matmul: [B, Hkv, group * T, D].
    qg = (q * np.float32(1.0 / np.sqrt(D)).astype(q.dtype)).reshape(B, Hkv, group * T, D)
    scores = (qg @ k.swapaxes(-1, -2)).astype(np.float32).reshape(B, Hkv, group, T, L)
    lengths = xp.asarray(np.asarray(key_lengths, dtype=np.int64))
    query_pos = lengths[:, None] - T + xp.arange(T)[None, :]                   # [B, T]
    visible = xp.arange(L)[None, None, :] <= query_pos[:, :, None]             # [B, T, L]
    scores = xp.where(visible[:, None, None], scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.astype(v.dtype).reshape(B, Hkv, group * T, L) @ v
    return out.reshape(B, Hq, T, D)
