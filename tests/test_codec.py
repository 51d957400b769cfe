"""The compressed KV format (packkv.codec): error bound, determinism, shared permutation, byte accounting.

CPU only, small shapes; hypothesis draws random and adversarial blocks (constant tokens, zeros, fp16
extremes and subnormals, a single huge outlier, arbitrary finite fp16 bit patterns).
"""
import math
import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from packkv import codec
from packkv.codec import (BREAKDOWN_KEYS, CodecParams, bit_width, byte_breakdown, decode_block, decode_blocks,
                          encode_block, encode_blocks, greedy_order, pack_fields, quantize_blocks, read_record,
                          round_up_to_fp16, unpack_fields)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------
# Block generators
# ---------------------------------------------------------------------------------------------------

KINDS = ("gaussian", "outlier_channels", "constant_tokens", "zeros", "fp16_extremes", "subnormals",
         "huge_outlier", "fp16_bits", "far_from_zero")


def make_block(kind: str, shape, rng: np.random.Generator) -> np.ndarray:
    """An fp16 array of the given shape [..., H, T, D], of one adversarial kind."""
    H, T, D = shape[-3:]
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "outlier_channels":  # post-RoPE K: a few channels an order of magnitude larger
        x[..., rng.integers(0, D, size=max(1, D // 16))] *= 20
    elif kind == "constant_tokens":
        x[..., ::3, :] = rng.standard_normal(shape[:-1])[..., ::3, None]
    elif kind == "zeros":
        x[..., ::2, :] = 0
    elif kind == "fp16_extremes":
        x = rng.choice(np.array([65504, -65504, 0, 1, -1e-7, 6e-8, 65504 / 3], np.float32), size=shape)
    elif kind == "subnormals":
        x = rng.integers(-1023, 1024, size=shape).astype(np.float32) * np.float32(2.0 ** -24)
    elif kind == "huge_outlier":
        x.reshape(-1)[rng.integers(0, x.size)] = 60000
    elif kind == "fp16_bits":  # every finite fp16 value is fair game
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
        x = bits.view(np.float16).astype(np.float32)
        x[~np.isfinite(x)] = 0
    elif kind == "far_from_zero":  # tiny range far from zero: the offset guard's case
        x = 1000 + x * 0.5
    return x.astype(np.float16)


@st.composite
def blocks(draw, with_batch=False):
    pack = draw(st.sampled_from(codec.PACK_SIZES))
    params = CodecParams(rel_k=draw(st.sampled_from([2.0 ** -12, 0.01, 0.1, 0.3, 1.0])),
                         rel_v=draw(st.sampled_from([0.05, 0.2, 1.0])),
                         granularity=draw(st.sampled_from(codec.GRANULARITIES)),
                         repack=draw(st.sampled_from(codec.REPACK_METHODS)),
                         pack=pack, block=pack * draw(st.integers(1, 3)))
    H, D = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    shape = ((draw(st.integers(1, 2)),) if with_batch else ()) + (H, params.block, D)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    k = make_block(draw(st.sampled_from(KINDS)), shape, rng)
    v = make_block(draw(st.sampled_from(KINDS)), shape, rng)
    return params, k, v


def unpermute(x_storage: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Put decoded tokens [..., H, T, D] back at their original positions."""
    out = np.empty_like(x_storage)
    np.put_along_axis(out, perm[..., None], x_storage, axis=-2)
    return out


def within_bound(x: np.ndarray, x_hat: np.ndarray, step: np.ndarray) -> np.ndarray:
    """|x - x_hat| <= step/2, loosened only by float32 rounding of x/step and of (q + off) * step."""
    x = x.astype(np.float64)
    s = step.astype(np.float64)[..., None]
    return np.abs(x - x_hat) <= s / 2 * (1 + 2.0 ** -20) + np.abs(x) * 2.0 ** -22


# ---------------------------------------------------------------------------------------------------
# Properties on random and adversarial blocks
# ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(blocks())
def test_roundtrip_error_bound_and_permutation(case):
    params, k, v = case
    record, perm = encode_block(k, v, params)
    k_hat, v_hat = decode_block(record, params, k.shape[0], k.shape[2])
    assert k_hat.dtype == v_hat.dtype == np.float32 and k_hat.shape == k.shape
    assert sorted(perm[0].tolist()) == list(range(params.block))
    if params.granularity == "token-layer":
        assert (perm == perm[0]).all(), "token-layer: one permutation for all heads"
    levels = read_record(record, params, k.shape[0], k.shape[2])
    for x, x_hat, step in [(k, k_hat, levels.k_step), (v, v_hat, levels.v_step)]:
        x_storage = np.take_along_axis(x, perm[..., None], axis=-2)
        ok = within_bound(x_storage, x_hat, step)
        assert ok.all(), f"error bound broken at {np.argwhere(~ok)[0]}"
        assert np.isfinite(x_hat).all()
    # quantization is per token: the repacked record holds exactly the unrepacked tokens, permuted by perm
    plain = replace(params, repack="none")
    k_plain, v_plain = decode_block(encode_block(k, v, plain)[0], plain, k.shape[0], k.shape[2])
    assert np.array_equal(k_hat, np.take_along_axis(k_plain, perm[..., None], axis=-2))
    assert np.array_equal(v_hat, np.take_along_axis(v_plain, perm[..., None], axis=-2))


@SETTINGS
@given(blocks())
def test_step_is_the_requested_bound_rounded_up_to_fp16(case):
    params, k, _ = case
    levels, perm = quantize_blocks(k, k, params)
    x = np.take_along_axis(k.astype(np.float32), perm[..., None], axis=-2)
    axes = (-1,) if params.granularity == "token-head" else (-3, -1)
    lo, hi = x.min(axis=axes), x.max(axis=axes)
    if params.granularity == "token-layer":
        lo, hi = np.broadcast_to(lo[None], levels.k_step.shape), np.broadcast_to(hi[None], levels.k_step.shape)
    requested = (hi.astype(np.float64) - lo) * params.rel_k
    amax = np.maximum(-lo, hi).astype(np.float64)
    ordinary = ((requested > 0) & (requested >= amax / codec.OFFSET_LIMIT) & (requested >= 2.0 ** -24)
                & (requested <= 65504))  # not a constant token, nor the offset guard's, nor the clamp's
    step = levels.k_step.astype(np.float64)
    assert (step[ordinary] >= requested[ordinary] * (1 - 2.0 ** -23)).all()
    assert (step[ordinary] <= requested[ordinary] * (1 + 2.0 ** -10) + 2.0 ** -24).all()
    assert (np.abs(levels.k_offset) <= codec.OFFSET_LIMIT).all()
    assert (levels.k_levels.astype(np.int64) + levels.k_offset[..., None] <= codec.OFFSET_LIMIT).all()


@SETTINGS
@given(blocks(with_batch=True))
def test_encoding_is_deterministic_and_batch_equals_single(case):
    params, k, v = case
    buffer, offsets, perm = encode_blocks(k, v, params)
    again, offsets2, perm2 = encode_blocks(k, v, params)
    assert np.array_equal(buffer, again) and np.array_equal(offsets, offsets2) and np.array_equal(perm, perm2)
    assert offsets[0] == 0 and offsets[-1] == buffer.size and (np.diff(offsets) % 16 == 0).all()
    for b in range(k.shape[0]):
        record, perm_b = encode_block(k[b], v[b], params)
        assert np.array_equal(record, buffer[offsets[b]:offsets[b + 1]])
        assert np.array_equal(perm_b, perm[b])
    k_hat, v_hat = decode_blocks(buffer, offsets, params, k.shape[1], k.shape[3])
    assert np.array_equal(k_hat[-1], decode_block(buffer[offsets[-2]:], params, k.shape[1], k.shape[3])[0])


@SETTINGS
@given(blocks(), st.integers(0, 2 ** 32 - 1))
def test_shared_permutation_leaves_attention_unchanged(case, seed):
    """Attention over the decoded block in storage order equals attention over the same tokens decoded
    without any repacking (original order, no permutation anywhere): quantization is per token, so the
    only difference may be the order, and K and V must share it."""
    params, k, v = case
    H, T, D = k.shape
    k_hat, v_hat = decode_block(encode_block(k, v, params)[0], params, H, D)
    plain = replace(params, repack="none")
    k_plain, v_plain = decode_block(encode_block(k, v, plain)[0], plain, H, D)
    q = np.random.default_rng(seed).standard_normal((H, D)) / np.sqrt(D)

    def attention(keys, values):  # per KV head: softmax(q . K^T) V, in float64
        scores = np.einsum("hd,htd->ht", q, keys.astype(np.float64))
        scores = scores / (1 + np.abs(scores).max(axis=-1, keepdims=True))  # keep fp16 extremes tame
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return np.einsum("ht,htd->hd", weights, values.astype(np.float64))

    scale = 1 + np.abs(v_plain).max()
    np.testing.assert_allclose(attention(k_hat, v_hat), attention(k_plain, v_plain), rtol=1e-9, atol=1e-12 * scale)


@SETTINGS
@given(blocks(with_batch=True))
def test_byte_breakdown_adds_up_to_bytes_written(case):
    params, k, v = case
    buffer, offsets, _ = encode_blocks(k, v, params)
    breakdown = byte_breakdown(buffer, offsets)
    assert set(breakdown) == set(BREAKDOWN_KEYS) and all(n >= 0 for n in breakdown.values())
    assert sum(breakdown.values()) == buffer.size
    # and each component is what the levels imply, computed independently of the writer
    levels, _ = quantize_blocks(k, v, params)
    n_blocks, H, T, D = k.shape
    units = n_blocks * (1 if params.granularity == "token-layer" else H)
    assert breakdown["k_step"] == breakdown["v_step"] == 2 * T * units
    assert breakdown["record_header"] == n_blocks * (12 + 4 * (units // n_blocks + 2 * H))
    for kv in "kv":
        packs = getattr(levels, f"{kv}_levels").reshape(n_blocks, H, T // params.pack, params.pack, D)
        widths = bit_width(packs.max(axis=3) - packs.min(axis=3)).astype(np.int64)
        assert breakdown[f"{kv}_payload"] == widths.sum() * params.pack // 8
    assert breakdown["padding"] < n_blocks * (16 + 3 * (units // n_blocks + 4 * H))


def test_sizes_on_a_hand_checked_block():
    """One head, 16 tokens, 2 channels, pack 16: every byte of the record counted by hand."""
    params = CodecParams(rel_k=0.5, rel_v=0.5, repack="none", pack=16, block=16)
    k = np.zeros((1, 16, 2), np.float16)
    k[0, :, 1] = np.arange(16) % 4  # tokens [0, r], r = 0..3: levels [0, 2] (r > 0) or [0, 0] (r = 0)
    k[0, 0, 1] = 4
    v = np.zeros_like(k)  # all zero: zero-width packs, no payload
    record, _ = encode_block(k, v, params)
    levels = read_record(record, params, 1, 2)
    assert levels.k_levels[0, :, 0].tolist() == [0] * 16
    assert levels.k_levels[0, :, 1].tolist() == [2, 2, 2, 2] + [0, 2, 2, 2] * 3
    assert byte_breakdown(record) == dict(
        record_header=12 + 4 * 3,  # 12-byte header + offsets of 1 token section and 2 channel sections
        k_step=32, v_step=32,  # 16 fp16 steps each
        k_offset=4, v_offset=4,  # every offset 0: base 0, 0 bits per token
        k_pack_header=4 + 1,  # width_bits 2, min_bits 0: 2 fields of 2 bits -> 1 byte
        v_pack_header=4,  # width_bits 0, min_bits 0: no field bits
        k_payload=4,  # channel 0 width 0; channel 1 width 2: 16 * 2 bits
        v_payload=0,
        padding=3)  # after k's pack headers, to 4 bytes; the record, 112 bytes, needs none
    assert record.size == 112


def doc_decode(record: np.ndarray, H: int, T: int, D: int, pack: int):
    """Decode a record the way docs/FORMAT.md tells a kernel to: struct reads at documented offsets,
    payload offsets by prefix sums of widths, fields by a little-endian u64 load and a shift."""
    raw = record.tobytes() + bytes(8)  # the documented 8 bytes of slack for u64 loads
    u8 = lambda at: raw[at]
    u16 = lambda at: struct.unpack_from("<H", raw, at)[0]
    u32 = lambda at: struct.unpack_from("<I", raw, at)[0]

    def field(base: int, bit: int, n: int) -> int:
        word = struct.unpack_from("<Q", raw, base + bit // 8)[0]
        return (word >> (bit % 8)) & ((1 << n) - 1)

    assert u8(0) == 1 and u8(2) == H and u16(4) == T and u16(6) == D and u32(8) == len(record)
    assert 8 << ((u8(1) >> 1) & 3) == pack
    n_units = 1 if u8(1) & 1 else H
    out = np.zeros((2, H, T, D))
    for h in range(H):
        tok = u32(12 + 4 * (0 if n_units == 1 else h))
        kb, vb = u8(tok + 4), u8(tok + 5)
        for kv in range(2):
            sec = u32(12 + 4 * (n_units + 2 * h + kv))
            wb, mb, min_base = u8(sec), u8(sec + 1), u16(sec + 2)
            rows, f = T // pack, wb + mb
            header_bytes = 4 + -(-rows * D * f // 8)
            payload = sec + header_bytes + -header_bytes % 4
            for r in range(rows):
                for c in range(D):
                    i = r * D + c
                    w = field(sec + 4, i * f, wb)
                    mn = min_base + field(sec + 4, i * f + wb, mb)
                    for j in range(pack):
                        t = r * pack + j
                        step = struct.unpack_from("<e", raw, tok + 8 + 2 * kv * T + 2 * t)[0]
                        base, bits = struct.unpack_from("<h", raw, tok + 2 * kv)[0], (kb, vb)[kv]
                        off = base + field(tok + 8 + 4 * T + kv * T * kb // 8, t * bits, bits)
                        out[kv, h, t, c] = (mn + field(payload, j * w, w) + off) * step
                    payload += pack * w // 8
    return out[0], out[1]


@settings(max_examples=25, deadline=None)
@given(blocks())
def test_the_documented_layout_decodes_the_record(case):
    params, k, v = case
    H, T, D = k.shape
    record, _ = encode_block(k, v, params)
    k_doc, v_doc = doc_decode(record, H, T, D, params.pack)
    k_hat, v_hat = decode_block(record, params, H, D)
    np.testing.assert_allclose(k_doc, k_hat, rtol=2.0 ** -22)
    np.testing.assert_allclose(v_doc, v_hat, rtol=2.0 ** -22)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_naming_head_and_token(bad):
    k = np.ones((2, 64, 8), np.float16)
    v = np.ones_like(k)
    k[1, 5, 3] = bad
    with pytest.raises(ValueError, match=r"k has a non-finite.*head 1, token 5"):
        encode_block(k, v, CodecParams())
    with pytest.raises(ValueError, match=r"v has .*block 2, head 1, token 5"):
        encode_blocks(np.stack([v] * 3), np.stack([v, v, k]), CodecParams())


def test_out_of_fp16_range_fp32_input_raises():
    k = np.ones((1, 64, 8), np.float32)
    k[0, 7, 0] = 70000.0
    with pytest.raises(ValueError, match="token 7"):
        encode_block(k, np.ones_like(k), CodecParams())


@pytest.mark.parametrize("kwargs, message", [
    (dict(rel_k=0), "rel_k"), (dict(rel_v=1.5), "rel_v"), (dict(rel_k=float("nan")), "rel_k"),
    (dict(rel_k=True), "rel_k"), (dict(rel_v="0.2"), "rel_v"), (dict(rel_k=1e-5), "rel_k"),
    (dict(granularity="token"), "granularity"), (dict(repack="random"), "repack"),
    (dict(pack=12), "pack"), (dict(pack=16.0), "pack"), (dict(block=40), "block"), (dict(block=0), "block"),
    (dict(pack=32, block=16), "block"), (dict(block=8192), "block"), (dict(block=64.0), "block"),
])
def test_invalid_params_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CodecParams(**kwargs)


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        CodecParams().rel_k = 0.5


def test_wrong_shapes_and_dtypes_raise():
    k = np.zeros((2, 64, 8), np.float16)
    with pytest.raises(ValueError, match="block=64"):
        encode_block(k[:, :32], k[:, :32], CodecParams())
    with pytest.raises(ValueError, match="float16 or float32"):
        encode_block(k.astype(np.float64), k, CodecParams())
    with pytest.raises(ValueError, match="same shape"):
        encode_block(k, k[:1], CodecParams())
    with pytest.raises(ValueError, match="n_blocks"):
        encode_blocks(k, k, CodecParams())


def test_decoder_rejects_foreign_or_damaged_records():
    k = np.random.default_rng(1).standard_normal((2, 64, 8)).astype(np.float16)
    record, _ = encode_block(k, k, CodecParams())
    bad_version = record.copy()
    bad_version[0] = 99
    with pytest.raises(ValueError, match="version 99"):
        decode_block(bad_version, CodecParams(), 2, 8)
    with pytest.raises(ValueError, match="bytes"):
        decode_block(record[:-16], CodecParams(), 2, 8)
    with pytest.raises(ValueError, match="flags"):
        decode_block(record, CodecParams(pack=8), 2, 8)
    with pytest.raises(ValueError, match="flags"):
        decode_block(record, CodecParams(granularity="token-head"), 2, 8)
    with pytest.raises(ValueError, match="head_dim"):
        decode_block(record, CodecParams(), 2, 16)
    with pytest.raises(ValueError, match="n_kv_heads"):
        decode_block(record, CodecParams(), 1, 8)


# ---------------------------------------------------------------------------------------------------
# Pieces: quantization arithmetic, bit streams, the greedy repack
# ---------------------------------------------------------------------------------------------------

def test_special_tokens_decode_exactly_or_within_bound():
    k = np.zeros((1, 16, 4), np.float16)
    k[0, 1] = 3.25  # constant: step |c|, offset 1 -> exact
    k[0, 2] = -65504  # constant fp16 extreme
    k[0, 3] = 2.0 ** -24  # constant subnormal
    k[0, 4] = [65504, -65504, 0, 1]  # widest range: step clamped to 65504, not inf
    k[0, 5] = [2.0 ** -24, 0, 0, 0]  # subnormal range
    params = CodecParams(rel_k=1.0, repack="none", pack=16, block=16)
    record, _ = encode_block(k, k, params)
    levels = read_record(record, params, 1, 4)
    k_hat, _ = levels.dequantize()
    np.testing.assert_array_equal(k_hat[0, :4], k[0, :4].astype(np.float32))  # constants: exact
    np.testing.assert_array_equal(k_hat[0, 5], k[0, 5].astype(np.float32))
    assert levels.k_step[0, 4] == np.float16(65504) and (np.abs(k_hat[0, 4] - k[0, 4]) <= 32752).all()
    assert levels.k_step[0, 0] == np.float16(2.0 ** -24) and levels.k_offset[0, 0] == 0


def test_offset_guard_keeps_offsets_in_int16():
    x = np.full((1, 16, 8), 60000, np.float32)
    x[0, :, 0] += 1.0 / 64  # range 1/64 at 60000 with rel 2**-12: rint(min/step) would be ~1.6e10
    levels, _ = quantize_blocks(x, x, CodecParams(rel_k=2.0 ** -12, repack="none", pack=16, block=16))
    assert (np.abs(levels.k_offset) <= codec.OFFSET_LIMIT).all()
    k_hat, _ = levels.dequantize()
    assert within_bound(x, k_hat, levels.k_step).all()


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 70000, width=32))
def test_round_up_to_fp16(s):
    h = float(round_up_to_fp16(np.float32(s)))
    if s <= 65504:
        assert h >= s
        below = float(np.nextafter(np.float16(h), np.float16(0)))
        assert below < s or h == 2.0 ** -24
    else:
        assert h == 65504


def documented_round_up(s: float) -> float:
    """docs/FORMAT.md's integer-only round_up_to_fp16, for encoders without a rounding-mode intrinsic."""
    s = min(s, 65504.0)
    if s < 2.0 ** -14:
        return max(math.ceil(s * 2.0 ** 24), 1) * 2.0 ** -24
    b = int(np.float32(s).view(np.uint32))
    e, m = (b >> 23) - 127, b & 0x7FFFFF
    m16 = (m >> 13) + (1 if m & 0x1FFF else 0)
    return (1 + m16 / 1024) * 2.0 ** e


def test_documented_integer_round_up_matches():
    rng = np.random.default_rng(7)
    s = np.concatenate([rng.uniform(0, 70000, 3000), 2.0 ** rng.uniform(-30, 16, 3000),
                        np.float16(rng.uniform(0, 65504, 500)).astype(np.float64),  # exact fp16 values
                        [0, 2.0 ** -24, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -10), 65504, 65505, 2047.5]])
    s = s.astype(np.float32)
    expected = round_up_to_fp16(s).astype(np.float64)
    assert [documented_round_up(float(x)) for x in s] == expected.tolist()


def test_bit_width_is_ceil_log2_of_range_plus_one():
    r = np.arange(0, 70000)
    r = r[r < 65536]
    assert np.array_equal(bit_width(r), np.ceil(np.log2(r + 1)).astype(int))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 16), min_size=1, max_size=40), st.integers(0, 2 ** 32 - 1))
