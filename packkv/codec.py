"""THE definition of packkv's compressed KV format: a NumPy reference encoder and decoder.

PackKV's method (arXiv 2512.24449) for the K and V of one layer, one block of tokens at a time:

1. Quantize token-wise with a relative error bound: per token, ``step = (max - min) * rel`` over the
   token's channels (one KV head's, or all KV heads' of the layer); integer levels
   ``q = rint(x/step) - rint(min/step)`` (nonnegative); keep ``step`` (fp16) and the integer offset
   ``off = rint(min/step)`` per token. Decoding is ``x_hat = (q + off) * step`` and
   ``|x - x_hat| <= step/2`` (plus float32 rounding of the division and product).
2. Repack: reorder the block's tokens so that similar integer vectors share a pack. K and V share one
   permutation, so attention over the decoded block (a sum over tokens) needs no un-permuting and the
   permutation is never stored.
3. Bit-pack: per pack of P tokens x 1 channel, a header (bit width w and pack minimum) and the P values
   minus the minimum in w bits each.

docs/FORMAT.md describes the byte layout that this module writes, the exact arithmetic a GPU encoder
must reproduce bit for bit, and the decode math of the attention kernels. Every kernel is tested against
this module, never the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
GRANULARITIES = ("token-head", "token-layer")
REPACK_METHODS = ("none", "sort", "greedy")
PACK_SIZES = (8, 16, 32)

FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive (subnormal) fp16: the smallest step we store
OFFSET_LIMIT = 32767  # |rint(x/step)| never exceeds this: offsets fit int16, levels fit uint16
MIN_REL = 2.0 ** -12  # at most ~4097 levels per token: keeps widths and the greedy cost small

# WIDTH[r] = ceil(log2(r + 1)) = bit length of r, for every range r a uint16 level can span.
WIDTH = np.array([int(r).bit_length() for r in range(1 << 16)], dtype=np.uint8)


def bit_width(values) -> np.ndarray:
    """ceil(log2(v + 1)) elementwise: the bits needed to store 0..v (0 for v == 0)."""
    return WIDTH[np.asarray(values, dtype=np.int64)]


@dataclass(frozen=True)
class CodecParams:
    """The knobs of the format; the encoder and the decoder must be given the same ones.

    rel_k, rel_v: relative error bounds of K and V (step = (max - min) * rel per token), in [2**-12, 1].
    granularity: 'token-layer' (one step/offset per token over all KV heads' channels of the layer, one
      permutation for the whole layer block) or 'token-head' (per token and KV head, a permutation per head).
    repack: 'none', 'sort' or 'greedy' (PackKV's); K and V always share the permutation.
    pack: tokens per pack, 8, 16 or 32. block: tokens per block, a multiple of pack, at most 4096.
    """

    rel_k: float = 0.1
    rel_v: float = 0.2
    granularity: str = "token-layer"
    repack: str = "greedy"
    pack: int = 16
    block: int = 64

    def __post_init__(self):
        for name in ("rel_k", "rel_v"):
            rel = getattr(self, name)
            if isinstance(rel, bool) or not isinstance(rel, (int, float, np.floating, np.integer)):
                raise ValueError(f"{name} must be a number, got {rel!r}")
            if not (MIN_REL <= float(rel) <= 1.0):
                raise ValueError(f"{name} must be in [2**-12, 1] (a relative error bound), got {rel!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.repack not in REPACK_METHODS:
            raise ValueError(f"repack must be one of {REPACK_METHODS}, got {self.repack!r}")
        if (not isinstance(self.pack, (int, np.integer)) or isinstance(self.pack, bool)
                or self.pack not in PACK_SIZES):
            raise ValueError(f"pack must be one of {PACK_SIZES}, got {self.pack!r}")
        if (isinstance(self.block, bool) or not isinstance(self.block, (int, np.integer))
                or not (self.pack <= self.block <= 4096) or self.block % self.pack):
            raise ValueError(f"block must be a multiple of pack ({self.pack}) in [{self.pack}, 4096], "
                             f"got {self.block!r}")


# ----------------------------------------------------------------------------------------------------
# 1. Token-wise quantization
# ----------------------------------------------------------------------------------------------------

def fp16_neighbor(h, up: bool, xp=np):
    """The next fp16 after h (fp16 array) toward +inf (up) or -inf, by its bits: nextafter, which CuPy
    lacks for fp16. +-0 steps to +-2**-24; inf steps down to 65504."""
    bits = h.view(np.uint16).astype(np.int32)
    positive = bits < 0x8000
    zero = (bits & 0x7FFF) == 0
    away_from_zero = positive if up else ~positive
    stepped = xp.where(away_from_zero, bits + 1, bits - 1)
    stepped = xp.where(zero, 0x0001 if up else 0x8001, stepped)
    return stepped.astype(np.uint16).view(np.float16)


def round_up_to_fp16(s, xp=np):
    """The smallest fp16 >= s (s float32, >= 0), clamped to [2**-24, 65504]: the step we store.

    Rounding up (never to nearest) keeps the stored step exactly the one used to quantize and the
    number of levels at most 1/rel + 1. The GPU encoder does the same with __float2half_ru.
    """
    s = xp.minimum(xp.asarray(s, dtype=np.float32), np.float32(FP16_MAX))
    h = s.astype(np.float16)
    h = xp.where(h.astype(np.float32) < s, fp16_neighbor(h, True, xp), h)
    return xp.maximum(h, np.float16(FP16_TINY)).astype(np.float16)


def max_level(rel) -> int:
    """An upper bound on every level quantize_tokens can produce at bound(s) rel (a number or an array:
    the bound of the smallest), hence on every pack's max - min: the format's "levels at most 1/rel + 1".

    With step >= s >= (hi - lo) * float32(rel) (round_up_to_fp16 rounds up; the offset guard and the
    constant-token case only make the step larger), (hi - lo) / step <= 1/rel up to fp32 rounding of
    hi - lo, of the product and of x / step (|x / step| <= ~32767: at most ~2**-9 off each end), and
    rint of both ends adds at most 1. The one step smaller than s is the 65504 clamp, which needs
    s > 65504 >= (hi - lo) / 2, i.e. (hi - lo) / step <= 2: hence at least 3. The GPU encoder
    (kernels/encoder.py, bit-identical) uses the same bound and fails loudly on a level above it.
    """
    r = float(np.min(np.asarray(rel, dtype=np.float32)))
    if not (MIN_REL <= r <= 1.0):
        raise ValueError(f"rel must be in [2**-12, 1] (a relative error bound), got {r!r}")
    return max(3, int(np.floor(1.0 / r * (1 + 1e-6) + 0.01)) + 1)


def max_pack_width(rel) -> int:
    """The widest pack (bits per value) any block encoded at bound(s) rel can hold: bit_width(max_level).
    4 (the decode kernels' NARROW builds) for every rel >= 1/14.98 (the margin for fp32 rounding); 5 from ~1/14.99 down."""
    return int(bit_width(max_level(rel)))


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise ValueError naming the first bad token if x [..., T, C] has NaN/inf or leaves fp16's range.

    The message names the index along each leading axis (e.g. head and token) so the caller need only
    add the layer.
    """
    bad = ~np.isfinite(x) | (np.abs(np.where(np.isfinite(x), x, 0)) > FP16_MAX)
    if bad.any():
        where = np.argwhere(bad.any(axis=-1))[0]
        names = ("block", "head", "token")[-len(where):] if len(where) <= 3 else None
        loc = ", ".join(f"{n} {i}" for n, i in zip(names, where)) if names else f"index {tuple(where)}"
        raise ValueError(f"{what} has a non-finite or out-of-fp16-range value (NaN, inf or |x| > 65504) "
                         f"at {loc}")


def quantize_tokens(x: np.ndarray, rel):
    """Token-wise quantization of x [..., T, C] over its last axis (the token's channels).

    rel: the relative bound, a number or one per token (an array broadcastable to [..., T]: the encoder
    chooses each token's bound; the record stores the step, never the bound, so decoding is the same).

    Returns (levels uint16 [..., T, C], step fp16 [..., T], offset int32 [..., T]) with
    x ~= (levels + offset) * step and |x - (levels + offset) * step| <= step/2 (+ fp32 rounding).
    The arithmetic, in float32 with IEEE round-to-nearest-even, is exactly what a GPU encoder does:
      lo, hi = min(x), max(x); amax = max(-lo, hi)
      s = (hi - lo) * float32(rel)
      s = amax if s == 0            # constant token: step |c| decodes it exactly, offset +-1 (0 if c == 0)
      s = max(s, amax / 32767)      # offset guard: |rint(x/step)| <= 32767, levels fit uint16
      step = round_up_to_fp16(s)    # in [2**-24, 65504]
      offset = rint(lo / step); levels = rint(x / step) - offset
    """
    x = np.asarray(x, dtype=np.float32)
    lo = x.min(axis=-1)
    hi = x.max(axis=-1)
    amax = np.maximum(-lo, hi)
    s = (hi - lo) * np.asarray(rel, dtype=np.float32)
    s = np.where(s == 0, amax, s)
    s = np.maximum(s, amax / np.float32(OFFSET_LIMIT))
    step = round_up_to_fp16(s)
    step32 = step.astype(np.float32)
    offset = np.rint(lo / step32)
    levels = np.rint(x / step32[..., None]) - offset[..., None]
    return levels.astype(np.uint16), step, offset.astype(np.int32)


def dequantize_tokens(levels: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(levels + offset) * step in float32: the decoder's (and the kernels') exact arithmetic."""
    ints = levels.astype(np.int32) + np.asarray(offset, dtype=np.int32)[..., None]
    return ints.astype(np.float32) * np.asarray(step).astype(np.float32)[..., None]


# ----------------------------------------------------------------------------------------------------
# 2. Repacking: one permutation of a block's tokens, shared by K and V
# ----------------------------------------------------------------------------------------------------

def repack_order(levels: np.ndarray, method: str, pack: int) -> np.ndarray:
    """Token order [..., T] (storage position -> original token) for integer vectors levels [..., T, C].

    levels holds, per token, the concatenation of its K and V levels over the unit's channels, so the
    one order serves both. 'none': identity. 'sort': stable sort by the token's level sum.
    'greedy': PackKV's greedy packing (see greedy_order).
    """
    levels = np.asarray(levels)
    lead, (T, C) = levels.shape[:-2], levels.shape[-2:]
    if method == "none":
        return np.broadcast_to(np.arange(T), lead + (T,)).copy()
    if method == "sort":
        key = levels.astype(np.int64).sum(axis=-1)
        return np.argsort(key, axis=-1, kind="stable")
    if method == "greedy":
        flat = levels.reshape(-1, T, C)
        chunks = [greedy_order(flat[i:i + 64], pack) for i in range(0, len(flat), 64)]  # bounded temporaries
        order = np.concatenate(chunks) if chunks else np.zeros((0, T), dtype=np.int64)
        return order.reshape(lead + (T,))
    raise ValueError(f"repack must be one of {REPACK_METHODS}, got {method!r}")


def greedy_order(levels: np.ndarray, pack: int) -> np.ndarray:
    """PackKV's greedy repack of B independent blocks at once: levels [B, T, C] -> order [B, T].

    Pack by pack, while more than one pack's worth of tokens remain:
      seed: m = the rounded mean of the remaining tokens' vectors, per channel, in integers
            (m = (2*sum + n) // (2*n), n = number remaining); the seed is the remaining token with the
            largest cosine to m, computed as float64(dot(q_t, m)) / sqrt(float64(dot(q_t, q_t)))
            (0 for an all-zero q_t; m's norm is common to all and left out); ties -> lowest index.
      grow: pack-1 times, add the remaining token t that minimizes
            sum over channels of bit_width(max(pack_max, q_t) - min(pack_min, q_t)),
            i.e. the one that grows the pack's total bit width least; ties -> lowest index.
    The last pack takes the remaining tokens in ascending index order.
    Vectorized over blocks, candidates and channels; the loop is over the T positions only.
    """
    levels = np.asarray(levels, dtype=np.uint16)
    B, T, C = levels.shape
    rows, col = np.arange(B), np.arange(B)[:, None]
    narrow = levels.astype(np.uint8) if levels.max(initial=0) < 256 else levels  # faster cost loop
    norms = np.sqrt(np.einsum("btc,btc->bt", levels, levels, dtype=np.int64).astype(np.float64))
    left = np.broadcast_to(np.arange(T), (B, T))  # remaining tokens per block, ascending
    order = np.empty((B, T), dtype=np.int64)
    for start in range(0, T - pack, pack):
        # Only the remaining tokens are candidates: gather them once per pack, in ascending index order,
        # so that argmin/argmax's first hit is still the lowest original index.
        cand, cand_narrow = levels[col, left], narrow[col, left]  # [B, n_left, C]
        n_left = T - start
        mean = (2 * cand.sum(axis=1, dtype=np.int64) + n_left) // (2 * n_left)
        dots = np.einsum("btc,bc->bt", cand, mean, dtype=np.int64).astype(np.float64)
        cand_norms = norms[col, left]
        cos = np.divide(dots, cand_norms, out=np.zeros_like(dots), where=cand_norms > 0)
        pick = np.argmax(cos, axis=1)
        taken = np.zeros((B, n_left), dtype=bool)
        pack_min = cand_narrow[rows, pick].copy()
        pack_max = pack_min.copy()
        for pos in range(start, start + pack):
            if pos > start:
                span = (np.maximum(pack_max[:, None, :], cand_narrow)
                        - np.minimum(pack_min[:, None, :], cand_narrow))
                cost = WIDTH[span].sum(axis=-1, dtype=np.int32)
                cost[taken] = np.iinfo(np.int32).max
                pick = np.argmin(cost, axis=1)
                np.minimum(pack_min, cand_narrow[rows, pick], out=pack_min)
                np.maximum(pack_max, cand_narrow[rows, pick], out=pack_max)
            order[:, pos] = left[rows, pick]
            taken[rows, pick] = True
        left = left[~taken].reshape(B, n_left - pack)
    order[:, T - pack:] = left
    return order


# ----------------------------------------------------------------------------------------------------
# Quantize + repack a block (or many): the integer content of records, before any byte is written
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockLevels:
    """The integer content of one or many blocks, tokens in storage (permuted) order.

    k_levels, v_levels: uint16 [..., H, T, D]; k_step, v_step: fp16 [..., H, T];
    k_offset, v_offset: int32 [..., H, T]. x_hat = (levels + offset) * step per token and head
    (for 'token-layer' the step and offset of a token are the same for every head).
    Kernels' NumPy reference twins compute on these directly, e.g.
    q . k_t = step_t * (q . levels_t + offset_t * sum(q)).
    """

    k_levels: np.ndarray
    k_step: np.ndarray
    k_offset: np.ndarray
    v_levels: np.ndarray
    v_step: np.ndarray
    v_offset: np.ndarray

    def dequantize(self):
        """(k_hat, v_hat), float32 [..., H, T, D], in storage order."""
        return (dequantize_tokens(self.k_levels, self.k_step, self.k_offset),
                dequantize_tokens(self.v_levels, self.v_step, self.v_offset))


def _as_kv_array(x, name: str, params: CodecParams) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32):
        raise ValueError(f"{name} must be float16 or float32, got {x.dtype}")
    if x.ndim < 3 or x.shape[-2] != params.block:
        raise ValueError(f"{name} must have shape [..., n_kv_heads, block={params.block}, head_dim], "
                         f"got {x.shape}")
    if not (1 <= x.shape[-3] <= 255 and 1 <= x.shape[-1] <= 65535):
        raise ValueError(f"{name}: n_kv_heads must be in [1, 255] and head_dim in [1, 65535], got {x.shape}")
    return x.astype(np.float32)


def token_bounds(token_rel, lead: tuple, T: int):
    """Validate per-token bounds (rel_k, rel_v), each of shape [T] or lead + (T,) (lead: the blocks' axes
    before H, T, D) -> two float32 arrays of shape lead + (T,), or None for None."""
    if token_rel is None:
        return None
    if len(token_rel) != 2:
        raise ValueError("token_rel must be (rel_k, rel_v), each one bound per token")
    out = []
    for name, rel in zip(("rel_k", "rel_v"), token_rel):
        rel = np.asarray(rel, dtype=np.float64)
        if rel.shape not in ((T,), tuple(lead) + (T,)):
            raise ValueError(f"token_rel's {name} must have shape [block={T}] or {list(lead) + [T]}, got {list(rel.shape)}")
        if not np.all((rel >= MIN_REL) & (rel <= 1.0)):
            raise ValueError(f"token_rel's {name} must be in [2**-12, 1] (relative error bounds)")
        out.append(np.broadcast_to(rel.astype(np.float32), tuple(lead) + (T,)))
    return out


def quantize_blocks(k, v, params: CodecParams, token_rel=None):
    """Quantize and repack blocks k, v [..., H, T, D] -> (BlockLevels in storage order, perm [..., H, T]).

    perm[..., h, s] is the original token index stored at position s for head h (every head the same
    for 'token-layer'). K and V share it. Raises ValueError on NaN/inf/out-of-fp16-range input, naming
    the block (if any), head and token.
    token_rel: None (every token at params' rel_k, rel_v) or (rel_k, rel_v), one bound per token of the
    block ([T], or [..., T] per block): e.g. a sequence's first tokens (attention sinks) at tighter bounds.
    Only the steps change; the record's format and its decoding are the same.
    """
    k = _as_kv_array(k, "k", params)
    v = _as_kv_array(v, "v", params)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    check_finite(k, "k")
    check_finite(v, "v")
    H, T, D = k.shape[-3:]
    if params.granularity == "token-layer":  # unit = [..., T, H*D]: all heads' channels of a token
        to_unit = lambda x: np.moveaxis(x, -3, -2).reshape(x.shape[:-3] + (T, H * D))
        from_unit = lambda u: np.moveaxis(u.reshape(u.shape[:-1] + (H, D)), -2, -3)
    else:  # unit = [..., H, T, D]: one head's channels
        to_unit = from_unit = lambda x: x
    rel_k, rel_v = params.rel_k, params.rel_v
    bounds = token_bounds(token_rel, k.shape[:-3], T)
    if bounds is not None:    # [..., T]: a unit's tokens are its last axis but one ([..., H, T] per head)
        rel_k, rel_v = (b if params.granularity == "token-layer" else b[..., None, :] for b in bounds)
    kq, ks, ko = quantize_tokens(to_unit(k), rel_k)
    vq, vs, vo = quantize_tokens(to_unit(v), rel_v)
    order = repack_order(np.concatenate([kq, vq], axis=-1), params.repack, params.pack)  # [..., T]
    permute = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - order.ndim)),
                                           axis=order.ndim - 1)
    if params.granularity == "token-layer":
        per_head = lambda t: np.broadcast_to(t[..., None, :], t.shape[:-1] + (H, T)).copy()
        perm = per_head(order)
        levels = BlockLevels(from_unit(permute(kq)), per_head(permute(ks)), per_head(permute(ko)),
                             from_unit(permute(vq)), per_head(permute(vs)), per_head(permute(vo)))
    else:
        perm = order
        levels = BlockLevels(permute(kq), permute(ks), permute(ko), permute(vq), permute(vs), permute(vo))
    return levels, perm


