"""Sink bounds for a sequence's first S tokens only (--kv-sink-tokens): the codec takes a bound per token
(the record stores steps, never bounds, so the format and the decoder are the same), and the cache gives a
block's first tokens the sink bounds and the rest their layer's. S = the block (or unset) is today's bytes."""
import numpy as np
import pytest

from packkv import codec
from packkv.cache import CacheShape, LayerScales, PackkvCache
from packkv.errors import PackkvError

from test_cache_bounds import (BATCH, CPU, HEAD_DIM, KV_HEADS, LAYERS, PARAMS, SCALES, SINK, expected_params, feed,
                               random_steps)


@pytest.mark.parametrize("granularity", ["token-layer", "token-head"])
def test_codec_per_token_bounds_bound_each_tokens_error(granularity):
    params = codec.CodecParams(rel_k=0.1, rel_v=0.2, granularity=granularity, block=32, pack=16)
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((2, KV_HEADS, 32, HEAD_DIM)).astype(np.float16) for _ in "kv")
    # every token at the params' bounds: the same bytes as without per-token bounds
    same = (np.full(32, 0.1), np.full(32, 0.2))
    plain = codec.encode_blocks(k, v, params)
    np.testing.assert_array_equal(codec.encode_blocks(k, v, params, same)[0], plain[0])
    # the first 5 tokens at (0.004, 0.01), per block ([n_blocks, T]) or one for all ([T])
    rel_k, rel_v = np.full(32, 0.1), np.full(32, 0.2)
    rel_k[:5], rel_v[:5] = 0.004, 0.01
    buffer, offsets, perm = codec.encode_blocks(k, v, params, (rel_k, rel_v))
    again = codec.encode_blocks(k, v, params, (np.stack([rel_k] * 2), np.stack([rel_v] * 2)))
    np.testing.assert_array_equal(again[0], buffer)
    assert offsets[-1] > plain[1][-1]                     # tighter tokens cost bytes
    k_hat, v_hat = codec.decode_blocks(buffer, offsets, params, KV_HEADS, HEAD_DIM)
    for x, x_hat, rel in ((k, k_hat, rel_k), (v, v_hat, rel_v)):
        x = np.take_along_axis(x.astype(np.float32), perm[..., None], axis=2)    # storage order
        rel_t = rel[perm]                                                         # [n, H, T]
        axes = (1, 3) if granularity == "token-layer" else (3,)
        spread = x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True)
        err = np.abs(x_hat - x)
        # |error| <= step/2, step <= (max - min) * rel rounded up to fp16 (1/1024 relative)
        assert np.all(err <= spread * rel_t[..., None] * (1 + 2.0 ** -10) / 2 + 1e-6)
    # each token's stored step is the one codec.quantize_tokens gives it at its own bound
    levels, _ = codec.quantize_blocks(k, v, params, (rel_k, rel_v))
    for t in (0, 4, 5, 31):
        unit = k[:, :, t].reshape(2, -1) if granularity == "token-layer" else k[:, :, t]
        _, step, _ = codec.quantize_tokens(unit.astype(np.float32), rel_k[t])
        stored = levels.k_step[perm == t].reshape(step.shape[0], -1)
        np.testing.assert_array_equal(stored[:, 0] if granularity == "token-layer" else stored.reshape(step.shape), step)
    for bad in ((rel_k,), (rel_k[:31], rel_v), (np.zeros(32), rel_v)):
        with pytest.raises(ValueError, match="token_rel"):
            codec.encode_blocks(k, v, params, bad)


def sink_cache(sink_tokens, sink=SINK, layer_scales=SCALES):
    return PackkvCache(CacheShape(LAYERS, KV_HEADS, HEAD_DIM, BATCH, 400), CPU, PARAMS, window=8,
                       max_new_tokens=128, layer_scales=layer_scales, sink=sink, sink_tokens=sink_tokens)


def records(cache):
    return cache.arena.data[:cache.arena.used].copy(), cache.block_offsets.copy()


@pytest.mark.parametrize("sink_tokens", [8, 40])
def test_cache_first_tokens_at_the_sink_bounds(sink_tokens):
    """Each block's record is codec's with its first min(S - j*block, block)+ tokens at the sink bounds and
    the rest at its layer's; S = the block is today's bytes."""
    steps = random_steps(0, [100] + [1] * 40)
    whole, block_s, s = sink_cache(None), sink_cache(PARAMS.block), sink_cache(sink_tokens)
    for cache in (whole, block_s, s):
        feed(cache, steps)
    for a, b in zip(records(whole), records(block_s)):
        np.testing.assert_array_equal(a, b)
    k_all, v_all = (np.concatenate([step[i] for step in steps], axis=3) for i in (0, 1))
    arena = s.arena.data[:s.arena.used]
    block = PARAMS.block
    for layer in range(LAYERS):
        base = expected_params(layer, 1)
        for b in range(BATCH):
            for j in range(int(s.n_blocks[b])):
                n = int(np.clip(sink_tokens - j * block, 0, block))
                tokens = slice(j * block, (j + 1) * block)
                first = np.arange(block) < n
                token_rel = (np.where(first, SINK[0], base.rel_k), np.where(first, SINK[1], base.rel_v))
                record, _ = codec.encode_block(k_all[layer, b, :, tokens], v_all[layer, b, :, tokens], base, token_rel)
                start = int(s.block_offsets[layer, b, j])
                np.testing.assert_array_equal(arena[start:start + record.size], record)
    if sink_tokens < block:     # fewer tight tokens than today's whole first block: fewer bytes
        assert s.arena.used < whole.arena.used
    assert s.stats()["kv_params"]["sink_tokens"] == sink_tokens


def test_sink_tokens_checked_and_read_from_flag_and_profile():
    from packkv.options import sink_token_count
    assert sink_token_count(None, None) is None and sink_token_count(16, None) == 16
    assert sink_token_count(None, 8) == 8 and sink_token_count(4, 8) == 4
    for bad in (0, -3, True):
        with pytest.raises(PackkvError, match="--kv-sink-tokens"):
            sink_token_count(bad, None)
    with pytest.raises(PackkvError, match="sink_tokens"):
        sink_cache(0)
    # without sink bounds the count changes nothing
    plain, counted = sink_cache(None, sink=None), sink_cache(8, sink=None)
    steps = random_steps(3, [70])
    for cache in (plain, counted):
        feed(cache, steps)
    for a, b in zip(records(plain), records(counted)):
        np.testing.assert_array_equal(a, b)


def test_sink_tokens_flag_without_sink_bounds_is_an_error():
    from packkv.options import sink_tokens_for
    assert sink_tokens_for(None, 8, None) is None           # a profile's count, its sink bounds turned off
    assert sink_tokens_for(16, 8, (0.01, 0.03)) == 16 and sink_tokens_for(None, 8, (0.01, 0.03)) == 8
    with pytest.raises(PackkvError, match="--kv-sink-tokens needs sink bounds"):
        sink_tokens_for(16, None, None)