def test_bit_fields_roundtrip(widths, seed):
    widths = np.array(widths)
    values = np.random.default_rng(seed).integers(0, 1 << 16, size=widths.size) & ((1 << widths) - 1)
    data = pack_fields(values, widths)
    assert data.size == -(-widths.sum() // 8)
    assert np.array_equal(unpack_fields(data, widths), values)


def test_bit_stream_is_lsb_first():
    # fields 0b101 (3 bits) then 0b11 (2 bits): byte = 0b000_11_101
    assert pack_fields([5, 3], [3, 2]).tolist() == [0b00011101]
    assert pack_fields([0xABC], [12]).tolist() == [0xBC, 0x0A]


def test_greedy_follows_the_spec_on_a_hand_worked_case():
    # two interleaved clusters: evens all [10, 0, 10, 0], odds all [0, 10, 0, 10]. The rounded mean is
    # [5, 5, 5, 5]: every cosine ties, so token 0 seeds; then evens cost 0 bits, lowest index first.
    levels = np.zeros((1, 32, 4), np.uint16)
    levels[0, 0::2] = [10, 0, 10, 0]
    levels[0, 1::2] = [0, 10, 0, 10]
    order = greedy_order(levels, pack=16)
    assert order[0].tolist() == list(range(0, 32, 2)) + list(range(1, 32, 2))
    same = np.ones((2, 48, 3), np.uint16)  # all tokens identical: ties everywhere -> identity
    assert np.array_equal(greedy_order(same, pack=16), np.tile(np.arange(48), (2, 1)))


def test_greedy_seed_is_closest_to_rounded_mean_by_cosine():
    levels = np.array([[[9, 0], [1, 1], [8, 9], [0, 9]] * 4], np.uint16)  # 16 tokens, pack 8
    # rounded mean: sums [72, 76] over 16 -> (2*72 + 16)//32 = 5, (2*76 + 16)//32 = 5 -> [5, 5];
    # cosine is highest (1.0) for [1, 1], first at token 1
    assert greedy_order(levels, pack=8)[0, 0] == 1


def literal_greedy(q: np.ndarray, pack: int) -> list:
    """docs/FORMAT.md's greedy, transcribed literally with Python ints and floats (one block)."""
    q = [[int(x) for x in row] for row in q]
    T = len(q)
    remaining, order = list(range(T)), []
    while len(remaining) > pack:
        n = len(remaining)
        m = [(2 * sum(q[t][c] for t in remaining) + n) // (2 * n) for c in range(len(q[0]))]

        def score(t):
            norm2 = sum(x * x for x in q[t])
            return float(sum(a * b for a, b in zip(q[t], m))) / math.sqrt(float(norm2)) if norm2 else 0.0

        seed = max(remaining, key=lambda t: (score(t), -t))
        lo, hi, members = list(q[seed]), list(q[seed]), [seed]
        remaining.remove(seed)
        for _ in range(pack - 1):
            def cost(t):
                return sum(int(max(h, x) - min(l, x)).bit_length() for l, h, x in zip(lo, hi, q[t]))
            best = min(remaining, key=lambda t: (cost(t), t))
            lo = [min(a, b) for a, b in zip(lo, q[best])]
            hi = [max(a, b) for a, b in zip(hi, q[best])]
            members.append(best)
            remaining.remove(best)
        order += members
    return order + sorted(remaining)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(16, 8), (32, 8), (32, 16), (64, 16), (64, 32)]), st.integers(1, 6),
       st.sampled_from([1, 3, 12, 300]), st.integers(0, 2 ** 32 - 1))