# ----------------------------------------------------------------------------------------------------
# 3. Bit streams: LSB-first (stream bit i is bit i % 8 of byte i // 8), so a little-endian u32/u64
#    load at any byte followed by a right shift extracts a field, as the GPU decoder does.
# ----------------------------------------------------------------------------------------------------

def pack_fields(values, widths) -> np.ndarray:
    """Concatenate fields (value i in widths[i] bits, LSB-first) into bytes, zero-padded to a byte."""
    values = np.asarray(values, dtype=np.uint32)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape).ravel()
    values = values.ravel()
    if values.size == 0 or widths.max() == 0:
        return np.zeros(0, dtype=np.uint8)
    bit = np.arange(widths.max(), dtype=np.uint32)
    in_field = bit < widths[:, None]
    stream = ((values[:, None] >> bit) & 1).astype(np.uint8)[in_field]  # row-major = stream order
    return np.packbits(stream, bitorder="little")


def unpack_fields(data: np.ndarray, widths) -> np.ndarray:
    """Inverse of pack_fields: read consecutive fields of the given widths from data (bytes) -> int64."""
    widths = np.asarray(widths, dtype=np.int64).ravel()
    if widths.size == 0 or widths.max() == 0:
        return np.zeros(widths.size, dtype=np.int64)
    bits = np.unpackbits(np.asarray(data, dtype=np.uint8), bitorder="little")
    starts = np.cumsum(widths) - widths
    if starts[-1] + widths[-1] > bits.size:
        raise ValueError("record is truncated: a bit field runs past its section")
    bit = np.arange(widths.max(), dtype=np.int64)
    in_field = bit < widths[:, None]
    picked = bits[np.where(in_field, starts[:, None] + bit, 0)].astype(np.int64) & in_field
    return (picked << bit).sum(axis=1)


