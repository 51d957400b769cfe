"""Launchers of the compressed-KV kernels (kernels/packkv_*.cu, quant_attention.cu), loaded with cupy.RawModule.

    compressed_decode_attention(q, arena, block_offsets, n_blocks, window_k, window_v, window_len, params)
    quant_decode_attention(q, arena, block_offsets, n_blocks, window_k, window_v, window_len, quant_params)
    decompress_blocks(arena, offsets, params, n_kv_heads, head_dim) -> (k, v)
    k_gemv(q, arena, block_offsets, n_blocks, params, n_kv_heads) -> scores
    v_gemv(p, arena, block_offsets, n_blocks, params, n_kv_heads, head_dim) -> out

Storage (what the packkv cache keeps on the device, per layer): one uint8 arena of records (the output of
codec.encode_blocks, each 16-byte aligned, with >= 16 bytes of slack after the last one); a block-offset
table int64 [B, max_blocks] of byte offsets into the arena; n_blocks int32 [B]; the fp16 window of recent
uncompressed tokens window_k, window_v [B, Hkv, W_cap, D] with window_len int32 [B]. Lengths live on the
device and the grids depend only on shapes (max_blocks, W_cap), so a captured CUDA graph can replay with
changing lengths. Every launcher checks shapes, dtypes, device, contiguity and what the kernels support,
and raises ValueError saying what it refuses. NumPy twins: packkv.attention.compressed_attention_reference,
k_gemv_reference, v_gemv_reference, decode_records; packkv.quant.decode_attention_reference.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np

from packkv import codec
from packkv.codec import CodecParams
from packkv.kernels.launch import kernel_source, launch

WARPS = 4                     # PK_WARPS in packkv_common.cuh
MERGE_THREADS = 512           # PK_MERGE_THREADS in packkv_attention.cu
META_SLOT_BYTES = 192         # PK_META_SLOT_BYTES: where an item's sections are, per staging slot


def warp_extra(slots: int) -> int:
    """PK_WARP_EXTRA(slots): a warp's weights, token table, meta, zero section and mbarriers."""
    return 2176 + 1024 + slots * META_SLOT_BYTES + 64 + 16


CTA_Q_PER_TILE = {0: 256, 1: 256, 2: 0}    # PK_CTA_Q_PER_TILE(mode): the CTA's q fragments (item mode)
WORK_PER_TILE = {0: 32 * 20, 1: 32 * 4, 2: 32 * 20}    # PK_WORK_PER_TILE(mode): a warp's offsets, o
PBUF_BYTES = 2176             # PK_PBUF_BYTES: a warp's fp16 softmax weights
SMEM_PER_SM = 233472          # H100: 228 KB of shared memory per SM, 1 KB of it reserved per CTA
# The fused kernel in item mode, by staging slots per warp (its `slots`): 1 gives 3 CTAs per SM (PK_MINB),
# 2 the double-buffered pipeline at 2 CTAs per SM (PK_MINB_2SLOTS)
CTAS_PER_SM = {1: 3, 2: 2}
ITEM_SLOTS = None             # compressed_decode_attention's slots when not given; None: item_slots chooses
                              # from the shapes (bench/knockout.py sets 1 or 2 to compare them)
GEMV_CTAS_PER_SM = 3          # PK_MINB_GEMV: the K/V GEMVs (two slots per warp), which their slots fit
GEMV_SPLIT_CTAS_PER_SM = 2    # the CTAs per SM the GEMVs' splits aim at, as before the fused kernel went to 3
                              # (their launch bounds and slots allow 3; not measured)
# Tile mode of the fused kernel (pk_attention_tiles): the CTA's warps share each item, by 16-channel tiles
TILE_CTAS_PER_SM = 3          # PK_MINB_TILES
TILE_CTA_EXTRA = 1024 + 384 + 64 + 16 + WARPS * 8 * 32 * 16 + 256   # PK_CTA_EXTRA: ttab, meta, zero, mbarriers,
                                                                     # partial scores, scan totals
TILE_WORK_PER_TILE = 32 * 32  # PK_TILE_WORK_PER_TILE: q fragments, K/V offsets, o per warp and tile
TILE_CHANNELS = 16 * WARPS    # tile mode needs head_dim a multiple of this (every warp the same tiles)
TILE_ITEMS_PER_WARP = 1.0     # tile mode when item mode would give each warp of a full grid at most this many
                              # items (a guess from the PK_PROF profile; measured only at the ends: tile mode
                              # wins at SmolLM2's 8K, loses at the 8B shape's 128K x 1 and 32K x 8, knockout_*.json)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


def _module(file: str, names: tuple[str, ...]):
    # PACKKV_NVRTC_DEFINES (e.g. "-DPK_MINB=2 -DPK_PROF"): tuning and diagnostics builds
    return _module_with(file, names, tuple(os.environ.get("PACKKV_NVRTC_DEFINES", "").split()))


