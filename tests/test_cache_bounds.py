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