def test_greedy_matches_a_literal_transcription_of_the_spec(shape, channels, top, seed):
    T, pack = shape
    levels = np.random.default_rng(seed).integers(0, top + 1, size=(3, T, channels)).astype(np.uint16)
    order = greedy_order(levels, pack)
    for b in range(3):
        assert order[b].tolist() == literal_greedy(levels[b], pack)


def test_greedy_lowers_total_bits_on_clustered_tokens():
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((4, 3, 1, 32)) * 4
    k = (centers[np.arange(64) % 4][:, :, 0] + 0.05 * rng.standard_normal((64, 3, 32))).transpose(1, 0, 2)
    v = k[:, :, ::-1] * 0.5
    sizes = {}
    for repack in codec.REPACK_METHODS:
        record, _ = encode_block(k.astype(np.float16), v.astype(np.float16), CodecParams(repack=repack))
        b = byte_breakdown(record)
        sizes[repack] = b["k_payload"] + b["v_payload"]
    assert sizes["greedy"] < 0.75 * sizes["none"], sizes
    assert sizes["greedy"] <= sizes["sort"], sizes


def test_empty_batch():
    k = np.zeros((0, 2, 64, 8), np.float16)
    buffer, offsets, perm = encode_blocks(k, k, CodecParams())
    assert buffer.size == 0 and offsets.tolist() == [0] and perm.shape == (0, 2, 64)
    k_hat, _ = decode_blocks(buffer, offsets, CodecParams(), 2, 8)
    assert k_hat.shape == (0, 2, 64, 8)