def _pad(n: int, align: int) -> int:
    """Bytes of zero padding that bring n up to a multiple of align."""
    return -n % align


# ----------------------------------------------------------------------------------------------------
# 4. The record of one block (one layer, all KV heads, K and V): see docs/FORMAT.md for the diagram
# ----------------------------------------------------------------------------------------------------

RECORD_HEADER = np.dtype([("version", "u1"), ("flags", "u1"), ("n_kv_heads", "u1"), ("reserved", "u1"),
                          ("block", "<u2"), ("head_dim", "<u2"), ("record_bytes", "<u4")])  # 12 bytes
TOKEN_SECTION_HEADER = np.dtype([("k_off_base", "<i2"), ("v_off_base", "<i2"), ("k_off_bits", "u1"),
                                 ("v_off_bits", "u1"), ("reserved", "<u2")])  # 8 bytes
CHANNEL_SECTION_HEADER = np.dtype([("width_bits", "u1"), ("min_bits", "u1"), ("min_base", "<u2")])  # 4
SECTION_ALIGN = 4  # every section starts 4-byte aligned: the decoder reads u32 words
RECORD_ALIGN = 16  # every record is a multiple of 16 bytes: records in an arena stay 16-byte aligned


def _flags(params: CodecParams) -> int:
    """bit 0: granularity is token-layer; bits 1-2: log2(pack) - 3."""
    return int(params.granularity == "token-layer") | (int(params.pack).bit_length() - 4) << 1


