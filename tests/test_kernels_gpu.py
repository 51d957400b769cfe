"""The compressed-KV kernels (kernels/attention_kernels.py) against their NumPy twins (packkv.attention):
fused decode attention (both modes: a warp per item, and tile mode, the CTA's warps sharing each item by
channel tiles), K-GEMV, V-GEMV and decompress_blocks, on random and real-like KV (K with outlier
channels) and real SmolLM2 K/V when .stage/kv holds a dump; head_dim 64/128 (and 80, 256), group sizes
1/3/4/8/12/16, odd lengths, a window of 0, zero and one block, many splits, token-head and token-layer,
repack none/greedy, pack 8/16/32, blocks of 16..256 tokens; and the launchers' refusals.
Run with: pytest -m gpu tests/test_kernels_gpu.py"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from packkv import codec
from packkv.attention import (compressed_attention_reference, decode_records, k_gemv_reference,
                              v_gemv_reference)
from packkv.codec import CodecParams

pytestmark = pytest.mark.gpu
REAL_KV = Path(__file__).resolve().parents[1] / ".stage" / "kv" / "smollm2_brown1024.npz"
COMBOS = [(64, 16), (128, 16), (128, 8), (128, 32), (80, 16), (256, 16), (64, 8), (64, 32)]
NARROW_COMBOS = [(64, 16), (128, 16), (128, 8), (128, 32)]     # the NARROW builds nvcc instantiates
# the item mode with two staging slots per warp (nvcc instantiates it beside each NARROW_COMBOS build)
TWO_SLOT_MODULES = [c + (narrow, 2) for c in NARROW_COMBOS for narrow in (False, True)]


@pytest.fixture(scope="module")
def ak(gpu):
    from packkv.kernels import attention_kernels
    with ThreadPoolExecutor(8) as pool:      # nvrtc takes seconds per module: compile them side by side
        list(pool.map(lambda c: attention_kernels.precompile(*c),
                      COMBOS + [c + (True,) for c in NARROW_COMBOS] + TWO_SLOT_MODULES))
    return attention_kernels


def kv_blocks(rng, kind, n, H, T, D):
    """fp16 K, V [n, H, T, D]: 'random' Gaussian, 'outliers' (K with a few channels x15, like post-RoPE
    K), or 'real' SmolLM2 K/V (tiled over heads/channels when the shape asks for more)."""
    if kind == "real":
        if not REAL_KV.exists():
            pytest.skip(f"no real K/V dump at {REAL_KV}")
        data = np.load(REAL_KV)
        k, v = data["k"], data["v"]                      # [layers, 3, tokens, 64]
        L, H0, N, D0 = k.shape
        heads_k = k.reshape(L * H0, N, D0)
        heads_v = v.reshape(L * H0, N, D0)
        reps = -(-D // D0)
        need = n * T
        start = int(rng.integers(0, max(1, N - need)))
        sel = lambda a, h: np.concatenate([a[(h * reps + r) % (L * H0), start:start + need] for r in range(reps)],
                                          axis=-1)[..., :D]
        K = np.stack([sel(heads_k, h) for h in range(H)])          # [H, n*T, D]
        V = np.stack([sel(heads_v, h) for h in range(H)])
        if K.shape[1] < need:
            K = np.resize(K, (H, need, D)); V = np.resize(V, (H, need, D))
        return (K.reshape(H, n, T, D).transpose(1, 0, 2, 3).astype(np.float16),
                V.reshape(H, n, T, D).transpose(1, 0, 2, 3).astype(np.float16))
    k = rng.standard_normal((n, H, T, D)).astype(np.float32)
    if kind == "outliers":
        k[..., rng.integers(0, D, size=max(1, D // 16))] *= 15
    v = rng.standard_normal((n, H, T, D)).astype(np.float32)
    return k.astype(np.float16), v.astype(np.float16)


@dataclass
class Setup:
    params: CodecParams
    buffer: np.ndarray       # host copy of the arena
    table: np.ndarray        # int64 [B, max_blocks]
    n_blocks: np.ndarray     # int32 [B]
    H: int
    D: int

    def device(self):
        import cupy
        return cupy.asarray(self.buffer), cupy.asarray(self.table), cupy.asarray(self.n_blocks)


def build(rng, params, lengths, H, D, kind="outliers", extra_capacity=1):
    """Records of all sequences' blocks in one arena, in shuffled order (16 bytes of slack at the end),
    the offset table (capacity = longest + extra_capacity) and n_blocks."""
    total = int(sum(lengths))
    k, v = kv_blocks(rng, kind, max(total, 1), H, params.block, D)
    buf, offs, _ = codec.encode_blocks(k[:total], v[:total], params)
    order = rng.permutation(total)
    records = [buf[offs[i]:offs[i + 1]] for i in order]
    starts = np.concatenate([[0], np.cumsum([r.size for r in records])]).astype(np.int64)
    buffer = np.concatenate(records + [np.zeros(64, np.uint8)])
    where = np.empty(total, np.int64)
    where[order] = starts[:-1]
    table = np.zeros((len(lengths), max(lengths) + extra_capacity), np.int64)
    first = 0
    for b, n in enumerate(lengths):
        table[b, :n] = where[first:first + n]
        table[b, n:] = 12345678      # garbage past n_blocks: must never be read
        first += n
    return Setup(params, buffer, table, np.asarray(lengths, np.int32), H, D)


def fused_runs(ak, rng, params, lengths, H, G, D, windows, kind="outliers", W_cap=8, extra_capacity=1, runs=({},)):
    """One set of records, q and window; compressed_decode_attention launched once per keyword set of
    `runs` (n_splits, slot_bytes, tiles, narrow, slots), each output checked against the NumPy twin.
    Returns the outputs (float32) and the twin's."""
    import cupy
    s = build(rng, params, lengths, H, D, kind, extra_capacity)
    B = len(lengths)
    q = rng.standard_normal((B, H * G, D)).astype(np.float16)
    wk = rng.standard_normal((B, H, W_cap, D)).astype(np.float16)
    wv = rng.standard_normal((B, H, W_cap, D)).astype(np.float16)
    wl = np.asarray(windows, np.int32)
    arena, table, nb = s.device()
    want = compressed_attention_reference(q, s.buffer, s.table, s.n_blocks, wk, wv, wl, params)
    k_hat, v_hat = decode_records(s.buffer, s.table[0, :max(s.n_blocks[0], 0)], params, H, D)
    scale = max(1.0, float(np.abs(v_hat).max(initial=0)), float(np.abs(wv).max()))
    outs = []
    for kwargs in runs:
        out = ak.compressed_decode_attention(cupy.asarray(q), arena, table, nb, cupy.asarray(wk), cupy.asarray(wv),
                                             cupy.asarray(wl), params, **kwargs)
        got = out.get().astype(np.float32)
        err = np.abs(got - want)
        assert np.all(np.isfinite(got)), kwargs
        assert err.max() <= 6e-3 * scale + 1e-2 * np.abs(want).max(), \
            f"{kwargs}: max err {err.max():.4g} at {np.unravel_index(err.argmax(), err.shape)} (scale {scale:.3g})"
        outs.append(got)
    return outs, want