# ---------------------------------------------------------------------------------------------------
# The widest pack a bound can produce (the decode kernels' NARROW builds rely on it)
# ---------------------------------------------------------------------------------------------------

def record_pack_widths(record: np.ndarray, params: CodecParams, H: int, D: int) -> np.ndarray:
    """Every pack's width field as written in the record (K and V sections of every head)."""
    _, n_units, table = codec._parse_header(record)
    rows, out = params.block // params.pack, []
    for i in range(2 * H):
        start = int(table[n_units + i])
        head = record[start:start + codec.CHANNEL_SECTION_HEADER.itemsize].view(codec.CHANNEL_SECTION_HEADER)[0]
        wb, mb = int(head["width_bits"]), int(head["min_bits"])
        fields = unpack_fields(record[start + codec.CHANNEL_SECTION_HEADER.itemsize:], [wb, mb] * (rows * D))
        out.append(fields.reshape(rows * D, 2)[:, 0])
    return np.concatenate(out)


# Bounds around the NARROW threshold (1/14.98): fp32 neighbours of 1/14 and 1/15 included.
NEAR_15 = sorted({*np.linspace(1 / 16, 1 / 13, 13).tolist(), 1 / 14, 1 / 14.5, 1 / 14.98, 1 / 14.99, 1 / 15,
                  1 / 15.5,
                  float(np.nextafter(np.float32(1 / 15), np.float32(1))),
                  float(np.nextafter(np.float32(1 / 15), np.float32(0))),
                  float(np.nextafter(np.float32(1 / 14), np.float32(0))), 0.1, 0.2})