def _n_units(params: CodecParams, n_kv_heads: int) -> int:
    return 1 if params.granularity == "token-layer" else n_kv_heads


def _struct_bytes(dtype: np.dtype, **fields) -> np.ndarray:
    rec = np.zeros(1, dtype=dtype)
    for name, value in fields.items():
        rec[name] = value
    return rec.view(np.uint8)


def _token_section(k_step, k_offset, v_step, v_offset) -> np.ndarray:
    """Per-token steps (fp16) and offsets (base + fixed-width unsigned deltas) of one unit's K and V."""
    k_base, v_base = int(k_offset.min()), int(v_offset.min())
    k_bits, v_bits = int(bit_width(k_offset.max() - k_base)), int(bit_width(v_offset.max() - v_base))
    parts = [_struct_bytes(TOKEN_SECTION_HEADER, k_off_base=k_base, v_off_base=v_base,
                           k_off_bits=k_bits, v_off_bits=v_bits),
             k_step.astype("<f2").view(np.uint8), v_step.astype("<f2").view(np.uint8),
             pack_fields(k_offset - k_base, k_bits), pack_fields(v_offset - v_base, v_bits)]
    return _concat_aligned(parts, SECTION_ALIGN)


def _channel_section(levels: np.ndarray, pack: int) -> np.ndarray:
    """One head's K or V levels [T, D] in storage order -> pack headers + payload.

    Pack (r, c) = tokens r*pack .. r*pack+pack-1 of channel c. Its header field, at bit
    (r*D + c) * (width_bits + min_bits) of the header stream: width in width_bits bits, then
    min - min_base in min_bits bits. Its payload (pack * width bits, whole bytes) follows the payloads
    of all packs (r', c') before it in row-major order: value j at bit j * width, minus the pack min.
    """
    T, D = levels.shape
    packs = levels.reshape(T // pack, pack, D).transpose(0, 2, 1).astype(np.int64)  # [rows, D, pack]
    pack_min = packs.min(axis=2)
    width = bit_width(packs.max(axis=2) - pack_min).astype(np.int64)
    min_base = int(pack_min.min())
    width_bits, min_bits = int(bit_width(width.max())), int(bit_width((pack_min - min_base).max()))
    header = _struct_bytes(CHANNEL_SECTION_HEADER, width_bits=width_bits, min_bits=min_bits,
                           min_base=min_base)
    fields = np.stack([width, pack_min - min_base], axis=-1)
    headers = pack_fields(fields, np.array([width_bits, min_bits]))
    payload = pack_fields(packs - pack_min[..., None], np.broadcast_to(width[..., None], packs.shape))
    return _concat_aligned([_concat_aligned([header, headers], SECTION_ALIGN), payload], SECTION_ALIGN)


def _concat_aligned(parts, align: int) -> np.ndarray:
    out = np.concatenate([np.asarray(p, dtype=np.uint8) for p in parts])
    return np.concatenate([out, np.zeros(_pad(out.size, align), dtype=np.uint8)])


def write_record(levels: BlockLevels, params: CodecParams) -> np.ndarray:
    """Serialize one block's BlockLevels ([H, T, D], storage order) into its record bytes (uint8)."""
    H, T, D = levels.k_levels.shape
    n_units = _n_units(params, H)
    sections = [_token_section(levels.k_step[u], levels.k_offset[u], levels.v_step[u], levels.v_offset[u])
                for u in range(n_units)]
    for h in range(H):
        sections += [_channel_section(levels.k_levels[h], params.pack),
                     _channel_section(levels.v_levels[h], params.pack)]
    table_start = RECORD_HEADER.itemsize
    first = table_start + 4 * len(sections)
    starts = first + np.concatenate([[0], np.cumsum([s.size for s in sections])[:-1]])
    body_end = first + sum(s.size for s in sections)
    total = body_end + _pad(body_end, RECORD_ALIGN)
    header = _struct_bytes(RECORD_HEADER, version=FORMAT_VERSION, flags=_flags(params), n_kv_heads=H,
                           block=T, head_dim=D, record_bytes=total)
    return _concat_aligned([header, starts.astype("<u4").view(np.uint8), *sections], RECORD_ALIGN)


def _parse_header(record: np.ndarray):
    """(header fields, section offset table) of one record, checking the version and the length."""
    record = np.asarray(record)
    if record.dtype != np.uint8 or record.ndim != 1:
        raise ValueError(f"a record must be a 1-D uint8 array, got {record.dtype} {record.shape}")
    if record.size < RECORD_HEADER.itemsize:
        raise ValueError(f"record of {record.size} bytes is shorter than its {RECORD_HEADER.itemsize}-byte header")
    head = record[:RECORD_HEADER.itemsize].view(RECORD_HEADER)[0]
    if head["version"] != FORMAT_VERSION:
        raise ValueError(f"record has format version {head['version']}, this codec reads {FORMAT_VERSION}")
    if head["record_bytes"] != record.size:
        raise ValueError(f"record header says {head['record_bytes']} bytes, got {record.size}")
    n_units = 1 if head["flags"] & 1 else int(head["n_kv_heads"])
    n_sections = n_units + 2 * int(head["n_kv_heads"])
    table_end = RECORD_HEADER.itemsize + 4 * n_sections
    table = record[RECORD_HEADER.itemsize:table_end].view("<u4").astype(np.int64)
    if table.size != n_sections or np.any(table < table_end) or np.any(table > record.size):
        raise ValueError("record's section offset table is truncated or points outside the record")
    return head, n_units, table


def _expect(params: CodecParams, head, n_kv_heads: int, head_dim: int) -> None:
    want = dict(flags=_flags(params), n_kv_heads=n_kv_heads, block=params.block, head_dim=head_dim)
    for name, value in want.items():
        if int(head[name]) != value:
            raise ValueError(f"record has {name}={int(head[name])}, the decoder was told {value} "
                             f"(params {params})")


def _read_token_section(record: np.ndarray, start: int, T: int):
    head = record[start:start + TOKEN_SECTION_HEADER.itemsize].view(TOKEN_SECTION_HEADER)[0]
    steps = record[start + 8:start + 8 + 4 * T].view("<f2").astype(np.float16)
    k_bits, v_bits = int(head["k_off_bits"]), int(head["v_off_bits"])
    offsets = unpack_fields(record[start + 8 + 4 * T:], [k_bits] * T + [v_bits] * T)
    return (steps[:T], offsets[:T] + int(head["k_off_base"]),
            steps[T:], offsets[T:] + int(head["v_off_base"]))


def _read_channel_section(record: np.ndarray, start: int, T: int, D: int, pack: int) -> np.ndarray:
    head = record[start:start + CHANNEL_SECTION_HEADER.itemsize].view(CHANNEL_SECTION_HEADER)[0]
    width_bits, min_bits = int(head["width_bits"]), int(head["min_bits"])
    rows = T // pack
    header_start = start + CHANNEL_SECTION_HEADER.itemsize
    fields = unpack_fields(record[header_start:], [width_bits, min_bits] * (rows * D)).reshape(rows, D, 2)
    width, pack_min = fields[..., 0], fields[..., 1] + int(head["min_base"])
    header_bytes = CHANNEL_SECTION_HEADER.itemsize + -(-rows * D * (width_bits + min_bits) // 8)
    payload_start = start + header_bytes + _pad(header_bytes, SECTION_ALIGN)
    values = unpack_fields(record[payload_start:], np.repeat(width.ravel(), pack)).reshape(rows, D, pack)
    return (values + pack_min[..., None]).transpose(0, 2, 1).reshape(T, D)


def read_record(record: np.ndarray, params: CodecParams, n_kv_heads: int, head_dim: int) -> BlockLevels:
    """Parse one record into its BlockLevels ([H, T, D], storage order), checking it matches params."""
    head, n_units, table = _parse_header(record)
    _expect(params, head, n_kv_heads, head_dim)
    H, T, D = n_kv_heads, params.block, head_dim
    units = [_read_token_section(record, int(table[u]), T) for u in range(n_units)]
    per_head = lambda i: np.stack([units[0 if n_units == 1 else h][i] for h in range(H)])
    channel = lambda h, kv: _read_channel_section(record, int(table[n_units + 2 * h + kv]), T, D, params.pack)
    return BlockLevels(np.stack([channel(h, 0) for h in range(H)]).astype(np.uint16),
                       per_head(0), per_head(1).astype(np.int32),
                       np.stack([channel(h, 1) for h in range(H)]).astype(np.uint16),
                       per_head(2), per_head(3).astype(np.int32))


# ----------------------------------------------------------------------------------------------------
# The public entry points
# ----------------------------------------------------------------------------------------------------

def encode_block(k, v, params: CodecParams = CodecParams(), token_rel=None):
    """Compress one block: k, v [n_kv_heads, block, head_dim] (fp16 or fp32) of one layer; token_rel:
    optional (rel_k [block], rel_v [block]), each token's own bounds (quantize_blocks).

    Returns (record uint8 [n_bytes], perm int64 [n_kv_heads, block]): perm[h, s] is the original token
    stored at position s for head h (the same for every head under 'token-layer'), shared by K and V.
    """
    if np.ndim(k) != 3:
        raise ValueError(f"encode_block takes k, v of shape [n_kv_heads, block, head_dim], got {np.shape(k)}")
    levels, perm = quantize_blocks(k, v, params, token_rel)
    return write_record(levels, params), perm


def decode_block(record, params: CodecParams, n_kv_heads: int, head_dim: int):
    """Decompress one record -> (k_hat, v_hat), float32 [n_kv_heads, block, head_dim], storage order."""
    return read_record(record, params, n_kv_heads, head_dim).dequantize()


def encode_blocks(k, v, params: CodecParams = CodecParams(), token_rel=None):
    """Compress n_blocks blocks at once: k, v [n_blocks, n_kv_heads, block, head_dim] of one layer (or
    of many layers: blocks are independent); token_rel: optional (rel_k, rel_v), each [block] or
    [n_blocks, block], each token's own bounds (quantize_blocks).

    Returns (buffer uint8, offsets int64 [n_blocks + 1], perm int64 [n_blocks, n_kv_heads, block]):
    record b is buffer[offsets[b]:offsets[b+1]]; each record's length is a multiple of 16.
    """
    if np.ndim(k) != 4:
        raise ValueError(f"encode_blocks takes k, v of shape [n_blocks, n_kv_heads, block, head_dim], "
                         f"got {np.shape(k)}")
    levels, perm = quantize_blocks(k, v, params, token_rel)
    records = [write_record(BlockLevels(*(getattr(levels, f)[b] for f in BlockLevels.__dataclass_fields__)),
                            params) for b in range(np.shape(k)[0])]
    offsets = np.concatenate([[0], np.cumsum([r.size for r in records])]).astype(np.int64)
    buffer = np.concatenate(records) if records else np.zeros(0, dtype=np.uint8)
    return buffer, offsets, perm


def decode_blocks(buffer, offsets, params: CodecParams, n_kv_heads: int, head_dim: int):
    """Decompress encode_blocks' output -> (k_hat, v_hat), float32 [n_blocks, n_kv_heads, block, head_dim]."""
    offsets = np.asarray(offsets, dtype=np.int64)
    decoded = [decode_block(buffer[offsets[b]:offsets[b + 1]], params, n_kv_heads, head_dim)
               for b in range(offsets.size - 1)]
    shape = (0, n_kv_heads, params.block, head_dim)
    if not decoded:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    return np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded])


