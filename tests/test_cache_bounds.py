"""The packkv cache with bounds of its own per block (layer scales and sink bounds): a compress event writes
its blocks' records back to back in block order, each codec's record of that block with its own bounds.
The CPU path makes one codec call per distinct bounds; the GPU path encodes every block of the event in
one encoder launch (kernels/encoder.py with per-block bounds) and writes the same bytes."""
import numpy as np
import pytest

from packkv import codec
from packkv.backend import get_backend
from packkv.cache import ByteArena, CacheShape, LayerScales, PackkvCache
from packkv.errors import PackkvError

CPU = get_backend("cpu")
LAYERS, KV_HEADS, HEAD_DIM, BATCH = 3, 2, 16, 2
PARAMS = codec.CodecParams(block=32, pack=16)
# layer bounds k 0.01, 0.1, 0.3 and v 0.1, 0.4, 0.01 (8-bit encoder lanes); the sink's need 16-bit lanes
SCALES = LayerScales([0.1, 1.0, 3.0], [0.5, 2.0, 0.05])
SINK = (2.0 ** -10, 0.003)


def bounded_cache(backend, params=PARAMS, sink_tokens=None):
    return PackkvCache(CacheShape(LAYERS, KV_HEADS, HEAD_DIM, BATCH, 400), backend, params, window=8,
                       max_new_tokens=128, layer_scales=SCALES, sink=SINK, sink_tokens=sink_tokens)


def random_steps(seed, lengths):
    """(k, v) fp16 [layers, batch, kv_heads, T, head_dim] per step."""
    rng = np.random.default_rng(seed)
    return [tuple(rng.standard_normal((LAYERS, BATCH, KV_HEADS, T, HEAD_DIM)).astype(np.float16) for _ in "kv")
            for T in lengths]


def feed(cache, steps):
    xp = cache.backend.xp
    for k, v in steps:
        for layer in range(LAYERS):
            cache.append(layer, xp.asarray(k[layer]), xp.asarray(v[layer]))
        cache.advance(k.shape[3])


def expected_params(layer, j):
    if j == 0:
        return codec.CodecParams(rel_k=SINK[0], rel_v=SINK[1], block=32, pack=16)
    return SCALES.params(PARAMS, LAYERS)[layer]


def test_block_bounds_name_each_blocks_bounds_and_group_them():
    cache = bounded_cache(CPU)
    owners = [(layer, b, j) for b in range(BATCH) for layer in range(LAYERS) for j in range(3)]
    rel_k, rel_v = cache.block_bounds(owners)
    assert [(float(k), float(v)) for k, v in zip(rel_k, rel_v)] == [
        (expected_params(layer, j).rel_k, expected_params(layer, j).rel_v) for layer, _, j in owners]
    groups = cache.encoding_groups(owners)
    assert sorted(i for group, _, _ in groups for i in group) == list(range(len(owners)))
    for group, params, token_rel in groups:
        assert {expected_params(owners[i][0], owners[i][2]) for i in group} == {params} and token_rel is None


def test_records_are_each_blocks_codec_record_with_its_own_bounds_in_block_order():
    cache = bounded_cache(CPU)
    steps = random_steps(0, [100] + [1] * 40)
    feed(cache, steps)
    k_all, v_all = (np.concatenate([step[i] for step in steps], axis=3) for i in (0, 1))
    arena = cache.arena.data[:cache.arena.used]
    total = 0
    for layer in range(LAYERS):
        for b in range(BATCH):
            for j in range(int(cache.n_blocks[b])):
                tokens = slice(j * PARAMS.block, (j + 1) * PARAMS.block)
                record, _ = codec.encode_block(k_all[layer, b, :, tokens], v_all[layer, b, :, tokens],
                                               expected_params(layer, j))
                start = int(cache.block_offsets[layer, b, j])
                np.testing.assert_array_equal(arena[start:start + record.size], record)
                total += record.size
    assert total == cache.arena.used
    # the prefill's event: (sequence, layer, block) order, records back to back
    prefill = [int(cache.block_offsets[layer, b, j]) for b in range(BATCH) for layer in range(LAYERS) for j in (0, 1)]
    assert prefill[0] == 0 and np.all(np.diff(prefill) > 0)