def test_max_level_and_pack_width_values():
    assert codec.max_level(0.1) == 11 and codec.max_level(0.2) == 6 and codec.max_level(1.0) == 3
    assert codec.max_pack_width(0.1) == 4 and codec.max_pack_width(0.2) == 3
    assert codec.max_pack_width(1 / 14) == 4 and codec.max_pack_width(1 / 14.98) == 4
    assert codec.max_pack_width(1 / 14.99) == 5      # the fp32 margin: 1/15 itself reaches level 16 (ties_block)
    assert codec.max_pack_width(1 / 15) == 5 and codec.max_pack_width(0.01) == 7
    assert codec.max_pack_width(2.0 ** -12) == 13
    assert codec.max_pack_width([0.2, 0.1, 0.01]) == 7          # an array: its smallest bound
    from packkv.kernels.encoder import level_bound              # the GPU encoder's check is the same bound
    assert all(level_bound(r) == codec.max_level(r) for r in NEAR_15 + [2.0 ** -12, 0.01, 1 / 126, 1.0])
    for bad in (0.0, 2.0, 2.0 ** -13):
        with pytest.raises(ValueError):
            codec.max_level(bad)


def test_a_bound_below_one_fifteenth_can_make_a_5_bit_pack():
    """Why the NARROW build needs the guard: at rel 1/15.5 a token spanning [0.5, 16] steps by 1 and
    quantizes to levels 0..16 (rint(0.5) = 0, 16 / 1 = 16), a 5-bit pack."""
    x = np.zeros((1, 1, 16, 4), np.float32)
    x[..., 0], x[..., 1], x[..., 2], x[..., 3] = 0.5, 16.0, 3.0, 7.0
    levels, step, _ = codec.quantize_tokens(x, 1 / 15.5)
    assert levels.max() == 16 and bit_width(levels.max()) == 5 and codec.max_pack_width(1 / 15.5) == 5