@lru_cache(maxsize=None)
def _module_with(file: str, names: tuple[str, ...], defines: tuple[str, ...]):
    import cupy
    return cupy.RawModule(code=kernel_source(file), options=("-std=c++17",) + defines, name_expressions=names)


def split_kernel_name(kernel: str, D: int, P: int, narrow: bool = False, slots: int = 1) -> str:
    """The template instance of a split kernel: the NARROW build (no wide unpack path) when narrow; for
    pk_attention_splits, the staging slots per warp (1 is the template's default)."""
    if slots != 1:
        if kernel != "pk_attention_splits":
            raise ValueError(f"{kernel} has no slots parameter (only pk_attention_splits has)")
        return f"{kernel}<{D}, {P}, {'true' if narrow else 'false'}, {slots}>"
    return f"{kernel}<{D}, {P}, true>" if narrow else f"{kernel}<{D}, {P}>"


def module_names(file: str, D: int = 0, P: int = 0, narrow: bool = False, slots: int = 1) -> tuple[str, ...]:
    """The template instances compiled together (one nvrtc run per file, (head_dim, pack) and, for the
    fused kernel, narrow: the NARROW build of the split kernels, packkv_attention.cu's header; slots: the
    item-mode kernel with that many staging slots per warp, where 2 (the double-buffered pipeline, for
    comparisons) leaves out the tile-mode kernel, which is the same in both)."""
    if file == "packkv_attention.cu":
        tiles = (split_kernel_name("pk_attention_tiles", D, P, narrow),) if D % TILE_CHANNELS == 0 and slots == 1 else ()
        return (split_kernel_name("pk_attention_splits", D, P, narrow, slots),) + tiles + (f"pk_merge_window<{D}>",)
    if file == "packkv_gemv.cu":
        return (f"pk_k_gemv<{D}, {P}>", f"pk_v_gemv<{D}, {P}>", "pk_v_reduce")
    return ("pk_decompress<8>", "pk_decompress<16>", "pk_decompress<32>")


def _function(file: str, name: str, D: int = 0, P: int = 0, shared: int = 0, narrow: bool = False, slots: int = 1):
    """The kernel, opted in to `shared` bytes of dynamic shared memory where its static shared memory
    and those bytes together pass the default 48 KiB."""
    fn = _module(file, module_names(file, D, P, narrow, slots)).get_function(name)
    if shared and shared + _static_shared_bytes(file, name, D, P, narrow, slots) > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = shared
    return fn


@lru_cache(maxsize=None)
def _static_shared_bytes(file: str, name: str, D: int, P: int, narrow: bool = False, slots: int = 1) -> int:
    return int(_module(file, module_names(file, D, P, narrow, slots)).get_function(name).shared_size_bytes)


def precompile(head_dim: int, pack: int, narrow: bool = False, slots: int = 1) -> None:
    """Compile the modules of (head_dim, pack) now (nvrtc takes seconds per module); narrow: the fused
    kernel's NARROW build (what a cache with narrow bounds launches) instead of the wide one; slots: its
    item mode with that many staging slots per warp (2: the double-buffered pipeline)."""
    _module("packkv_attention.cu", module_names("packkv_attention.cu", head_dim, pack, narrow, slots))
    _module("packkv_gemv.cu", module_names("packkv_gemv.cu", head_dim, pack))


@lru_cache(maxsize=None)
def multiprocessors() -> int:
    import cupy
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------

def _fail(fn: str, what: str):
    raise ValueError(f"{fn}: {what}")


