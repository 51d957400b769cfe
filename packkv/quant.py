"""The `quant` cache kind: KIVI-style group quantization, the state-of-the-art baseline packkv is measured
against, in the same engine (same fp16 window, same arena, same byte accounting).

KIVI (Liu et al., 2024) quantizes K per channel and V per token:
  K: each channel (of each KV head) over a group of G consecutive tokens;
  V: each token over a group of G consecutive channels (of the layer's KV heads, head-major);
with b bits (2 or 4), an fp16 scale and an fp16 zero per group:
  zero = lo rounded down to fp16, scale = (hi - zero) / (2^b - 1) rounded up to fp16 (0 if hi == zero),
  q = clip(rint((x - zero) / scale), 0, 2^b - 1),  x_hat = q * scale + zero,
so |x - x_hat| <= scale / 2 for every element (plus float32 rounding): rounding the zero down and the
scale up keeps every group's range inside the 2^b levels. A record holds one block of G tokens of one
layer (all KV heads), so each K group is exactly one channel of one block, and BlockCache's blocks are
KIVI's groups; the most recent tokens stay in BlockCache's fp16 window, like KIVI's residual.

Record layout (little-endian, fixed size for given (bits, G, C = kv_heads * head_dim)):
    k_scale  fp16 [C]            one K group per channel
    k_zero   fp16 [C]
    v_scale  fp16 [G, C / G]     one V group per token and G channels
    v_zero   fp16 [G, C / G]
    k_codes  uint8 [C * G * b / 8]   channel-major: channel c's G token codes in a row
    v_codes  uint8 [G * C * b / 8]   token-major: token t's C channel codes in a row
    padding  to a multiple of 16 bytes (none for the usual shapes)
Codes are packed least significant bits first: byte j holds codes 8j/b .. 8j/b + 8/b - 1, code i of the
byte at bits i*b .. i*b + b - 1. Channel index c = head * head_dim + d. Every byte is counted
(`byte_breakdown`); the cache's block-offset table (8 bytes per record) is counted by BlockCache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packkv import codec
from packkv.backend import Backend
from packkv.cache import BlockCache, CacheShape
from packkv.errors import PackkvError

QUANT_BITS = (2, 4)
QUANT_GROUPS = (32, 64, 128)
RECORD_ALIGN = 16


@dataclass(frozen=True)
class QuantParams:
    """bits: 2 or 4 per element. group: G, tokens per K group (= the block) and channels per V group."""

    bits: int = 2
    group: int = 32

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits!r}")
        if isinstance(self.group, bool) or self.group not in QUANT_GROUPS:
            raise ValueError(f"group must be one of {QUANT_GROUPS}, got {self.group!r}")


# ---- quantization of groups -------------------------------------------------------------------------

def round_down_to_fp16(x, xp=np):
    """The largest fp16 <= x (x float32 within fp16's range)."""
    x = xp.asarray(x, dtype=np.float32)
    h = x.astype(np.float16)
    return xp.where(h.astype(np.float32) > x, codec.fp16_neighbor(h, False, xp), h).astype(np.float16)


def quantize_groups(x, bits: int, xp=np):
    """Asymmetric quantization of x [..., n] in groups along its last axis (NumPy or CuPy arrays, xp).

    Returns (codes uint8 [..., n] in 0..2^b-1, scale fp16 [...], zero fp16 [...]) with
    |x - (codes * scale + zero)| <= scale / 2 (+ float32 rounding)."""
    x = xp.asarray(x, dtype=np.float32)
    levels = (1 << bits) - 1
    zero = round_down_to_fp16(x.min(axis=-1), xp)
    zero32 = zero.astype(np.float32)
    spread = x.max(axis=-1) - zero32                                 # >= 0
    scale = xp.where(spread > 0, codec.round_up_to_fp16(spread / np.float32(levels), xp), np.float16(0))
    scale32 = scale.astype(np.float32)
    safe = xp.where(scale32 > 0, scale32, np.float32(1))[..., None]  # a constant group: codes 0, x = zero
    codes = xp.clip(xp.rint((x - zero32[..., None]) / safe), 0, levels)
    return codes.astype(np.uint8), scale.astype(np.float16), zero


def dequantize_groups(codes, scale, zero):
    """codes * scale + zero in float32."""
    return codes.astype(np.float32) * scale.astype(np.float32)[..., None] + zero.astype(np.float32)[..., None]


def pack_bits(codes, bits: int, xp=np):
    """uint8 codes [..., n] (n * bits a multiple of 8) -> bytes [..., n * bits / 8], LSB first."""
    per_byte = 8 // bits
    c = codes.astype(np.uint8).reshape(codes.shape[:-1] + (codes.shape[-1] // per_byte, per_byte))
    shifts = xp.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    return (c << shifts).sum(axis=-1, dtype=np.uint8)   # the fields do not overlap: the sum is their OR


def unpack_bits(packed, bits: int, xp=np):
    """pack_bits' inverse: bytes [..., m] -> codes [..., m * 8 / bits]."""
    per_byte = 8 // bits
    shifts = xp.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    c = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return c.reshape(packed.shape[:-1] + (packed.shape[-1] * per_byte,))


# ---- records ----------------------------------------------------------------------------------------

def record_fields(params: QuantParams, kv_heads: int, head_dim: int) -> dict[str, int]:
    """Bytes of each field of one record, in layout order (padding last)."""
    C, G, b = kv_heads * head_dim, params.group, params.bits
    check_shape(params, kv_heads, head_dim)
    fields = {"k_scale": 2 * C, "k_zero": 2 * C, "v_scale": 2 * C, "v_zero": 2 * C,
              "k_codes": C * G * b // 8, "v_codes": G * C * b // 8}
    fields["padding"] = -sum(fields.values()) % RECORD_ALIGN
    return fields


def record_bytes(params: QuantParams, kv_heads: int, head_dim: int) -> int:
    return sum(record_fields(params, kv_heads, head_dim).values())


def byte_breakdown(params: QuantParams, kv_heads: int, head_dim: int, n_records: int) -> dict[str, int]:
    """Every byte of n records, by field: sums to n * record_bytes."""
    return {name: n * n_records for name, n in record_fields(params, kv_heads, head_dim).items()}


def check_shape(params: QuantParams, kv_heads: int, head_dim: int) -> None:
    C = kv_heads * head_dim
    if C % params.group:
        raise PackkvError(f"quant: V groups of {params.group} channels do not tile the {C} channels of a token "
                          f"(kv_heads {kv_heads} x head_dim {head_dim}); choose --quant-group from "
                          f"{[g for g in QUANT_GROUPS if C % g == 0]}")


def encode_blocks(k_blocks, v_blocks, params: QuantParams, xp=np):
    """k, v [n, kv_heads, G, head_dim] -> (uint8 buffer, int64 offsets [n + 1]): one record per block.
    xp: the arrays' module (NumPy, or CuPy: the GPU encodes the same bytes where the blocks are)."""
    n, H, G, D = k_blocks.shape
    if G != params.group or v_blocks.shape != k_blocks.shape:
        raise ValueError(f"quant.encode_blocks: k {k_blocks.shape} and v {v_blocks.shape} must both be "
                         f"[n, kv_heads, {params.group}, head_dim]")
    for name, x in (("K", k_blocks), ("V", v_blocks)):
        if xp is np or not bool(xp.isfinite(x).all()):   # on the GPU, the host names the bad token
            codec.check_finite(x if xp is np else x.get(), name)
    C, b = H * D, params.bits
    if n == 0:
        return xp.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    k_channels = xp.ascontiguousarray(k_blocks.transpose(0, 1, 3, 2)).reshape(n, C, G)  # [n, C, G tokens]
    v_tokens = xp.ascontiguousarray(v_blocks.transpose(0, 2, 1, 3)).reshape(n, G, C // G, G)
    kq, ks, kz = quantize_groups(k_channels, b, xp)
    vq, vs, vz = quantize_groups(v_tokens, b, xp)
    fields = record_fields(params, H, D)

    def as_bytes(x):
        return xp.ascontiguousarray(x).view(np.uint8).reshape(n, -1)

    parts = [as_bytes(ks), as_bytes(kz), as_bytes(vs), as_bytes(vz),
             pack_bits(kq.reshape(n, -1), b, xp), pack_bits(vq.reshape(n, -1), b, xp),
             xp.zeros((n, fields["padding"]), dtype=np.uint8)]
    records = xp.concatenate(parts, axis=1)
    size = records.shape[1]
    return records.reshape(-1), np.arange(n + 1, dtype=np.int64) * size


def decode_records(records, params: QuantParams, kv_heads: int, head_dim: int, xp=np):
    """Records uint8 [n, record_bytes] (NumPy or CuPy, xp) -> (k_hat, v_hat) float32 [n, kv_heads, G, head_dim]."""
    fields = record_fields(params, kv_heads, head_dim)
    n = records.shape[0]
    cut = np.cumsum([0] + list(fields.values()))
    part = {name: records[:, cut[i]:cut[i + 1]] for i, name in enumerate(fields)}
    H, D, G, b = kv_heads, head_dim, params.group, params.bits
    C = H * D

    def fp16(name):
        return xp.ascontiguousarray(part[name]).view(np.float16)

    k = dequantize_groups(unpack_bits(part["k_codes"], b, xp).reshape(n, C, G),
                          fp16("k_scale").reshape(n, C), fp16("k_zero").reshape(n, C))
    v = dequantize_groups(unpack_bits(part["v_codes"], b, xp).reshape(n, G, C // G, G),
                          fp16("v_scale").reshape(n, G, C // G), fp16("v_zero").reshape(n, G, C // G))
    k_hat = k.reshape(n, H, D, G).transpose(0, 1, 3, 2)
    v_hat = v.reshape(n, G, H, D).transpose(0, 2, 1, 3)
    return xp.ascontiguousarray(k_hat), xp.ascontiguousarray(v_hat)


def decode_blocks(buffer: np.ndarray, offsets: np.ndarray, params: QuantParams, kv_heads: int, head_dim: int):
    """encode_blocks' output -> (k_hat, v_hat) float32 [n, kv_heads, G, head_dim]."""
    size = record_bytes(params, kv_heads, head_dim)
    offsets = np.asarray(offsets, dtype=np.int64)
    if not (np.diff(offsets) == size).all():
        raise ValueError(f"quant records are {size} bytes each; the offsets do not step by that")
    records = np.asarray(buffer[offsets[0]:offsets[-1]]).reshape(len(offsets) - 1, size)
    return decode_records(records, params, kv_heads, head_dim)


def records_at(arena, starts, size: int, xp=np):
    """The records of `size` bytes that start at arena[starts[i]] (any order), [len(starts), size]."""
    return arena[xp.asarray(starts, dtype=np.int64)[:, None] + xp.arange(size)]


def decode_attention_reference(q, buffer, block_offsets, n_blocks, window_k, window_v, window_len,
                               params: QuantParams):
    """Twin of kernels.attention_kernels.quant_decode_attention, float32 [B, Hq, D]: softmax(q K^T /
    sqrt(D)) V per sequence over its n_blocks[b] records (at buffer[block_offsets[b, i]]) then its
    window_len[b] fp16 window tokens (window_k/v [B, Hkv, W_cap, D]); zeros where there is nothing."""
    q = np.asarray(q, dtype=np.float64)
    window_k, window_v = np.asarray(window_k), np.asarray(window_v)
    B, Hq, D = q.shape
    Hkv = window_k.shape[1]
    size = record_bytes(params, Hkv, D)
    out = np.zeros((B, Hq, D), np.float32)
    for b in range(B):
        k_hat, v_hat = decode_records(records_at(np.asarray(buffer), np.asarray(block_offsets)[b, :n_blocks[b]],
                                                 size), params, Hkv, D)
        wl = int(np.clip(window_len[b], 0, window_k.shape[2]))
        k, v = (np.concatenate([x.transpose(1, 0, 2, 3).reshape(Hkv, x.shape[0] * x.shape[2], D), w[b, :, :wl]], axis=1)
                .astype(np.float64) for x, w in ((k_hat, window_k), (v_hat, window_v)))
        if k.shape[1] == 0:
            continue
        scores = np.einsum("hgd,htd->hgt", q[b].reshape(Hkv, Hq // Hkv, D), k) / np.sqrt(D)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[b] = (np.einsum("hgt,htd->hgd", p, v) / p.sum(axis=-1, keepdims=True)).reshape(Hq, D)
    return out


# ---- the cache kind ---------------------------------------------------------------------------------

class QuantCache(BlockCache):
    """KIVI-style group quantization: blocks of G tokens as fixed-size records, the recent tokens in fp16.

    On the GPU the records are encoded on the device (CuPy, the same bytes as NumPy's) and decode
    attention reads them in registers (kernels/quant_attention.cu), inside the captured decode graph;
    prefill chunks decode the blocks they need. On the CPU, BlockCache's reference path."""

    kind = "quant"

    def __init__(self, shape: CacheShape, backend: Backend, params: QuantParams = QuantParams(),
                 window: int = 128, max_new_tokens: int = 512):
        check_shape(params, shape.kv_heads, shape.head_dim)
        self.params = params
        super().__init__(shape, backend, params.group, window, max_new_tokens, keep_decoded=not backend.is_gpu)

    @property
    def graph_capturable(self) -> bool:
        return self.backend.is_gpu

    def attend(self, layer: int, q):
        if not (self.backend.is_gpu and self.pending == 1):
            return super().attend(layer, q)
        from packkv.kernels.attention_kernels import quant_decode_attention
        out = quant_decode_attention(q[:, :, 0], self.arena.data, self.block_offsets[layer], self.device_n_blocks,
                                     self.window_k[layer], self.window_v[layer], self.window_ends, self.params,
                                     arena_address=self.arena.address)
        return out[:, :, None]

    def decompress(self, offsets):
        s, xp = self.shape, self.backend.xp
        records = records_at(self.arena.data, offsets, record_bytes(self.params, s.kv_heads, s.head_dim), xp)
        k, v = decode_records(records, self.params, s.kv_heads, s.head_dim, xp)
        # [n, Hkv, G, D] -> [Hkv, n * G, D]
        return tuple(x.transpose(1, 0, 2, 3).reshape(s.kv_heads, x.shape[0] * x.shape[2], s.head_dim) for x in (k, v))

    def encode(self, k_blocks, v_blocks, params=None, token_rel=None):   # one parameter set: both always None here
        return encode_blocks(k_blocks, v_blocks, self.params, self.backend.xp)

    def decode(self, buffer, offsets):
        return decode_blocks(buffer, offsets, self.params, self.shape.kv_heads, self.shape.head_dim)

    def kind_params(self) -> dict:
        return vars(self.params)
