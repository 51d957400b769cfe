"""packkv's channel scales: the cache stores k/s_k and v/s_v and attention takes q*s_k and returns
out*s_v, so attention is unchanged up to the codec's error, and that error moves to where s says."""
import numpy as np
import pytest

from packkv import codec
from packkv.attention import causal_attention, causal_mask
from packkv.backend import get_backend
from packkv.cache import CacheShape, ChannelScales, PackkvCache
from packkv.errors import PackkvError
from packkv.eval import ChannelStatsCache, unit_geometric_mean
from packkv.options import profile_scales

LAYERS, KV_HEADS, HEADS, D, T = 2, 2, 4, 16, 160
PARAMS = codec.CodecParams(rel_k=0.1, rel_v=0.2, granularity="token-head", block=16, pack=16)


def backend():
    return get_backend("cpu")


def random_kv(seed=0, outlier=None):
    """q [1, HEADS, T, D], k, v [1, KV_HEADS, T, D]; `outlier` = (channel, size) makes one K and V
    channel much larger than the rest, as real K and V have."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, HEADS, T, D)).astype(np.float32)
    k = rng.standard_normal((1, KV_HEADS, T, D)).astype(np.float32)
    v = rng.standard_normal((1, KV_HEADS, T, D)).astype(np.float32)
    if outlier:
        channel, size = outlier
        k[..., channel] *= size
        v[..., channel] *= size
        q[..., channel] /= size          # a large K channel meets small queries (q.k stays balanced)
    return q, k, v


def attend_through(cache, q, k, v, step=32):
    """Feed T tokens in steps (blocks get compressed as in decode); the last step's output, per layer."""
    outs = None
    for start in range(0, T, step):
        outs = []
        for layer in range(LAYERS):
            cache.append(layer, k[:, :, start:start + step], v[:, :, start:start + step])
            outs.append(cache.attend(layer, q[:, :, start:start + step]))
        cache.advance(step)
    return outs


def dense_last_step(q, k, v, step=32):
    mask = causal_mask(np, [T], step, T)
    return causal_attention(np, q[:, :, T - step:], k, v, mask)


def packkv(params=PARAMS, scales=None):
    shape = CacheShape(LAYERS, KV_HEADS, D, 1, T)
    return PackkvCache(shape, backend(), params, window=16, max_new_tokens=32, scales=scales)


def scales(k_scale, v_scale):
    return ChannelScales(np.broadcast_to(k_scale, (LAYERS, KV_HEADS, D)), np.broadcast_to(v_scale, (LAYERS, KV_HEADS, D)))


def test_scales_of_one_change_nothing():
    q, k, v = random_kv()
    plain = attend_through(packkv(), q, k, v)
    ones = attend_through(packkv(scales=scales(np.ones(D), np.ones(D))), q, k, v)
    for a, b in zip(plain, ones):
        np.testing.assert_array_equal(a, b)


def test_scaled_attention_is_attention_when_the_codec_is_nearly_lossless():
    """(q*s).(k/s) = q.k and s * p.(v/s) = p.v: with the finest bounds, scaled packkv is dense
    attention up to fp16 rounding and the bound (a step of 1/4096 of the scaled token's range)."""
    q, k, v = random_kv(1)
    fine = codec.CodecParams(rel_k=codec.MIN_REL, rel_v=codec.MIN_REL, granularity="token-head", block=16, pack=16)
    s = scales(np.geomspace(0.5, 2, D), np.geomspace(2, 0.5, D))
    out = attend_through(packkv(fine, s), q, k, v)
    for layer in range(LAYERS):
        np.testing.assert_allclose(out[layer], dense_last_step(q, k, v), atol=3e-3, rtol=3e-3)


def test_scales_move_the_error_to_where_it_matters_less():
    """One K and V channel 30x larger than the rest: unscaled, every channel's step follows it; scaled
    by that channel's size, the other channels get fine steps, and the attention output's error falls."""
    q, k, v = random_kv(2, outlier=(3, 30.0))
    size = np.ones(D)
    size[3] = 30.0
    dense = dense_last_step(q, k, v)
    plain = attend_through(packkv(), q, k, v)[0]
    scaled = attend_through(packkv(scales=scales(size, size)), q, k, v)[0]
    error = lambda out: float(np.abs(out - dense).mean())
    assert error(scaled) < 0.5 * error(plain)


def test_scales_are_counted_and_reported():
    cache = packkv(scales=scales(np.ones(D), np.ones(D)))
    q, k, v = random_kv()
    attend_through(cache, q, k, v)
    plain = packkv()
    attend_through(plain, q, k, v)
    assert cache.bytes_used() - plain.bytes_used() == 2 * LAYERS * KV_HEADS * D * 4
    assert cache.stats()["kv_params"]["channel_scales"] and not plain.stats()["kv_params"]["channel_scales"]


