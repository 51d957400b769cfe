"""The quant cache kind (KIVI-style group quantization): the error bound per group, the bit packing,
the byte layout read back by hand, every byte counted, and the cache in the engine's decode loop."""
import numpy as np
import pytest

from packkv.attention import causal_attention, causal_mask
from packkv.backend import get_backend
from packkv.cache import CacheShape, DenseCache, make_cache
from packkv.errors import PackkvError
from packkv.quant import (QuantCache, QuantParams, byte_breakdown, decode_attention_reference, decode_blocks,
                          dequantize_groups, encode_blocks, pack_bits, quantize_groups, record_bytes, unpack_bits)

CPU = get_backend("cpu")
LAYERS, KV_HEADS, HEAD_DIM, GROUP = 2, 2, 32, 3


def kv_blocks(rng, n=3, group=32, heads=KV_HEADS, dim=HEAD_DIM):
    """K with a few outlier channels (as real K has), V plain; fp16, as the cache hands them over."""
    k = rng.standard_normal((n, heads, group, dim)) * np.where(np.arange(dim) % 7 == 0, 20.0, 1.0)
    v = rng.standard_normal((n, heads, group, dim))
    return k.astype(np.float16), v.astype(np.float16)


@pytest.mark.parametrize("bits", [2, 4])
def test_error_within_half_a_scale_per_group(bits):
    x = (np.random.default_rng(bits).standard_normal((50, 64)) * np.logspace(-3, 3, 50)[:, None]).astype(np.float32)
    x[3] = 1.5                                           # a constant group decodes exactly
    codes, scale, zero = quantize_groups(x, bits)
    assert codes.max() <= 2 ** bits - 1 and scale.dtype == zero.dtype == np.float16
    err = np.abs(x - dequantize_groups(codes, scale, zero))
    bound = scale.astype(np.float32)[:, None] / 2
    assert (err <= bound * (1 + 1e-6) + 1e-6 * np.abs(x)).all()
    assert scale[3] == 0 and (err[3] == 0).all()
    # the levels are used: the group's extremes land on the first and last codes
    assert (codes.min(axis=1) == 0).all() and (codes[np.arange(50) != 3].max(axis=1) >= 2 ** bits - 2).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bits_round_trips_lsb_first(bits):
    codes = np.random.default_rng(0).integers(0, 2 ** bits, (3, 64)).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 64 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits), codes)
    assert packed[0, 0] == sum(int(codes[0, i]) << (i * bits) for i in range(8 // bits))


@pytest.mark.parametrize("bits, group", [(2, 32), (4, 32), (2, 64), (4, 64)])
def test_records_decode_to_the_bound_and_count_every_byte(bits, group):
    params = QuantParams(bits, group)
    k, v = kv_blocks(np.random.default_rng(1), group=group)
    buffer, offsets = encode_blocks(k, v, params)
    C = KV_HEADS * HEAD_DIM
    size = 8 * C + 2 * C * group * bits // 8                          # scales and zeros, then the codes
    assert record_bytes(params, KV_HEADS, HEAD_DIM) == size and size % 16 == 0
    assert buffer.size == 3 * size and list(offsets) == [0, size, 2 * size, 3 * size]
    assert sum(byte_breakdown(params, KV_HEADS, HEAD_DIM, 3).values()) == buffer.size
    k_hat, v_hat = decode_blocks(buffer, offsets, params, KV_HEADS, HEAD_DIM)
    # K groups: one channel over the block's tokens; V groups: one token over `group` channels
    k_range = k.astype(np.float32).max(axis=2, keepdims=True) - k.astype(np.float32).min(axis=2, keepdims=True)
    assert (np.abs(k_hat - k) <= k_range / (2 ** bits - 1) / 2 * 1.002 + 1e-6).all()
    vt = v.transpose(0, 2, 1, 3).reshape(3, group, C // group, group).astype(np.float32)
    v_range = (vt.max(axis=-1) - vt.min(axis=-1))[..., None]
    v_err = np.abs(v_hat - v).transpose(0, 2, 1, 3).reshape(vt.shape)
    assert (v_err <= v_range / (2 ** bits - 1) / 2 * 1.002 + 1e-6).all()


def test_the_layout_read_by_hand():
    """Decode record 1 from the documented layout alone: fp16 fields by offset, codes LSB first."""
    params = QuantParams(4, 32)
    k, v = kv_blocks(np.random.default_rng(2))
    buffer, offsets = encode_blocks(k, v, params)
    rec = buffer[offsets[1]:offsets[2]]
    C, G = KV_HEADS * HEAD_DIM, 32
    f16 = lambda a, n: np.frombuffer(rec[a:a + 2 * n].tobytes(), np.float16).astype(np.float32)  # noqa: E731
    k_scale, k_zero = f16(0, C), f16(2 * C, C)
    v_scale, v_zero = f16(4 * C, C).reshape(G, C // G), f16(6 * C, C).reshape(G, C // G)
    codes = np.stack([rec[8 * C:] & 15, rec[8 * C:] >> 4], axis=-1).reshape(-1)
    k_codes, v_codes = codes[:C * G].reshape(C, G), codes[C * G:2 * C * G].reshape(G, C)
    k_want = (k_codes * k_scale[:, None] + k_zero[:, None]).reshape(KV_HEADS, HEAD_DIM, G).transpose(0, 2, 1)
    v_want = (v_codes.reshape(G, C // G, G) * v_scale[..., None] + v_zero[..., None]).reshape(G, KV_HEADS, HEAD_DIM)
    k_hat, v_hat = decode_blocks(buffer, offsets, params, KV_HEADS, HEAD_DIM)
    np.testing.assert_array_equal(k_hat[1], k_want)
    np.testing.assert_array_equal(v_hat[1], v_want.transpose(1, 0, 2))


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantParams(bits=3)
    with pytest.raises(ValueError, match="group must be one of"):
        QuantParams(group=48)
    with pytest.raises(PackkvError, match="do not tile"):
        QuantCache(CacheShape(1, 3, 32, 1, 64), CPU, QuantParams(2, 64))   # 96 channels


def quant_cache(bits=4, window=8, max_context=300):
    return make_cache("quant", CacheShape(LAYERS, KV_HEADS, HEAD_DIM, 1, max_context), CPU,
                      params=QuantParams(bits, 32), window=window, max_new_tokens=128)


def run_steps(cache, rng, steps):
    k_all, v_all, outs = [], [], []
    for T in steps:
        k = rng.standard_normal((LAYERS, 1, KV_HEADS, T, HEAD_DIM)).astype(np.float32)
        v = rng.standard_normal((LAYERS, 1, KV_HEADS, T, HEAD_DIM)).astype(np.float32)
        q = rng.standard_normal((LAYERS, 1, KV_HEADS * GROUP, T, HEAD_DIM)).astype(np.float32)
        out = []
        for layer in range(LAYERS):
            cache.append(layer, k[layer], v[layer])
            out.append(cache.attend(layer, q[layer]))
        cache.advance(T)
        k_all.append(k), v_all.append(v), outs.append((q, np.stack(out)))
    return np.concatenate(k_all, axis=3)[:, 0], np.concatenate(v_all, axis=3)[:, 0], outs


def test_cache_attends_over_decoded_groups_and_the_window():
    cache = quant_cache()
    k_all, v_all, outs = run_steps(cache, np.random.default_rng(3), [70] + [1] * 20)
    assert isinstance(cache, QuantCache) and cache.block == 32
    n, w = int(cache.n_blocks[0]), int(cache.window_len[0])
    assert n * 32 + w == 90 and 8 <= w < 40
    # the last step, by hand: blocks encoded as the record format says, the window in fp16
    split, (q, out) = n * 32, outs[-1]
    for layer in range(LAYERS):
        kb = k_all[layer, :, :split].reshape(KV_HEADS, n, 32, HEAD_DIM).transpose(1, 0, 2, 3).astype(np.float16)
        vb = v_all[layer, :, :split].reshape(KV_HEADS, n, 32, HEAD_DIM).transpose(1, 0, 2, 3).astype(np.float16)
        k_hat, v_hat = decode_blocks(*encode_blocks(kb, vb, QuantParams(4, 32)), QuantParams(4, 32), KV_HEADS, HEAD_DIM)
        keys = np.concatenate([k_hat.transpose(1, 0, 2, 3).reshape(KV_HEADS, split, HEAD_DIM),
                               k_all[layer, :, split:].astype(np.float16).astype(np.float32)], axis=1)
        values = np.concatenate([v_hat.transpose(1, 0, 2, 3).reshape(KV_HEADS, split, HEAD_DIM),
                                 v_all[layer, :, split:].astype(np.float16).astype(np.float32)], axis=1)
        want = causal_attention(np, q[layer], keys[None], values[None], causal_mask(np, [90], 1, 90))
        np.testing.assert_allclose(out[layer], want, rtol=1e-5, atol=1e-5)


def test_decode_attention_twin_equals_the_cache_reference_path():
    """decode_attention_reference, the GPU kernel's twin, reads the arena and the offset table as the
    kernel does; it must give what the cache's own attention gives for a decode step."""
    cache = quant_cache(bits=2)
    rng = np.random.default_rng(5)
    run_steps(cache, rng, [100, 1, 1])
    assert int(cache.n_blocks[0]) >= 2
    k, v = (rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, KV_HEADS * GROUP, 1, HEAD_DIM)).astype(np.float32)
    for layer in range(LAYERS):
        cache.append(layer, k, v)
        want = cache.attend(layer, q)[:, :, 0]
        got = decode_attention_reference(q[:, :, 0], cache.arena.data, cache.block_offsets[layer], cache.n_blocks,
                                         cache.window_k[layer], cache.window_v[layer], cache.window_len + 1,
                                         cache.params)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cache_counts_every_byte():
    cache = quant_cache(bits=2)
    run_steps(cache, np.random.default_rng(4), [100, 37] + [1] * 5)
    n, w = int(cache.n_blocks[0]), int(cache.window_len[0])
    per_record = record_bytes(QuantParams(2, 32), KV_HEADS, HEAD_DIM)
    assert cache.arena.used == n * LAYERS * per_record
    assert cache.bytes_used() == cache.arena.used + n * LAYERS * 8 + w * LAYERS * KV_HEADS * HEAD_DIM * 4
    stats = cache.stats()
    assert stats["cache"] == "quant" and stats["kv_params"] == {"bits": 2, "group": 32, "window": 8}
    # 2 bits + an fp16 scale and zero per 32 elements = 3 bits, plus the offset table, in the blocks
    block_bits = 8 * (cache.arena.used + n * LAYERS * 8) / (n * 32 * LAYERS * KV_HEADS * HEAD_DIM * 2)
    assert block_bits == pytest.approx(3 + 64 / (32 * KV_HEADS * HEAD_DIM * 2))


def test_closer_to_dense_with_more_bits():
    outs = {}
    for name, cache in (("dense", DenseCache(CacheShape(LAYERS, KV_HEADS, HEAD_DIM, 1, 300), CPU)),
                        ("2", quant_cache(2)), ("4", quant_cache(4))):
        outs[name] = run_steps(cache, np.random.default_rng(5), [80] + [1] * 10)[2]
    err = {b: max(np.abs(o[1] - d[1]).max() for o, d in zip(outs[b], outs["dense"])) for b in ("2", "4")}
    assert 0 < err["4"] < err["2"] / 2