def _cupy_array(fn, name, x, dtype, ndim, device=None):
    import cupy
    if not isinstance(x, cupy.ndarray):
        _fail(fn, f"{name} must be a CuPy array on the GPU, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        _fail(fn, f"{name} must be {np.dtype(dtype).name}, got {x.dtype}")
    if x.ndim != ndim:
        _fail(fn, f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if not x.flags.c_contiguous:
        _fail(fn, f"{name} must be C-contiguous (got strides {x.strides} for shape {x.shape})")
    if x.size and x.data.ptr % 16:
        _fail(fn, f"{name} must start 16-byte aligned (a fresh CuPy array does; a sliced view may not)")
    if device is not None and x.device.id != device:
        _fail(fn, f"{name} is on GPU {x.device.id}, the other arguments on GPU {device}")
    return x


def _check_params(fn, params):
    if not isinstance(params, CodecParams):
        _fail(fn, f"params must be a packkv.codec.CodecParams, got {type(params).__name__}")
    T = params.block
    if not (T in (16, 32, 64) or T % 128 == 0):
        _fail(fn, f"block {T} is not supported by the GPU kernels (16, 32, 64 or a multiple of 128)")


def _check_head_dim(fn, D):
    if D % 16 or not 16 <= D <= MAX_HEAD_DIM:
        _fail(fn, f"head_dim {D} is not supported (a multiple of 16 from 16 to {MAX_HEAD_DIM})")


def _kv_heads(fn, Hq, n_kv_heads) -> int:
    """The KV head count, checked: 1..255 (a record's u8 field) and dividing the query heads."""
    Hkv = int(n_kv_heads)
    if Hkv < 1 or Hkv > 255 or Hq % Hkv:
        _fail(fn, f"{Hq} query heads are not a multiple of {Hkv} KV heads (1..255)")
    return Hkv


def _check_arena(fn, arena, block_offsets, n_blocks, B):
    _cupy_array(fn, "arena", arena, np.uint8, 1)
    dev = arena.device.id
    _cupy_array(fn, "block_offsets", block_offsets, np.int64, 2, dev)
    _cupy_array(fn, "n_blocks", n_blocks, np.int32, 1, dev)
    if block_offsets.shape[0] != B or n_blocks.shape != (B,):
        _fail(fn, f"block_offsets {block_offsets.shape} and n_blocks {n_blocks.shape} must be [B={B}, max_blocks] "
                  f"and [B={B}]")
    return dev


def _check_window(fn, window_k, window_v, window_len, B, D, dev):
    """The fp16 window of a decode call, checked; returns its KV head count."""
    _cupy_array(fn, "window_k", window_k, np.float16, 4, dev)
    _cupy_array(fn, "window_v", window_v, np.float16, 4, dev)
    _cupy_array(fn, "window_len", window_len, np.int32, 1, dev)
    if window_k.shape != window_v.shape or window_k.shape[0] != B or window_k.shape[3] != D:
        _fail(fn, f"window_k {window_k.shape} and window_v {window_v.shape} must both be [B={B}, Hkv, W_cap, D={D}]")
    if window_len.shape != (B,):
        _fail(fn, f"window_len must be [B={B}], got {window_len.shape}")
    return window_k.shape[1]


def _out_array(fn, out, shape, dtype, dev, names: str = "[B, Hq, D]"):
    """The launcher's output: checked when given, made when None."""
    import cupy
    if out is None:
        return cupy.empty(shape, dtype)
    _cupy_array(fn, "out", out, dtype, len(shape), dev)
    if out.shape != shape:
        _fail(fn, f"out must be {names} = {shape}, got {out.shape}")
    return out


def _workspace_array(fn, workspace, need: int, formula: str, dev):
    """A float32 workspace of at least `need` elements: checked when given, made when None."""
    import cupy
    if workspace is None:
        return cupy.empty(need, np.float32)
    _cupy_array(fn, "workspace", workspace, np.float32, 1, dev)
    if workspace.size < need:
        _fail(fn, f"workspace holds {workspace.size} float32, {need} are needed ({formula})")
    return workspace


def _decode_buffers(fn, out, workspace, arena, arena_address, B, Hq, D, n_splits, dev):
    """A decode call's out, workspace and arena address: checked when given, made when None."""
    import cupy
    workspace = _workspace_array(fn, workspace, attention_workspace_size(B, Hq, D, n_splits),
                                 f"attention_workspace_size({B}, {Hq}, {D}, {n_splits})", dev)
    out = _out_array(fn, out, (B, Hq, D), np.float16, dev)
    if arena_address is None:
        arena_address = cupy.asarray([arena.data.ptr], dtype=np.uint64)
    else:
        _cupy_array(fn, "arena_address", arena_address, np.uint64, 1, dev)
    return out, workspace, arena_address


def _merge_window(q, window_k, window_v, window_len, workspace, n_splits, Hkv, out, P: int = 16,
                  narrow: bool = False, slots: int = 1):
    """pk_merge_window: the splits' states and the window, one softmax (both compressed caches). P,
    narrow, slots: the module to take it from (the split kernel's own, so that no other module is compiled)."""
    B, Hq, D = q.shape
    W_cap = window_k.shape[2]
    merge_fn = _function("packkv_attention.cu", f"pk_merge_window<{D}>", D, P, narrow=narrow, slots=slots)
    launch(merge_fn, (Hq, B), (MERGE_THREADS,), (q, window_k, window_v, window_len, workspace, np.int32(n_splits),
                                                 np.int32(Hkv), np.int32(Hq // Hkv), np.int32(W_cap), _qscale(D), out))
    return out


def _qscale(D: int) -> np.float32:
    """Scores in the log2 domain (the kernels use exp2): log2(e) / sqrt(D)."""
    return np.float32(math.log2(math.e) / math.sqrt(D))


# ---------------------------------------------------------------------------------------------------
# Launch geometry
# ---------------------------------------------------------------------------------------------------

def blocks_per_item(T: int) -> int:
    return max(1, 128 // T)


def _items(max_blocks: int, T: int) -> int:
    return -(-max(max_blocks, 1) // blocks_per_item(T))


def _ctas_per_split(batch: int, kv_heads: int, group: int) -> int:
    """A split kernel's CTAs per split: one per (sequence, KV head, tile of 8 query heads)."""
    return batch * kv_heads * -(-group // 8)


def default_splits(batch: int, kv_heads: int, group: int, max_blocks: int, T: int,
                   ctas_per_sm: int = GEMV_SPLIT_CTAS_PER_SM) -> int:
    """Splits of each sequence's blocks for the packkv kernels in item mode (the GEMVs; the fused kernel's
    long-context mode, with its CTAS_PER_SM): tiles of 8 query heads, items of blocks_per_item(T) blocks.
    Depends on shapes only (the table's capacity), never on the lengths."""
    return splits_over(_ctas_per_split(batch, kv_heads, group), _items(max_blocks, T), ctas_per_sm)


def splits_over(ctas_per_split: int, items: int, ctas_per_sm: int, items_per_split: int = WARPS) -> int:
    """At most ctas_per_sm CTAs per SM in all, so that the grid is one wave (rounding up left a second,
    mostly idle wave: 320 CTAs on 264 slots for 8 sequences x 8 KV heads), with the items per split a
    multiple of items_per_split (item mode: WARPS, so that every warp of a CTA gets the same whole number of
    items; tile mode: 1): the fewest splits whose longest warp has as few items as that many CTAs allow.
    The 8B shape at 128K tokens, 3 CTAs per SM: 43 splits of 24 items (6 per warp); 49 splits would give
    21 items, 6 for the first warp all the same."""
    items = max(1, items)
    wanted = max(1, ctas_per_sm * multiprocessors() // ctas_per_split)
    most = -(-items // wanted)                                     # items per split at `wanted` splits
    per_split = -(-most // items_per_split) * items_per_split      # rounded up to whole items per warp
    return -(-items // per_split)


def item_slots(slots: int | None, batch: int, kv_heads: int, group: int, max_blocks: int, T: int) -> int:
    """The fused kernel's staging slots per warp in item mode: `slots`, else ITEM_SLOTS, else from the shapes:
    one slot (3 CTAs per SM) where its grid holds more than 2 CTAs per SM, two (the double-buffered pipeline
    at 2 CTAs per SM) otherwise: with at most 2 CTAs on an SM the one slot adds no warps and only takes away
    the second buffer. Measured side by side (H100, 8B shape, real K/V, NARROW, bench/attention.py --slots 1 2
    and bench/knockout.py --slots both, 676ebb6): 32K x 1 (256 CTAs for 264 places at 2 per SM) 43.9 us one
    slot against 39.8 two; 128K x 1 (344 CTAs) 119.0 against 120.4; 32K x 8 (384 CTAs) the step's split
    kernel 7451 us against 8335."""
    slots = ITEM_SLOTS if slots is None else slots
    if slots is None:
        one_slot_grid = _ctas_per_split(batch, kv_heads, group) * default_splits(batch, kv_heads, group, max_blocks,
                                                                                 T, CTAS_PER_SM[1])
        return 1 if one_slot_grid > 2 * multiprocessors() else 2
    return checked_slots(slots)


def checked_slots(slots) -> int:
    if isinstance(slots, (bool, np.bool_)) or slots not in CTAS_PER_SM:
        raise ValueError(f"slots must be one of {sorted(CTAS_PER_SM)} (staging slots per warp), got {slots!r}")
    return int(slots)


def tile_mode(batch: int, kv_heads: int, group: int, head_dim: int, max_blocks: int, T: int,
              slots: int | None = None) -> bool:
    """Whether compressed_decode_attention decodes in tile mode by default, from shapes only (the table's
    capacity, never the lengths: a captured graph replays as they grow). Item mode (a warp per item) is
    latency-bound when the GPU has about one item per warp: SmolLM2 (9/3/64) at 8K tokens gives 48 CTAs
    whose warps each decode one item from start to end. Tile mode there: the CTA's 4 warps decode each
    item together (warp w its 16-channel tiles), ~4x the CTAs. Needs head_dim a multiple of 64. slots:
    item mode's staging slots per warp, which set its CTAs per SM (None: item_slots' choice)."""
    if head_dim % TILE_CHANNELS:
        return False
    full_grid_warps = CTAS_PER_SM[item_slots(slots, batch, kv_heads, group, max_blocks, T)] * WARPS * multiprocessors()
    return _ctas_per_split(batch, kv_heads, group) * _items(max_blocks, T) <= TILE_ITEMS_PER_WARP * full_grid_warps


def decode_geometry(batch: int, kv_heads: int, group: int, head_dim: int, max_blocks: int, T: int,
                    tiles: bool | None = None, n_splits: int | None = None,
                    slots: int | None = None) -> tuple[bool, int]:
    """(tiles, n_splits) of compressed_decode_attention: the given ones, or tile_mode's and
    attention_splits' from the shapes (and item mode's slots per warp, None: item_slots' choice). attention_workspace
    sizes its buffer with the same answer."""
    if tiles is None:
        tiles = tile_mode(batch, kv_heads, group, head_dim, max_blocks, T, slots)
    return bool(tiles), int(n_splits or attention_splits(batch, kv_heads, group, max_blocks, T, bool(tiles), slots))


def attention_splits(batch: int, kv_heads: int, group: int, max_blocks: int, T: int, tiles: bool,
                     slots: int | None = None) -> int:
    """Splits of compressed_decode_attention: in item mode default_splits with the CTAs per SM of its slots
    per warp (None: item_slots' choice); in tile mode up to TILE_CTAS_PER_SM CTAs per SM with at least one item per
    split (a split's items are decoded in turn)."""
    if not tiles:
        slots = item_slots(slots, batch, kv_heads, group, max_blocks, T)
        return default_splits(batch, kv_heads, group, max_blocks, T, CTAS_PER_SM[slots])
    return splits_over(_ctas_per_split(batch, kv_heads, group), _items(max_blocks, T), TILE_CTAS_PER_SM, 1)


def default_slot_bytes(T: int, D: int, P: int, mode: int, tiles: bool = False, slots: int = 1) -> int:
    """Bytes of one staging slot: an item's spans at ~2.6 bits per element (real K/V: 1.6-2.3), capped so
    that the kernel's CTAs per SM fit: the fused kernel in item mode 3 with one slot per warp (`slots` 1;
    <= 168 registers) or 2 with two, the GEMVs 3 (two slots per warp, <= 160 registers),
    tile mode 3 (two slots per CTA instead of per warp, <= 168 registers). Spans that do not fit are read
    from global memory (correct, slower). mode: 0 fused, 1 K-GEMV, 2 V-GEMV; tiles: the fused kernel's tile
    mode."""
    token = 8 + 4 * T + 2 * T + 32
    section = 4 + (T // P) * D + 4 + math.ceil(T * D * 2.6 / 8) + 16
    block = token + (2 if mode == 0 else 1) * section + 32
    if tiles:
        cap = (SMEM_PER_SM // TILE_CTAS_PER_SM - 1024 - _shared_bytes(0, D, 0, True)) // 2 // 16 * 16
    else:
        n = slots if mode == 0 else 2
        per_cta = SMEM_PER_SM // (CTAS_PER_SM[n] if mode == 0 else GEMV_CTAS_PER_SM) - 1024
        cap = (per_cta - _item_layout_bytes(0, D, mode, n)) // (WARPS * n) // 16 * 16
    return int(max(256, min(cap, -(-blocks_per_item(T) * block // 256) * 256)))


def _checked_slot_bytes(fn: str, slot) -> int:
    """A staging slot's bytes as the split kernels need them: the bulk copies into a slot and the token
    table's 16-byte stores behind it want a multiple of 16; an item's headers want at least 256."""
    slot = int(slot)
    if slot % 16 or slot < 256:
        _fail(fn, f"slot_bytes must be a multiple of 16 of at least 256, got {slot}")
    return slot


def _item_layout_bytes(slot: int, D: int, mode: int, slots: int) -> int:
    """pk_warp_smem's layout (item mode): the CTA's q fragments, then per warp `slots` slots of `slot`
    bytes, the fixed part and the per-tile work."""
    KT = D // 16
    return KT * CTA_Q_PER_TILE[mode] + WARPS * (slots * slot + warp_extra(slots) + KT * WORK_PER_TILE[mode])


def _shared_bytes(slot: int, D: int, mode: int, tiles: bool = False, slots: int = 1) -> int:
    """Dynamic shared memory of a split kernel with slots of `slot` bytes: tile mode two per CTA; item mode
    `slots` per warp for the fused kernel (mode 0; as default_slot_bytes), two for the GEMVs; at least what
    the end's merge of the warps' states needs."""
    merge = WARPS * 8 * D * 4 + WARPS * 8 * 2 * 4          # the CTA's merge of its warps' states (tiles: one)
    if tiles:
        return max(2 * slot + TILE_CTA_EXTRA + WARPS * (PBUF_BYTES + D // TILE_CHANNELS * TILE_WORK_PER_TILE),
                   merge // WARPS)
    return max(_item_layout_bytes(slot, D, mode, slots if mode == 0 else 2), merge)


def attention_workspace_size(batch: int, n_heads: int, head_dim: int, n_splits: int) -> int:
    """float32 elements of the workspace of compressed_decode_attention: one (o[D], m, l) per query head
    and split."""
    return batch * n_heads * n_splits * (head_dim + 2)


def attention_workspace(batch: int, n_heads: int, n_kv_heads: int, head_dim: int, max_blocks: int, params,
                        n_splits: int | None = None, tiles: bool | None = None, slots: int | None = None):
    """A float32 workspace for compressed_decode_attention with these shapes (allocate it once, outside a
    CUDA graph capture, and pass it on every call); n_splits, tiles and slots as the launcher will use them
    (default: all from the shapes)."""
    import cupy
    _, n_splits = decode_geometry(batch, n_kv_heads, n_heads // n_kv_heads, head_dim, max_blocks, params.block,
                                  tiles, n_splits, slots)
    return cupy.empty(attention_workspace_size(batch, n_heads, head_dim, n_splits), np.float32)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

def compressed_decode_attention(q, arena, block_offsets, n_blocks, window_k, window_v, window_len, params,
                                out=None, workspace=None, n_splits: int | None = None,
                                slot_bytes: int | None = None, arena_address=None, tiles: bool | None = None,
                                narrow: bool = False, slots: int | None = None):
    """Decode attention of one new token per sequence over its compressed blocks and its fp16 window.

    q fp16 [B, Hq, D]; arena uint8 [bytes]; block_offsets int64 [B, max_blocks]; n_blocks int32 [B];
    window_k, window_v fp16 [B, Hkv, W_cap, D]; window_len int32 [B] (the new token's own K/V are already
    in the window); params: the CodecParams the records were written with. Returns out fp16 [B, Hq, D] =
    softmax(q K^T / sqrt(D)) V over blocks 0..n_blocks[b]-1 then window tokens 0..window_len[b]-1 (zeros
    when both are empty). workspace: float32 [>= attention_workspace_size(B, Hq, D, n_splits)] for the
    per-split softmax states (allocated when None). n_splits (default from shapes) and slot_bytes are
    tuning knobs; neither depends on the lengths. arena_address: uint64 [1] on the device holding the
    arena's address, which the kernel reads (a cache keeps one, so that a captured graph survives the
    arena moving); made from `arena` when None. tiles: decode each item with all 4 warps of a CTA by
    16-channel tiles (pk_attention_tiles; head_dim a multiple of 64) rather than a warp per item
    (pk_attention_splits); None: tile_mode() of the shapes. Both write the same states.
    narrow: launch the NARROW build (no unpack path for packs wider than 4 bits; packkv_attention.cu's
    header). Only for records that cannot hold a wider pack: every block encoded at bounds whose
    codec.max_pack_width is <= 4 (PackkvCache.narrow says so for its own arena, counting its layer and
    sink bounds); wrong on wider records (their levels decode as garbage). Refused when params' own bounds
    allow wider packs. Default False: the wide build, right for any record.
    slots: item mode's staging slots per warp (packkv_attention.cu's header; tile mode has its own two per
    CTA): 1, 3 CTAs per SM, each warp's next item prefetched into L2 and copied into its slot when the
    current one is done; 2, the double-buffered pipeline at 2 CTAs per SM (kept to compare the two). None:
    ITEM_SLOTS, else item_slots' choice from the shapes. The default splits follow it, so a given workspace
    must be sized with the same slots.
    """
    fn = "compressed_decode_attention"
    _check_params(fn, params)
    try:
        slots = slots if slots is None else checked_slots(slots)
    except ValueError as exc:
        _fail(fn, str(exc))
    if not isinstance(narrow, (bool, np.bool_)):
        _fail(fn, f"narrow must be True or False, got {narrow!r}")
    if narrow and codec.max_pack_width([params.rel_k, params.rel_v]) > 4:
        _fail(fn, f"narrow=True needs bounds whose packs are at most 4 bits wide (rel >= 1/14.98), but params has "
                  f"rel_k {params.rel_k}, rel_v {params.rel_v} (codec.max_pack_width "
                  f"{codec.max_pack_width([params.rel_k, params.rel_v])})")
    _cupy_array(fn, "q", q, np.float16, 3)
    B, Hq, D = q.shape
    _check_head_dim(fn, D)
    dev = _check_arena(fn, arena, block_offsets, n_blocks, B)
    if q.device.id != dev:
        _fail(fn, f"q is on GPU {q.device.id}, arena on GPU {dev}")
    Hkv = _check_window(fn, window_k, window_v, window_len, B, D, dev)
    _kv_heads(fn, Hq, Hkv)
    G, T, P = Hq // Hkv, params.block, params.pack
    max_blocks = block_offsets.shape[1]
    if tiles and D % TILE_CHANNELS:
        _fail(fn, f"tile mode needs a head_dim that is a multiple of {TILE_CHANNELS}, got {D}")
    slots = item_slots(slots, B, Hkv, G, max_blocks, T)
    tiles, n_splits = decode_geometry(B, Hkv, G, D, max_blocks, T, tiles, n_splits, slots)
    slot = _checked_slot_bytes(fn, slot_bytes or default_slot_bytes(T, D, P, 0, tiles, slots))
    out, workspace, arena_address = _decode_buffers(fn, out, workspace, arena, arena_address, B, Hq, D, n_splits, dev)
    shared = _shared_bytes(slot, D, 0, tiles, slots)
    kernel = "pk_attention_tiles" if tiles else "pk_attention_splits"
    narrow = bool(narrow)
    slots = 1 if tiles else slots          # the module: tile mode's kernel is compiled with the 1-slot one
    split_fn = _function("packkv_attention.cu", split_kernel_name(kernel, D, P, narrow, slots), D, P, shared, narrow,
                         slots)
    tl = np.int32(params.granularity == "token-layer")
    launch(split_fn, (n_splits, Hkv * (-(-G // 8)), B), (WARPS * 32,),
           (q, arena_address, block_offsets, n_blocks, np.int32(max_blocks), np.int32(Hkv), np.int32(G), np.int32(T), tl,
            np.int32(n_splits), np.int32(slot), _qscale(D), workspace), shared_mem=shared)
    return _merge_window(q, window_k, window_v, window_len, workspace, n_splits, Hkv, out, P, narrow, slots)


QUANT_HEAD_DIMS = (64, 128)   # D / 32 channels per lane, their codes in one 16-bit load
QUANT_CTAS_PER_SM = 8         # small CTAs (12-37 KB of shared memory): enough warps to hide the loads


def quant_decode_attention(q, arena, block_offsets, n_blocks, window_k, window_v, window_len, params,
                           out=None, workspace=None, n_splits: int | None = None, arena_address=None):
    """compressed_decode_attention's twin for the `quant` cache: the same arguments, with records of
    packkv.quant's layout (params: its QuantParams) at the offsets. The splits (kernels/quant_attention.cu)
    write packkv's per-split softmax states and pk_merge_window merges them with the window, so the
    workspace is attention_workspace_size(B, Hq, D, n_splits) float32 here too."""
    from packkv.quant import QuantParams, check_shape
    fn = "quant_decode_attention"
    if not isinstance(params, QuantParams):
        _fail(fn, f"params must be a packkv.quant.QuantParams, got {type(params).__name__}")
    _cupy_array(fn, "q", q, np.float16, 3)
    B, Hq, D = q.shape
    if D not in QUANT_HEAD_DIMS:
        _fail(fn, f"head_dim {D} is not supported (one of {QUANT_HEAD_DIMS})")
    dev = _check_arena(fn, arena, block_offsets, n_blocks, B)
    if q.device.id != dev:
        _fail(fn, f"q is on GPU {q.device.id}, arena on GPU {dev}")
    Hkv = _check_window(fn, window_k, window_v, window_len, B, D, dev)
    _kv_heads(fn, Hq, Hkv)
    try:
        check_shape(params, Hkv, D)
    except Exception as exc:       # PackkvError: the group does not tile a token's channels
        _fail(fn, str(exc))
    G, max_blocks = Hq // Hkv, block_offsets.shape[1]
    GT = min(8, 1 << (G - 1).bit_length())                # query heads per CTA: G rounded up to 1, 2, 4 or 8
    tiles = -(-G // GT)
    n_splits = int(n_splits or splits_over(B * Hkv * tiles, max_blocks, QUANT_CTAS_PER_SM))
    out, workspace, arena_address = _decode_buffers(fn, out, workspace, arena, arena_address, B, Hq, D, n_splits, dev)
    name = f"qt_attention_splits<{D}, {params.bits}, {GT}, {params.group}>"
    split_fn = _module("quant_attention.cu", (name,)).get_function(name)
    shared = 4 * (GT * D + WARPS * GT * (D + params.group))   # q tile; per warp q * k scale and the weights
    launch(split_fn, (n_splits, Hkv * tiles, B), (WARPS * 32,),
           (q, arena_address, block_offsets, n_blocks, np.int32(max_blocks), np.int32(Hkv), np.int32(G),
            np.int32(n_splits), _qscale(D), workspace), shared_mem=shared)
    return _merge_window(q, window_k, window_v, window_len, workspace, n_splits, Hkv, out)


def k_gemv(q, arena, block_offsets, n_blocks, params, n_kv_heads: int, out=None, n_splits: int | None = None,
           slot_bytes: int | None = None):
    """K-GEMV (the paper's decompress-GEMV on K): scores fp32 [B, Hq, max_blocks * block] = q . K_hat^T over
    each sequence's compressed blocks, storage order, no 1/sqrt(D); 0 past n_blocks[b] * block.
    q fp16 [B, Hq, D]; n_kv_heads: the records' KV heads (Hq a multiple of it)."""
    fn = "k_gemv"
    _check_params(fn, params)
    _cupy_array(fn, "q", q, np.float16, 3)
    B, Hq, D = q.shape
    _check_head_dim(fn, D)
    dev = _check_arena(fn, arena, block_offsets, n_blocks, B)
    Hkv = _kv_heads(fn, Hq, n_kv_heads)
    G, T, P = Hq // Hkv, params.block, params.pack
    max_blocks = block_offsets.shape[1]
    out = _out_array(fn, out, (B, Hq, max_blocks * T), np.float32, dev, "[B, Hq, max_blocks * block]")
    n_splits = int(n_splits or default_splits(B, Hkv, G, max_blocks, T))
    slot = _checked_slot_bytes(fn, slot_bytes or default_slot_bytes(T, D, P, 1))
    shared = _shared_bytes(slot, D, 1)
    kernel = _function("packkv_gemv.cu", f"pk_k_gemv<{D}, {P}>", D, P, shared)
    kernel((n_splits, Hkv * (-(-G // 8)), B), (WARPS * 32,),
           (q, arena, block_offsets, n_blocks, np.int32(max_blocks), np.int32(Hkv), np.int32(G), np.int32(T),
            np.int32(params.granularity == "token-layer"), np.int32(n_splits), np.int32(slot), out), shared_mem=shared)
    return out


def v_gemv(p, arena, block_offsets, n_blocks, params, n_kv_heads: int, head_dim: int, out=None, workspace=None,
           n_splits: int | None = None, slot_bytes: int | None = None):
    """V-GEMV (the paper's decompress-GEMV on V): out fp32 [B, Hq, D] = p . V_hat over each sequence's
    compressed blocks; p fp16 or fp32 [B, Hq, max_blocks * block] in storage order (entries past
    n_blocks[b] * block are not read). workspace: float32 [>= B * Hq * n_splits * D] (allocated when None)."""
    import cupy
    fn = "v_gemv"
    _check_params(fn, params)
    if not isinstance(p, cupy.ndarray) or p.dtype not in (np.float16, np.float32):
        _fail(fn, f"p must be a float16 or float32 CuPy array, got {type(p).__name__} {getattr(p, 'dtype', '')}")
    _cupy_array(fn, "p", p, p.dtype, 3)
    B, Hq, n_tok = p.shape
    D = int(head_dim)
    _check_head_dim(fn, D)
    dev = _check_arena(fn, arena, block_offsets, n_blocks, B)
    Hkv = _kv_heads(fn, Hq, n_kv_heads)
    G, T, P = Hq // Hkv, params.block, params.pack
    max_blocks = block_offsets.shape[1]
    if n_tok != max_blocks * T:
        _fail(fn, f"p must be [B, Hq, max_blocks * block] = {(B, Hq, max_blocks * T)}, got {p.shape}")
    n_splits = int(n_splits or default_splits(B, Hkv, G, max_blocks, T))
    workspace = _workspace_array(fn, workspace, B * Hq * n_splits * D, "B * Hq * n_splits * D", dev)
    out = _out_array(fn, out, (B, Hq, D), np.float32, dev)
    slot = _checked_slot_bytes(fn, slot_bytes or default_slot_bytes(T, D, P, 2))
    shared = _shared_bytes(slot, D, 2)
    kernel = _function("packkv_gemv.cu", f"pk_v_gemv<{D}, {P}>", D, P, shared)
    kernel((n_splits, Hkv * (-(-G // 8)), B), (WARPS * 32,),
           (p, np.int32(p.dtype == np.float16), arena, block_offsets, n_blocks, np.int32(max_blocks), np.int32(Hkv),
            np.int32(G), np.int32(T), np.int32(params.granularity == "token-layer"), np.int32(n_splits),
            np.int32(slot), workspace), shared_mem=shared)
    total = B * Hq * D
    reduce_fn = _function("packkv_gemv.cu", "pk_v_reduce", D, P)
    reduce_fn((-(-total // 256),), (256,), (workspace, np.int32(n_splits), np.int32(D), np.int32(total), out))
    return out


def decompress_blocks(arena, offsets, params, n_kv_heads: int, head_dim: int):
    """(k, v) fp16 [n, Hkv, block, D]: the records at arena[offsets[i]] decompressed, tokens in storage
    order, each value (level + offset) * step computed in fp32 and rounded to fp16. offsets: int64 [n]
    (CuPy, or anything NumPy reads)."""
    import cupy
    fn = "decompress_blocks"
    _check_params(fn, params)
    _cupy_array(fn, "arena", arena, np.uint8, 1)
    dev = arena.device.id
    if not isinstance(offsets, cupy.ndarray):
        offsets = cupy.asarray(np.asarray(offsets, dtype=np.int64))
    offsets = cupy.ascontiguousarray(offsets.ravel())
    _cupy_array(fn, "offsets", offsets, np.int64, 1, dev)
    H, D, T, P = int(n_kv_heads), int(head_dim), params.block, params.pack
    if not 1 <= H <= 255:
        _fail(fn, f"n_kv_heads must be in 1..255, got {H}")
    if not 1 <= D <= 1024:
        _fail(fn, f"head_dim {D} is not supported (1..1024)")
    n = offsets.size
    k = cupy.empty((n, H, T, D), np.float16)
    v = cupy.empty((n, H, T, D), np.float16)
    if n == 0:
        return k, v
    shared = 8 * T + 12 * D
    if shared > 200 * 1024:
        _fail(fn, f"block {T} with head_dim {D} needs {shared} bytes of shared memory")
    kernel = _function("packkv_decompress.cu", f"pk_decompress<{P}>", shared=shared)
    kernel((n, H, 2), (256,), (arena, offsets, np.int32(H), np.int32(T), np.int32(D),
                               np.int32(params.granularity == "token-layer"), k, v), shared_mem=shared)
    return k, v