def ties_block(shape, rng) -> np.ndarray:
    """Tokens whose ends sit near half-integer multiples of a power-of-two step (rint's worst case),
    at scales from fp16 subnormals to ~30000, with interior values anywhere between."""
    H, T, D = shape
    scale = 2.0 ** rng.integers(-24, 11, size=(H, T, 1))
    lo = (rng.integers(-40, 40, size=(H, T, 1)) + 0.5) * scale
    span = rng.uniform(13.0, 17.0, size=(H, T, 1)) * scale
    x = lo + rng.uniform(0, 1, size=(H, T, D)) * span
    x[..., :1], x[..., 1:2] = lo, lo + span
    return np.clip(x, -65504, 65504).astype(np.float16)


@pytest.mark.parametrize("rel", NEAR_15)
def test_max_pack_width_holds_on_adversarial_blocks(rel):
    """Every level quantize_tokens gives is <= max_level(rel) and every pack width written in a record is
    <= max_pack_width(rel), on every adversarial kind and on near-tie tokens, at bounds around 1/15."""
    rng = np.random.default_rng(int(rel * 1e9))
    H, D, limit = 2, 8, codec.max_level(rel)
    for pack in codec.PACK_SIZES:
        params = CodecParams(rel_k=rel, rel_v=rel, pack=pack, block=2 * pack, repack="sort")
        for kind in KINDS + ("ties",):
            shape = (H, params.block, D)
            k = ties_block(shape, rng) if kind == "ties" else make_block(kind, shape, rng)
            v = make_block("gaussian", shape, rng) if kind == "ties" else ties_block(shape, rng)
            for x in (k, v):
                levels, _, _ = codec.quantize_tokens(x.astype(np.float32), rel)
                assert levels.max() <= limit, (rel, kind)
            record, _ = encode_block(k, v, params)
            widths = record_pack_widths(record, params, H, D)
            assert widths.max() <= codec.max_pack_width(rel), (rel, pack, kind, widths.max())


@SETTINGS
@given(st.sampled_from(NEAR_15), st.sampled_from(KINDS), st.sampled_from(codec.GRANULARITIES),
       st.integers(0, 2 ** 32 - 1))
def test_max_pack_width_holds_hypothesis(rel, kind, granularity, seed):
    rng = np.random.default_rng(seed)
    params = CodecParams(rel_k=rel, rel_v=min(1.0, 2 * rel), granularity=granularity, pack=16, block=32)
    H, D = 2, 12
    k = make_block(kind, (H, 32, D), rng)
    v = ties_block((H, 32, D), rng)
    record, _ = encode_block(k, v, params)
    assert record_pack_widths(record, params, H, D).max() <= codec.max_pack_width(rel)