# ----------------------------------------------------------------------------------------------------
# Byte accounting: every byte of a record belongs to exactly one component
# ----------------------------------------------------------------------------------------------------

BREAKDOWN_KEYS = ("record_header", "k_step", "v_step", "k_offset", "v_offset", "k_pack_header",
                  "v_pack_header", "k_payload", "v_payload", "padding")


def byte_breakdown(buffer, offsets=None) -> dict:
    """Bytes per component of one record, or of all records of an encode_blocks buffer (with offsets).

    Computed from the content (widths, bit counts) and the alignment rules, not from the lengths, so
    sum(byte_breakdown(buf, offsets).values()) == buf.size is a real check of the writer:
      record_header  12-byte header + the u32 section offset table
      k_step/v_step  fp16 per-token steps
      k_offset/...   per-token offsets: 4 header bytes (base, bit count) + the bit-packed deltas
      k_pack_header  4-byte section header + the bit-packed (width, min) field of every pack
      k_payload      the bit-packed level deltas of every pack (pack * width bits each)
      padding        zero bytes that align sections to 4 and records to 16
    """
    buffer = np.asarray(buffer)
    offsets = np.array([0, buffer.size]) if offsets is None else np.asarray(offsets, dtype=np.int64)
    total = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for b in range(offsets.size - 1):
        for key, n in _record_breakdown(buffer[offsets[b]:offsets[b + 1]]).items():
            total[key] += n
    return total