@pytest.mark.gpu
@pytest.mark.parametrize("sink_tokens", [None, 5])
def test_gpu_encodes_each_compress_event_in_one_call_as_the_cpu_path_does(gpu, monkeypatch, sink_tokens):
    """Every compress event (the prefill's: sink and layer bounds, 16-bit lanes; decode's: layer bounds,
    8-bit lanes; the sink bounds for the whole first block or its first 5 tokens) is one encoder call; a full arena grows and that call repeats; the arena and the
    offset tables equal the grouped CPU path's, byte for byte. NaN is refused and nothing changes."""
    from packkv.kernels import encoder
    launches = []          # blocks per encoder launch
    real = encoder.start_blocks_device

    def counted(k, v, *args, **kwargs):
        launches.append(len(k))
        return real(k, v, *args, **kwargs)

    monkeypatch.setattr(encoder, "start_blocks_device", counted)
    on_gpu, on_cpu = bounded_cache(gpu, sink_tokens=sink_tokens), bounded_cache(CPU, sink_tokens=sink_tokens)
    on_gpu.arena = ByteArena(gpu.xp, 4096)      # too small for the prefill's records: grow and launch again
    steps = random_steps(1, [100] + [1] * 40 + [70])
    for cache in (on_gpu, on_cpu):
        feed(cache, steps)
    assert on_gpu.compression_totals["events"] == on_cpu.compression_totals["events"] == 4
    # one launch per event (the prefill's: every layer and sequence's 2 blocks), and again for a full arena
    assert launches[0] == launches[1] == LAYERS * BATCH * 2 and len(launches) > 4
    used = on_cpu.arena.used
    assert on_gpu.arena.used == used and on_gpu.arena.capacity > 4096
    np.testing.assert_array_equal(gpu.to_numpy(on_gpu.arena.data[:used]), on_cpu.arena.data[:used])
    np.testing.assert_array_equal(gpu.to_numpy(on_gpu.block_offsets), on_cpu.block_offsets)

    (k, v), = random_steps(2, [70])
    k[2, 1, 0, 5, 3] = np.nan
    before = (on_gpu.arena.used, on_gpu.n_blocks.tolist(), on_gpu.window_len.tolist(), on_gpu.lengths.tolist())
    with pytest.raises(PackkvError, match="K of layer 2, sequence 1, KV head 0, token position"):
        feed(on_gpu, [(k, v)])
    after = (on_gpu.arena.used, on_gpu.n_blocks.tolist(), on_gpu.window_len.tolist(), on_gpu.lengths.tolist())
    assert after == before and on_gpu.compression_totals["events"] == 4


# ---------------------------------------------------------------------------------------------------
# The NARROW decode build: only for a cache whose every bound keeps packs <= 4 bits
# ---------------------------------------------------------------------------------------------------

def small_cache(backend, params=PARAMS, **kw):
    return PackkvCache(CacheShape(LAYERS, KV_HEADS, HEAD_DIM, BATCH, 400), backend, params, window=8,
                       max_new_tokens=128, **kw)


def test_narrow_only_when_every_bound_keeps_packs_within_4_bits():
    """PackkvCache.narrow (the fused kernel's NARROW build): the cache's bounds, each layer's (layer
    scales) and the sink bounds must all have codec.max_pack_width <= 4 (rel >= 1/14.98)."""
    assert small_cache(CPU).narrow                                                   # defaults 0.1 / 0.2
    assert small_cache(CPU, codec.CodecParams(rel_k=1 / 14, rel_v=0.2, block=32, pack=16)).narrow
    assert not small_cache(CPU, codec.CodecParams(rel_k=0.05, block=32, pack=16)).narrow
    assert not small_cache(CPU, codec.CodecParams(rel_v=0.01, block=32, pack=16)).narrow
    assert not small_cache(CPU, sink=(0.01, 0.01)).narrow                            # sink bounds at 0.01
    assert not small_cache(CPU, sink=(0.1, 0.01), sink_tokens=5).narrow              # sink tokens only
    assert small_cache(CPU, sink=(0.07, 0.1)).narrow
    assert not small_cache(CPU, layer_scales=LayerScales([1.0, 0.5, 1.0], [1.0] * 3)).narrow   # 0.05 in layer 1
    assert small_cache(CPU, layer_scales=LayerScales([0.7, 1.0, 3.0], [0.4, 1.0, 2.0])).narrow  # >= 0.07
    assert not bounded_cache(CPU).narrow
    assert bounded_cache(CPU).row(0).narrow is False and small_cache(CPU).row(1).narrow is True