def fused_case(ak, rng, params, lengths, H, G, D, windows, kind="outliers", W_cap=8, n_splits=None, slot_bytes=None,
               tiles=None, extra_capacity=1, narrow=False):
    """tiles: force tile mode (True) or item mode (False); None: the launcher's choice from the shapes.
    narrow: launch the NARROW build (packs of at most 4 bits)."""
    outs, want = fused_runs(ak, rng, params, lengths, H, G, D, windows, kind, W_cap, extra_capacity,
                            [dict(n_splits=n_splits, slot_bytes=slot_bytes, tiles=tiles, narrow=narrow)])
    return outs[0], want


# ---------------------------------------------------------------------------------------------------
# decompress_blocks
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params,D,kind", [
    (CodecParams(), 64, "real"),
    (CodecParams(), 128, "outliers"),
    (CodecParams(granularity="token-head", repack="none"), 128, "random"),
    (CodecParams(pack=8, repack="none"), 64, "outliers"),
    (CodecParams(pack=32, repack="none", block=128), 80, "outliers"),
    (CodecParams(repack="none", rel_k=0.01, rel_v=0.02), 64, "outliers"),       # wide packs: slow unpack path
], ids=lambda x: x if isinstance(x, (int, str)) else f"{x.granularity}-{x.repack}-P{x.pack}-T{x.block}-{x.rel_k}")
def test_decompress_blocks_matches_codec(ak, params, D, kind):
    import cupy
    rng = np.random.default_rng(D)
    s = build(rng, params, [5], 3, D, kind)
    arena, _, _ = s.device()
    offsets = s.table[0, :5][::-1].copy()
    k, v = ak.decompress_blocks(arena, cupy.asarray(offsets), params, 3, D)
    k_ref, v_ref = decode_records(s.buffer, offsets, params, 3, D)
    for got, want in ((k.get(), k_ref), (v.get(), v_ref)):
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(np.float16))   # fp32 decode, one fp16 rounding