def _record_breakdown(record: np.ndarray) -> dict:
    head, n_units, table = _parse_header(record)
    T, D, H = int(head["block"]), int(head["head_dim"]), int(head["n_kv_heads"])
    pack = 8 << ((int(head["flags"]) >> 1) & 3)
    out = dict.fromkeys(BREAKDOWN_KEYS, 0)
    out["record_header"] = RECORD_HEADER.itemsize + 4 * table.size
    end = out["record_header"]
    for u in range(n_units):
        sec = record[table[u]:table[u] + TOKEN_SECTION_HEADER.itemsize].view(TOKEN_SECTION_HEADER)[0]
        out["k_step"] += 2 * T
        out["v_step"] += 2 * T
        out["k_offset"] += 4 + T * int(sec["k_off_bits"]) // 8
        out["v_offset"] += 4 + T * int(sec["v_off_bits"]) // 8
        used = TOKEN_SECTION_HEADER.itemsize + 4 * T + T * (int(sec["k_off_bits"]) + int(sec["v_off_bits"])) // 8
        out["padding"] += _pad(used, SECTION_ALIGN)
        end = max(end, table[u] + used + _pad(used, SECTION_ALIGN))
    for s in range(2 * H):
        start = int(table[n_units + s])
        sec = record[start:start + CHANNEL_SECTION_HEADER.itemsize].view(CHANNEL_SECTION_HEADER)[0]
        width_bits, min_bits = int(sec["width_bits"]), int(sec["min_bits"])
        headers = CHANNEL_SECTION_HEADER.itemsize + -(-(T // pack) * D * (width_bits + min_bits) // 8)
        fields = unpack_fields(record[start + CHANNEL_SECTION_HEADER.itemsize:],
                               [width_bits, min_bits] * ((T // pack) * D))
        payload = int(fields[0::2].sum()) * pack // 8
        kv = "kv"[s % 2]
        out[f"{kv}_pack_header"] += headers
        out[f"{kv}_payload"] += payload
        out["padding"] += _pad(headers, SECTION_ALIGN) + _pad(payload, SECTION_ALIGN)
        end = max(end, start + headers + _pad(headers, SECTION_ALIGN) + payload + _pad(payload, SECTION_ALIGN))
    out["padding"] += _pad(int(end), RECORD_ALIGN)
    return out
