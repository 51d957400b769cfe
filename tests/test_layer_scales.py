"""packkv's per-layer bounds (LayerScales): each layer's blocks are encoded at the cache's bounds times
that layer's multipliers (the first blocks at the sink bounds, if set): on the CPU one codec call per
distinct pair, on the GPU one encoder call per compress event with a bound per block; the multipliers come
from measured per-layer sensitivities (eval.layer_multipliers)."""
import numpy as np
import pytest

from packkv import codec
from packkv.cache import CacheShape, LayerScales, PackkvCache
from packkv.errors import PackkvError
from packkv.eval import layer_multipliers
from packkv.options import profile_layer_scales

from test_channel_scales import D, KV_HEADS, LAYERS, PARAMS, T, attend_through, backend, random_kv


def packkv(**kw):
    return PackkvCache(CacheShape(LAYERS, KV_HEADS, D, 1, T), backend(), PARAMS, window=16, max_new_tokens=32, **kw)


def block_error(cache, x, layer, j):
    """Largest error of K block j of `layer` (decoded copies are in storage order: compare sorted channels)."""
    b = PARAMS.block
    return float(np.abs(np.sort(cache.decoded_k[layer, 0, :, j * b:(j + 1) * b], axis=1)
                        - np.sort(x[0, :, j * b:(j + 1) * b], axis=1)).max())


def test_layer_scales_set_each_layers_bounds():
    """Layer 0 at a tenth of the bounds, layer 1 at twice: layer 0's blocks get more exact and larger, layer
    1's coarser; with sink bounds the first blocks of both layers use those instead."""
    q, k, v = random_kv(5)
    plain, scaled = packkv(), packkv(layer_scales=LayerScales([0.1, 2.0], [0.1, 2.0]))
    attend_through(plain, q, k, v)
    attend_through(scaled, q, k, v)
    n = int(plain.n_blocks[0])
    assert n >= 3
    for j in range(n):
        assert block_error(scaled, k, 0, j) < 0.3 * block_error(plain, k, 0, j)
        assert block_error(scaled, k, 1, j) > 1.3 * block_error(plain, k, 1, j)
    assert [p.rel_k for p in scaled.layer_params] == [pytest.approx(0.01), pytest.approx(0.2)]
    assert scaled.stats()["kv_params"]["layer_scales"] == {"k": [0.1, 2.0], "v": [0.1, 2.0]}
    with_sink = packkv(layer_scales=LayerScales([0.1, 2.0], [0.1, 2.0]), sink=(0.003, 0.005))
    attend_through(with_sink, q, k, v)
    assert block_error(with_sink, k, 1, 0) < 0.2 * block_error(scaled, k, 1, 0)      # the sink's bounds
    np.testing.assert_array_equal(with_sink.decoded_k[:, :, :, PARAMS.block:n * PARAMS.block],
                                  scaled.decoded_k[:, :, :, PARAMS.block:n * PARAMS.block])


def test_encoding_groups_one_per_distinct_params():
    cache = packkv(layer_scales=LayerScales([1.0, 1.0], [1.0, 3.0]), sink=(0.01, 0.02))
    owners = [(layer, 0, j) for layer in range(LAYERS) for j in range(3)]
    groups = cache.encoding_groups(owners)
    assert sorted(len(g) for g, _, _ in groups) == [2, 2, 2]
    by_params = {(round(p.rel_k, 9), round(p.rel_v, 9)): sorted(g) for g, p, _ in groups}
    assert by_params[(0.01, 0.02)] == [0, 3]
    assert by_params[(PARAMS.rel_k, PARAMS.rel_v)] == [1, 2]
    assert by_params[(PARAMS.rel_k, round(3 * PARAMS.rel_v, 9))] == [4, 5]


def test_layer_scales_are_clipped_checked_and_read_from_profiles():
    params = LayerScales([1e-6, 100.0], [1.0, 1.0]).params(PARAMS, 2)
    assert params[0].rel_k == codec.MIN_REL and params[1].rel_k == 1.0
    with pytest.raises(PackkvError, match="for 2 layers, the model has 3"):
        packkv().__class__(CacheShape(3, KV_HEADS, D, 1, T), backend(), PARAMS, layer_scales=LayerScales([1, 1], [1, 1]))
    for bad in (([1, 1], [1]), ([1, 0], [1, 1]), ([1, np.nan], [1, 1])):
        with pytest.raises(PackkvError, match="layer scales"):
            LayerScales(*bad)
    assert profile_layer_scales({"params": {}}) is None
    assert profile_layer_scales({"layer_scales": {"k": [1, 2], "v": [3, 4]}}).v.tolist() == [3, 4]
    with pytest.raises(PackkvError, match="layer_scales cannot be read"):
        profile_layer_scales({"layer_scales": {"k": [1, 2]}})


def test_layer_multipliers():
    """More sensitive layers get smaller multipliers; geometric mean 1; within [1/clip, clip]."""
    s = np.array([1e-3, 4e-4, 1e-4, 2.5e-5, 0.0])
    m = layer_multipliers(s, power=0.5, clip=4)
    assert np.all(np.diff(m) >= 0) and m[0] < 1 < m[-1]
    assert np.exp(np.log(m).mean()) == pytest.approx(1, abs=1e-6)
    assert m.min() >= 0.25 - 1e-9 and m.max() <= 4 + 1e-9
    wide = layer_multipliers(s[:4], power=0.5, clip=100)          # no clipping: m ~ s^-0.5
    np.testing.assert_allclose(wide[:-1] / wide[1:], np.sqrt(s[1:4] / s[:3]), rtol=1e-9)
    np.testing.assert_allclose(layer_multipliers(s, power=0, clip=4), 1)
    for bad in (np.zeros(3), np.array([1.0, np.inf])):
        with pytest.raises(PackkvError, match="sensitivities"):
            layer_multipliers(bad, 0.35, 4)