# ---------------------------------------------------------------------------------------------------
# K-GEMV, V-GEMV
# ---------------------------------------------------------------------------------------------------

GEMV_CASES = [
    (CodecParams(), 64, 3, 3, "real"),                                   # SmolLM2: 9 q heads, 3 KV heads
    (CodecParams(), 128, 2, 4, "outliers"),
    (CodecParams(granularity="token-head", repack="none"), 128, 2, 4, "random"),
    (CodecParams(pack=8, repack="none"), 128, 1, 8, "outliers"),
    (CodecParams(pack=32, repack="none"), 128, 4, 1, "outliers"),
    (CodecParams(repack="none"), 64, 1, 16, "random"),                  # two tiles of 8 query heads
    (CodecParams(repack="none", block=16), 128, 2, 3, "outliers"),
    (CodecParams(repack="none", block=256), 80, 1, 3, "outliers"),
    (CodecParams(repack="none", rel_k=0.01, rel_v=0.02), 64, 2, 3, "outliers"),
]
GEMV_IDS = [f"D{c[1]}-H{c[2]}-G{c[3]}-{c[0].granularity}-{c[0].repack}-P{c[0].pack}-T{c[0].block}-{c[4]}-{c[0].rel_k}"
            for c in GEMV_CASES]


@pytest.mark.parametrize("params,D,H,G,kind", GEMV_CASES, ids=GEMV_IDS)
def test_k_gemv_matches_twin(ak, params, D, H, G, kind):
    import cupy
    rng = np.random.default_rng(7 * D + G)
    lengths = [5, 2, 0, 1] if params.block <= 64 else [3, 1]
    s = build(rng, params, lengths, H, D, kind, extra_capacity=2)
    arena, table, nb = s.device()
    q = rng.standard_normal((len(lengths), H * G, D)).astype(np.float16)
    got = ak.k_gemv(cupy.asarray(q), arena, table, nb, params, H).get()
    want = k_gemv_reference(q, s.buffer, s.table, s.n_blocks, params, H)
    assert got.shape == want.shape
    tol = 1e-3 * max(np.abs(want).max(), 1.0)
    err = np.abs(got - want)
    assert err.max() <= tol, f"max err {err.max():.4g} at {np.unravel_index(err.argmax(), err.shape)}"