@pytest.mark.parametrize("k, v, words", [
    (np.ones((2, 2, 16)), np.ones((2, 2, 8)), "must be two"),
    (np.zeros((2, 2, 16)), np.ones((2, 2, 16)), "finite and positive"),
    (np.full((2, 2, 16), np.nan), np.ones((2, 2, 16)), "finite and positive"),
])
def test_bad_scales_are_refused(k, v, words):
    with pytest.raises(PackkvError, match=words):
        ChannelScales(k, v)


def test_scales_of_another_model_are_refused():
    with pytest.raises(PackkvError, match="another model"):
        packkv(scales=ChannelScales(np.ones((3, KV_HEADS, D)), np.ones((3, KV_HEADS, D))))


def test_profile_scales_read_back():
    k = np.full((LAYERS, KV_HEADS, D), 2.0)
    read = profile_scales({"params": {}, "channel_scales": {"k": k.tolist(), "v": (k / 2).tolist()}})
    np.testing.assert_array_equal(read.k, k) and np.testing.assert_array_equal(read.v, k / 2)
    assert profile_scales({"params": {}}) is None
    with pytest.raises(PackkvError, match="channel_scales"):
        profile_scales({"params": {}, "channel_scales": {"k": [1.0]}})


def test_channel_stats_by_hand():
    """The calibration cache's q rms (over the query heads of each KV head and all tokens) and max |v|."""
    q, k, v = random_kv(3)
    shape = CacheShape(1, KV_HEADS, D, 1, T)
    stats = ChannelStatsCache(shape, backend(), HEADS)
    for start in (0, 100):
        end = min(start + 100, T)
        stats.append(0, k[:, :, start:end], v[:, :, start:end])
        stats.attend(0, q[:, :, start:end])
        stats.advance(end - start)
    group = HEADS // KV_HEADS
    q_rms = np.sqrt((q[0].reshape(KV_HEADS, group, T, D) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(np.sqrt(stats.q_square[0] / stats.queries), q_rms, rtol=1e-5)
    np.testing.assert_allclose(stats.v_abs[0], np.abs(v[0]).max(axis=1), rtol=1e-6)
    s = stats.scales()
    np.testing.assert_allclose(np.log(s.k).mean(axis=-1), 0, atol=1e-5)     # unit geometric mean per head
    np.testing.assert_allclose(s.k[0], unit_geometric_mean(q_rms ** -0.5), rtol=1e-5)


# ---- the first block's own bounds (attention sinks) -------------------------------------------------

def test_sink_bounds_encode_only_first_blocks_tighter():
    """With sink bounds, every sequence's first block is encoded with them (smaller error, more bytes),
    the other blocks exactly as without; the records decode with the same parameters (same format)."""
    q, k, v = random_kv(4)
    plain, sink = packkv(), packkv_sink((0.01, 0.02))
    attend_through(plain, q, k, v)
    attend_through(sink, q, k, v)
    block = PARAMS.block
    assert int(plain.n_blocks[0]) >= 2
    # first block: tighter (decoded copies are in storage order: compare each channel's sorted values)
    err = lambda cache, j: float(np.abs(np.sort(cache.decoded_k[0, 0, :, j * block:(j + 1) * block], axis=1)
                                        - np.sort(k[0, :, j * block:(j + 1) * block], axis=1)).max())
    assert err(sink, 0) < 0.5 * err(plain, 0)
    n = int(plain.n_blocks[0])
    np.testing.assert_array_equal(sink.decoded_k[:, :, :, block:n * block], plain.decoded_k[:, :, :, block:n * block])
    assert sink.bytes_used() > plain.bytes_used()
    assert sink.stats()["kv_params"]["sink"] == [0.01, 0.02]


def packkv_sink(sink):
    shape = CacheShape(LAYERS, KV_HEADS, D, 1, T)
    return PackkvCache(shape, backend(), PARAMS, window=16, max_new_tokens=32, sink=sink)


def test_sink_flag_and_profile():
    from packkv.options import sink_bounds
    assert sink_bounds("0.02,0.05", None) == (0.02, 0.05)
    assert sink_bounds(None, [0.03, 0.06]) == (0.03, 0.06)
    assert sink_bounds("none", [0.03, 0.06]) is None and sink_bounds(None, None) is None
    for bad in ("0.02", "a,b", "0.02,2"):
        with pytest.raises(PackkvError, match="--kv-sink"):
            sink_bounds(bad, None)