def test_a_narrow_caches_records_hold_no_pack_wider_than_4_bits():
    """End to end on the CPU path: a narrow cache (tightest bound 0.07) fed adversarial K/V (near-tie
    tokens at every scale, fp16 extremes, constant tokens) writes only packs of <= 4 bits."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_codec import make_block, record_pack_widths, ties_block
    cache = small_cache(CPU, sink=(0.07, 0.1), sink_tokens=5,
                        layer_scales=LayerScales([0.7, 1.0, 3.0], [0.35, 1.0, 2.0]))
    assert cache.narrow
    rng = np.random.default_rng(7)

    def step(T, kind):
        make = (lambda s: ties_block(s, rng)) if kind == "ties" else (lambda s: make_block(kind, s, rng))
        return tuple(np.stack([make((BATCH * KV_HEADS, T, HEAD_DIM)).reshape(BATCH, KV_HEADS, T, HEAD_DIM)
                               for _ in range(LAYERS)]) for _ in "kv")
    feed(cache, [step(100, "ties"), step(40, "fp16_extremes"), step(40, "constant_tokens"), step(64, "ties")])
    arena, widest = cache.arena.data[:cache.arena.used], 0
    for layer in range(LAYERS):
        for b in range(BATCH):
            for j in range(int(cache.n_blocks[b])):
                start = int(cache.block_offsets[layer, b, j])
                head = arena[start:start + codec.RECORD_HEADER.itemsize].view(codec.RECORD_HEADER)[0]
                record = arena[start:start + int(head["record_bytes"])]
                widest = max(widest, int(record_pack_widths(record, PARAMS, KV_HEADS, HEAD_DIM).max()))
    assert 3 <= widest <= 4


@pytest.mark.gpu
@pytest.mark.parametrize("sink,narrow", [(None, True), ((0.01, 0.01), False)])
def test_gpu_cache_launches_the_build_its_bounds_allow(gpu, monkeypatch, sink, narrow):
    """The cache's decode attention passes its narrow to the launcher (NARROW at the defaults, wide with
    sink bounds at 0.01) and agrees with the CPU path's attention over the same K/V."""
    from packkv.kernels import attention_kernels
    seen = []
    real = attention_kernels.compressed_decode_attention

    def recorded(*args, **kwargs):
        seen.append(kwargs.get("narrow"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_kernels, "compressed_decode_attention", recorded)
    on_gpu, on_cpu = small_cache(gpu, sink=sink), small_cache(CPU, sink=sink)
    steps = random_steps(3, [100] + [1] * 30)
    for cache in (on_gpu, on_cpu):
        feed(cache, steps)
    (k, v), = random_steps(4, [1])
    q = np.random.default_rng(5).standard_normal((BATCH, 2 * KV_HEADS, 1, HEAD_DIM)).astype(np.float16)
    for layer in range(LAYERS):
        on_gpu.append(layer, gpu.xp.asarray(k[layer]), gpu.xp.asarray(v[layer]))
        got = gpu.to_numpy(on_gpu.attend(layer, gpu.xp.asarray(q))).astype(np.float32)
        on_cpu.append(layer, k[layer], v[layer])
        want = np.asarray(on_cpu.attend(layer, q), np.float32)
        assert np.abs(got - want).max() <= 2e-2 * max(1.0, float(np.abs(want).max()))
    assert on_gpu.narrow is narrow and seen == [narrow] * LAYERS


def test_launcher_names_and_refuses_the_narrow_build_on_the_cpu():
    """The NARROW instances the launcher asks nvrtc for are the ones nvcc's compile check instantiates,
    and narrow=True with bounds that allow 5-bit packs is refused before anything touches a GPU."""
    from pathlib import Path
    from packkv.kernels import attention_kernels as ak
    names = ak.module_names("packkv_attention.cu", 128, 16, narrow=True)
    assert names[:2] == ("pk_attention_splits<128, 16, true>", "pk_attention_tiles<128, 16, true>")
    assert ak.module_names("packkv_attention.cu", 128, 16)[0] == "pk_attention_splits<128, 16>"
    source = (Path(ak.__file__).parent / "packkv_attention.cu").read_text()
    for D, P in ((64, 16), (128, 16), (128, 8), (128, 32)):
        assert f"PK_INSTANTIATE_SPLITS({D}, {P}, true)" in source and f"PK_INSTANTIATE_SPLITS({D}, {P}, false)" in source
    for bad_params in (codec.CodecParams(rel_k=0.01), codec.CodecParams(rel_v=1 / 15)):
        with pytest.raises(ValueError, match="narrow=True needs bounds"):
            ak.compressed_decode_attention(None, None, None, None, None, None, None, bad_params, narrow=True)
    with pytest.raises(ValueError, match="narrow must be True or False"):
        ak.compressed_decode_attention(None, None, None, None, None, None, None, PARAMS, narrow=1)