@pytest.mark.parametrize("p_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("params,D,H,G,kind", GEMV_CASES, ids=GEMV_IDS)
def test_v_gemv_matches_twin(ak, params, D, H, G, kind, p_dtype):
    import cupy
    rng = np.random.default_rng(11 * D + G)
    lengths = [5, 2, 0, 1] if params.block <= 64 else [3, 1]
    s = build(rng, params, lengths, H, D, kind, extra_capacity=2)
    arena, table, nb = s.device()
    p = rng.random((len(lengths), H * G, table.shape[1] * params.block)).astype(p_dtype)
    got = ak.v_gemv(cupy.asarray(p), arena, table, nb, params, H, D).get()
    want = v_gemv_reference(p, s.buffer, s.table, s.n_blocks, params, H, D)
    tol = 2e-3 * max(np.abs(want).max(), 1.0)
    err = np.abs(got - want)
    assert err.max() <= tol, f"max err {err.max():.4g} at {np.unravel_index(err.argmax(), err.shape)}"


# ---------------------------------------------------------------------------------------------------
# Fused decode attention
# ---------------------------------------------------------------------------------------------------

MODES = [False, True]
MODE_IDS = ["items", "tiles"]


@pytest.mark.parametrize("tiles", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("params,D,H,G,kind", GEMV_CASES + [(CodecParams(repack="none"), 256, 2, 4, "outliers"),
                                                            (CodecParams(repack="none", block=256), 128, 2, 12, "outliers")],
                         ids=GEMV_IDS + ["D256-H2-G4-tl-none-P16-T64", "D128-H2-G12-tl-none-P16-T256"])
def test_fused_attention_matches_twin(ak, params, D, H, G, kind, tiles):
    if tiles and D % ak.TILE_CHANNELS:
        pytest.skip(f"tile mode needs head_dim a multiple of {ak.TILE_CHANNELS}")
    rng = np.random.default_rng(3 * D + G)
    lengths = [5, 2, 0, 1] if params.block <= 64 else [3, 1]
    windows = [3, 0, 4, 1] if params.block <= 64 else [2, 0]
    fused_case(ak, rng, params, lengths, H, G, D, windows, kind, tiles=tiles)


@pytest.mark.parametrize("tiles", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("G", [1, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("D", [64, 128])
def test_fused_group_sizes_and_odd_lengths(ak, D, G, tiles):
    rng = np.random.default_rng(D + G)
    fused_case(ak, rng, CodecParams(), [7, 3, 1], 2, G, D, [5, 1, 0], "outliers", tiles=tiles)


@pytest.mark.parametrize("pack", [8, 16, 32])
@pytest.mark.parametrize("block", [16, 64, 128])
@pytest.mark.parametrize("D", [64, 128])
def test_fused_tile_mode_packs_and_blocks(ak, D, block, pack):
    """Tile mode over each pack row layout and item shape: 8 blocks of 16 tokens, 2 of 64, 1 of 128 per
    item; lengths that leave the last item partly filled."""
    if pack > block:
        pytest.skip("a block holds whole packs")
    rng = np.random.default_rng(D + block + pack)
    params = CodecParams(pack=pack, block=block, repack="none")
    lengths = [11, 3, 9] if block == 16 else [5, 2, 3]
    fused_case(ak, rng, params, lengths, 3, 3, D, [2, 0, 5], "outliers", tiles=True)


def test_mode_is_chosen_from_shapes(ak):
    """Tile mode where item mode would leave about one item per warp (short contexts, few KV heads), item
    mode for long contexts and big batches; never from the lengths."""
    T = 64
    assert ak.tile_mode(1, 3, 3, 64, 8192 // T, T)              # SmolLM2 9/3/64 at 8K
    assert ak.tile_mode(1, 3, 3, 64, 512 // T, T)
    assert ak.tile_mode(1, 8, 4, 128, 4096 // T, T)             # 8B 32/8/128 short
    assert not ak.tile_mode(1, 8, 4, 128, 32768 // T, T)        # 8B long: many items per warp
    assert not ak.tile_mode(8, 8, 4, 128, 32768 // T, T)
    assert not ak.tile_mode(1, 3, 3, 80, 512 // T, T)           # head_dim not a multiple of 64
    tiles_splits = ak.attention_splits(1, 3, 3, 8192 // T, T, True)
    assert tiles_splits > ak.default_splits(1, 3, 3, 8192 // T, T)
    assert tiles_splits <= -(-(8192 // T) // ak.blocks_per_item(T))   # at least an item per split


@pytest.mark.parametrize("lengths,windows", [([5], [3]), ([33, 17], [1, 8]), ([125], [64]), ([124, 61, 2], [0, 5, 64])],
                         ids=["320", "2112-1088", "8000", "7936-3904-128"])
def test_fused_smollm2_shape_short_contexts(ak, lengths, windows):
    """SmolLM2's 9/3/64 from a few hundred to 8K tokens with a table of 8K tokens (the default picks tile
    mode), batches of different lengths; then the same with item mode forced."""
    params = CodecParams()
    assert ak.tile_mode(len(lengths), 3, 3, 64, 8192 // params.block, params.block)
    for tiles in (None, False):
        rng = np.random.default_rng(sum(lengths))
        fused_case(ak, rng, params, lengths, 3, 3, 64, windows, "outliers", W_cap=64, tiles=tiles,
                   extra_capacity=8192 // params.block - max(lengths))


def test_fused_8b_shape_short_and_long_tables(ak):
    """32/8/128: a short table picks tile mode, a long one (capacity of 256K tokens) item mode; the same
    blocks give the same attention."""
    params = CodecParams(repack="none")
    assert ak.tile_mode(2, 8, 4, 128, 40, params.block)
    assert not ak.tile_mode(2, 8, 4, 128, 4096, params.block)
    for capacity in (40, 4096):
        rng = np.random.default_rng(8)
        fused_case(ak, rng, params, [37, 20], 8, 4, 128, [3, 1], "outliers", extra_capacity=capacity - 37)


@pytest.mark.parametrize("D", [16, 48, 80, 256])
def test_fused_long_windows_and_odd_head_dims(ak, D):
    """pk_merge_window past one round of its 16 warps x 4 window tokens (64), up to 200 tokens, at head dims
    whose channel pairs do not fill a warp (16, 48), fill it partly twice (80) or 4 times (256); a sequence
    with no compressed block; the default splits and 7."""
    params = CodecParams(repack="none")
    for n_splits in (None, 7):
        rng = np.random.default_rng(D)
        fused_case(ak, rng, params, [3, 1, 2, 0, 4, 2], 2, 3, D, [0, 1, 64, 65, 130, 200], "outliers", W_cap=200,
                   n_splits=n_splits)


def test_fused_edge_cases(ak):
    rng = np.random.default_rng(5)
    params = CodecParams(repack="none")
    # window 0 everywhere; one block
    fused_case(ak, rng, params, [1, 1], 2, 4, 128, [0, 0])
    # zero compressed blocks: window only
    fused_case(ak, rng, params, [0, 0], 2, 4, 64, [3, 8])
    # nothing at all: zeros
    got, _ = fused_case(ak, rng, params, [0, 2], 2, 4, 64, [0, 1])
    assert np.all(got[0] == 0)


@pytest.mark.parametrize("tiles", MODES, ids=MODE_IDS)
def test_fused_many_splits_and_long_sequences(ak, tiles):
    """Many items per CTA (tile mode: the CTA's staging pipeline, slots and mbarrier phases over items)."""
    rng = np.random.default_rng(9)
    params = CodecParams(repack="none")
    for n_splits in (1, 3, 40):
        fused_case(ak, rng, params, [37, 12, 0], 2, 4, 128, [2, 7, 1], "outliers", n_splits=n_splits, tiles=tiles)
    fused_case(ak, rng, CodecParams(block=256), [9, 4], 2, 3, 64, [1, 2], "outliers", n_splits=2, tiles=tiles)


def test_spans_that_do_not_fit_the_staging_slot_are_read_from_global_memory(ak):
    """slot_bytes too small for an item: the kernels take their generic-load path (some or all spans
    straight from the arena) and must give the same results."""
    import cupy
    rng = np.random.default_rng(12)
    params = CodecParams(repack="none")
    for slot in (256, 4096):
        for tiles in MODES:
            fused_case(ak, rng, params, [9, 4], 2, 4, 128, [2, 1], "outliers", slot_bytes=slot, tiles=tiles)
        s = build(rng, params, [5, 3], 2, 64)
        arena, table, nb = s.device()
        q = rng.standard_normal((2, 6, 64)).astype(np.float16)
        got = ak.k_gemv(cupy.asarray(q), arena, table, nb, params, 2, slot_bytes=slot).get()
        want = k_gemv_reference(q, s.buffer, s.table, s.n_blocks, params, 2)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
        p = rng.random((2, 6, table.shape[1] * 64)).astype(np.float32)
        got = ak.v_gemv(cupy.asarray(p), arena, table, nb, params, 2, 64, slot_bytes=slot).get()
        want = v_gemv_reference(p, s.buffer, s.table, s.n_blocks, params, 2, 64)
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


@pytest.mark.parametrize("tiles", MODES, ids=MODE_IDS)
def test_fused_real_kv(ak, tiles):
    rng = np.random.default_rng(2)
    fused_case(ak, rng, CodecParams(), [15, 4], 3, 3, 64, [6, 2], "real", tiles=tiles)
    fused_case(ak, rng, CodecParams(granularity="token-head"), [9], 3, 3, 64, [1], "real", tiles=tiles)


@pytest.mark.parametrize("tiles", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("D,pack", NARROW_COMBOS)
@pytest.mark.parametrize("kind", ["outliers", "random", "real"])
def test_fused_narrow_build_equals_the_wide_build(ak, D, pack, kind, tiles):
    """The NARROW build (no unpack path for packs wider than 4 bits; packkv_attention.cu's header) on
    records at the default bounds (0.1 / 0.2: packs of at most 4 bits) and at 1/14 (levels up to 15):
    the same output as the wide build, bit for bit (the same arithmetic; only the never-taken slow path
    and its branch are gone), and the NumPy twin's within fused_case's tolerance."""
    for params in (CodecParams(pack=pack, block=max(64, pack)),
                   CodecParams(rel_k=1 / 14, rel_v=1 / 14, pack=pack, block=max(64, pack), repack="none")):
        assert codec.max_pack_width([params.rel_k, params.rel_v]) == 4
        outs = []
        for narrow in (False, True):
            rng = np.random.default_rng(D + pack)           # the same records, q and window for both builds
            outs.append(fused_case(ak, rng, params, [9, 2, 0, 5], 2, 4, D, [3, 0, 4, 1], kind, tiles=tiles,
                                   narrow=narrow)[0])
        np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("D,pack", NARROW_COMBOS)
@pytest.mark.parametrize("kind", ["outliers", "random", "real"])
def test_fused_one_staging_slot_equals_two(ak, D, pack, kind):
    """Item mode with one staging slot per warp (the default: 3 CTAs per SM, each warp's next item
    prefetched into L2 and copied into the slot when the current one is done) and with two (the
    double-buffered pipeline at 2 CTAs per SM), wide and NARROW builds: on the same splits the same output
    bit for bit (the same arithmetic; only where the bytes wait differs), and the NumPy twin's within
    tolerance. Many items per warp (one split: the single slot's mbarrier phases), 8 blocks of 16 tokens
    and 2 sub-iterations of 128 per item, slots too small for an item (spans read from global memory;
    random K/V overflows even the default slot at D=128). The default splits differ (3 CTAs per SM instead
    of 2): checked against the twin too."""
    pairs = [((n_splits, slot_bytes), narrow) for narrow in (False, True)
             for n_splits, slot_bytes in ((1, None), (3, None), (3, 256), (3, 4096))]
    for params, lengths, windows in (
            (CodecParams(pack=pack, block=max(64, pack)), [37, 9, 0, 5], [3, 0, 4, 1]),
            (CodecParams(pack=pack, block=max(16, pack), repack="none"), [75, 2], [2, 7]),
            (CodecParams(pack=pack, block=256, repack="none"), [9, 4], [1, 0])):
        runs = [dict(slots=slots, n_splits=n_splits, slot_bytes=slot_bytes, tiles=False, narrow=narrow)
                for (n_splits, slot_bytes), narrow in pairs for slots in (1, 2)]
        runs += [dict(slots=slots, tiles=False) for slots in (1, 2)]    # the default splits of each
        rng = np.random.default_rng(D + pack + params.block)
        outs, _ = fused_runs(ak, rng, params, lengths, 2, 4, D, windows, kind, runs=runs)
        for i in range(0, 2 * len(pairs), 2):
            np.testing.assert_array_equal(outs[i + 1], outs[i], err_msg=str(runs[i]))


def test_fused_narrow_refuses_bounds_that_allow_wide_packs(ak):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="narrow=True needs bounds"):
        fused_case(ak, rng, CodecParams(rel_k=0.01), [2], 2, 4, 64, [1], narrow=True)


def test_fused_shares_workspace_and_out(ak):
    import cupy
    rng = np.random.default_rng(4)
    params = CodecParams(repack="none")
    s = build(rng, params, [3, 2], 2, 64)
    arena, table, nb = s.device()
    q = cupy.asarray(rng.standard_normal((2, 8, 64)).astype(np.float16))
    wk = cupy.zeros((2, 2, 4, 64), np.float16)
    wl = cupy.zeros(2, np.int32)
    n_splits = 5
    ws = cupy.empty(ak.attention_workspace_size(2, 8, 64, n_splits), np.float32)
    out = cupy.empty((2, 8, 64), np.float16)
    res = ak.compressed_decode_attention(q, arena, table, nb, wk, wk, wl, params, out=out, workspace=ws,
                                         n_splits=n_splits)
    assert res is out
    want = compressed_attention_reference(q.get(), s.buffer, s.table, s.n_blocks, wk.get(), wk.get(), wl.get(), params)
    np.testing.assert_allclose(out.get().astype(np.float32), want, atol=2e-2)


# ---------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------

def test_launchers_refuse_clearly(ak):
    import cupy
    params = CodecParams()
    arena = cupy.zeros(64, np.uint8)
    table = cupy.zeros((1, 2), np.int64)
    nb = cupy.zeros(1, np.int32)
    q = cupy.zeros((1, 4, 64), np.float16)
    wk = cupy.zeros((1, 2, 4, 64), np.float16)
    wl = cupy.zeros(1, np.int32)
    call = lambda **kw: ak.compressed_decode_attention(**{**dict(q=q, arena=arena, block_offsets=table, n_blocks=nb,
                                                                  window_k=wk, window_v=wk, window_len=wl,
                                                                  params=params), **kw})
    with pytest.raises(ValueError, match="q must be float16"):
        call(q=q.astype(np.float32))
    with pytest.raises(ValueError, match="q must be a CuPy array"):
        call(q=q.get())
    with pytest.raises(ValueError, match="head_dim 72 is not supported"):
        call(q=cupy.zeros((1, 4, 72), np.float16), window_k=cupy.zeros((1, 2, 4, 72), np.float16),
             window_v=cupy.zeros((1, 2, 4, 72), np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        call(window_k=cupy.zeros((1, 2, 64, 4), np.float16).transpose(0, 1, 3, 2))
    with pytest.raises(ValueError, match="block_offsets must be int64"):
        call(block_offsets=table.astype(np.int32))
    with pytest.raises(ValueError, match="block 48 is not supported"):
        call(params=CodecParams(block=48))
    with pytest.raises(ValueError, match="not a multiple of"):
        call(q=cupy.zeros((1, 3, 64), np.float16))
    with pytest.raises(ValueError, match="workspace holds"):
        call(workspace=cupy.zeros(3, np.float32))
    with pytest.raises(ValueError, match="tile mode needs a head_dim"):
        call(q=cupy.zeros((1, 4, 80), np.float16), window_k=cupy.zeros((1, 2, 4, 80), np.float16),
             window_v=cupy.zeros((1, 2, 4, 80), np.float16), tiles=True)
    with pytest.raises(ValueError, match="params must be"):
        call(params={"block": 64})
    with pytest.raises(ValueError, match="p must be"):
        ak.v_gemv(cupy.zeros((1, 4, 100), np.float16), arena, table, nb, params, 2, 64)
    with pytest.raises(ValueError, match="query heads are not a multiple of 3 KV heads"):
        ak.k_gemv(q, arena, table, nb, params, 3)
