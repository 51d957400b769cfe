"""The NumPy twins of the compressed-KV kernels (packkv.attention) against plain attention over what
packkv.codec decodes, and against causal_attention. CPU only: these twins are what the GPU kernels are
tested against (tests/test_kernels_gpu.py)."""
import numpy as np
import pytest

from packkv import codec
from packkv.attention import (causal_attention, compressed_attention_reference, decode_records, k_gemv_reference,
                              read_records, record_at, v_gemv_reference)
from packkv.codec import CodecParams


def make_kv(rng, n_blocks, H, T, D, outliers=True):
    k = rng.standard_normal((n_blocks, H, T, D)).astype(np.float32)
    if outliers:  # post-RoPE K: a few channels an order of magnitude larger
        k[..., rng.integers(0, D, size=max(1, D // 16))] *= 12
    v = rng.standard_normal((n_blocks, H, T, D)).astype(np.float32)
    return k.astype(np.float16), v.astype(np.float16)


def build(rng, params, lengths, H, D, shuffle=True):
    """Records of all sequences' blocks in one buffer (in a shuffled order) and the offset table."""
    total = int(sum(lengths))
    k, v = make_kv(rng, max(total, 1), H, params.block, D)
    buf, offs, _ = codec.encode_blocks(k[:total], v[:total], params)
    order = rng.permutation(total) if shuffle else np.arange(total)
    records = [buf[offs[i]:offs[i + 1]] for i in order]
    starts = np.concatenate([[0], np.cumsum([r.size for r in records])]).astype(np.int64)
    buffer = np.concatenate(records + [np.zeros(16, np.uint8)]) if records else np.zeros(16, np.uint8)
    where = np.empty(total, np.int64)
    where[order] = starts[:-1]          # block i of the concatenation lives at where[i]
    table = np.zeros((len(lengths), max(max(lengths, default=0), 1)), np.int64)
    first = 0
    for b, n in enumerate(lengths):
        table[b, :n] = where[first:first + n]
        first += n
    return buffer, table, np.asarray(lengths, np.int32)


PARAMS = [CodecParams(),
          CodecParams(granularity="token-head", repack="none"),
          CodecParams(pack=8, repack="sort"),
          CodecParams(pack=32, block=64, repack="none"),
          CodecParams(block=32, pack=16, repack="none", rel_k=0.02, rel_v=0.05)]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"{p.granularity}-{p.repack}-P{p.pack}-T{p.block}")
def test_records_decode_like_decode_blocks(params):
    rng = np.random.default_rng(0)
    buffer, table, lengths = build(rng, params, [3], 2, 32)
    k_hat, v_hat = decode_records(buffer, table[0], params, 2, 32)
    # the same records, decoded by codec.decode_blocks from a contiguous copy
    recs = [record_at(buffer, o) for o in table[0]]
    offs = np.concatenate([[0], np.cumsum([r.size for r in recs])])
    k_ref, v_ref = codec.decode_blocks(np.concatenate(recs), offs, params, 2, 32)
    np.testing.assert_array_equal(k_hat, k_ref)
    np.testing.assert_array_equal(v_hat, v_ref)
    # repeated offsets are allowed (a table may point at one record many times)
    lv = read_records(buffer, np.repeat(table[0, :1], 3), params, 2, 32)
    assert lv.k_levels.shape == (3, 2, params.block, 32)


def plain_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(D)) v with GQA: q [Hq, D], k, v [Hkv, L, D]."""
    Hq, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    s = np.einsum("hgd,htd->hgt", q.reshape(Hkv, G, D).astype(np.float64), k.astype(np.float64)) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (np.einsum("hgt,htd->hgd", p, v.astype(np.float64)) / p.sum(-1, keepdims=True)).reshape(Hq, D)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"{p.granularity}-{p.repack}-P{p.pack}-T{p.block}")
@pytest.mark.parametrize("G", [1, 3, 4])
def test_attention_twin_matches_plain_attention_over_decoded_blocks(params, G):
    rng = np.random.default_rng(G)
    H, D, W = 2, 32, 5
    lengths = [3, 1, 0, 2]
    buffer, table, n_blocks = build(rng, params, lengths, H, D)
    B = len(lengths)
    q = rng.standard_normal((B, G * H, D)).astype(np.float16)
    wk = rng.standard_normal((B, H, W, D)).astype(np.float16)
    wv = rng.standard_normal((B, H, W, D)).astype(np.float16)
    wl = np.array([W, 0, 2, 0], np.int32)
    out = compressed_attention_reference(q, buffer, table, n_blocks, wk, wv, wl, params)
    assert out.shape == (B, G * H, D) and out.dtype == np.float32
    for b in range(B):
        k_hat, v_hat = decode_records(buffer, table[b, :n_blocks[b]], params, H, D)
        k_all = np.concatenate([k_hat.transpose(1, 0, 2, 3).reshape(H, -1, D), wk[b, :, :wl[b]]], axis=1)
        v_all = np.concatenate([v_hat.transpose(1, 0, 2, 3).reshape(H, -1, D), wv[b, :, :wl[b]]], axis=1)
        if k_all.shape[1] == 0:
            np.testing.assert_array_equal(out[b], 0)    # nothing to attend to: zeros
            continue
        want = plain_attention(q[b], k_all, v_all)
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5)
        # and the model's own attention, with query heads of a group as rows of one matmul
        got = causal_attention(np, q[b][None, :, None].astype(np.float64), k_all[None].astype(np.float64),
                               v_all[None].astype(np.float64), None)[0, :, 0]
        np.testing.assert_allclose(out[b], got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", PARAMS[:3], ids=lambda p: f"{p.granularity}-{p.repack}-P{p.pack}")
def test_gemv_twins_match_plain_products(params):
    rng = np.random.default_rng(1)
    H, D, G, T = 3, 64, 3, params.block
    lengths = [2, 4]
    buffer, table, n_blocks = build(rng, params, lengths, H, D)
    B, max_blocks = table.shape
    q = rng.standard_normal((B, G * H, D)).astype(np.float16)
    scores = k_gemv_reference(q, buffer, table, n_blocks, params, H)
    assert scores.shape == (B, G * H, max_blocks * T)
    p = rng.random((B, G * H, max_blocks * T)).astype(np.float32)
    out = v_gemv_reference(p, buffer, table, n_blocks, params, H, D)
    for b in range(B):
        k_hat, v_hat = decode_records(buffer, table[b, :n_blocks[b]], params, H, D)
        kk = k_hat.transpose(1, 0, 2, 3).reshape(H, -1, D).astype(np.float64)
        vv = v_hat.transpose(1, 0, 2, 3).reshape(H, -1, D).astype(np.float64)
        n = n_blocks[b] * T
        want = np.einsum("hgd,htd->hgt", q[b].reshape(H, G, D).astype(np.float64), kk).reshape(G * H, n)
        np.testing.assert_allclose(scores[b, :, :n], want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
        np.testing.assert_array_equal(scores[b, :, n:], 0)
        want_v = np.einsum("hgt,htd->hgd", p[b, :, :n].reshape(H, G, n).astype(np.float64), vv).reshape(G * H, D)
        np.testing.assert_allclose(out[b], want_v, rtol=1e-5, atol=1e-5 * np.abs(want_v).max())


def test_twins_refuse_mismatched_tables():
    params = CodecParams(repack="none")
    with pytest.raises(ValueError, match="block_offsets must be"):
        k_gemv_reference(np.zeros((2, 4, 32), np.float16), np.zeros(16, np.uint8), np.zeros((3, 1), np.int64),
                         np.zeros(2, np.int32), params, 2)
