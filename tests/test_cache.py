"""The cache kinds on the CPU: the packkv cache attends like attention over its decoded blocks plus the
fp16 window, slides its window block by block, counts every byte, batches sequences of different
lengths, and refuses NaN without losing what it holds."""
import numpy as np
import pytest

from packkv import codec
from packkv.attention import causal_attention, causal_mask
from packkv.backend import get_backend
from packkv.cache import CacheShape, DenseCache, PackkvCache
from packkv.errors import PackkvError

CPU = get_backend("cpu")
LAYERS, KV_HEADS, HEAD_DIM, GROUP = 2, 2, 16, 3
PARAMS = codec.CodecParams(block=32, pack=16)


def random_steps(rng, steps, batch=1):
    """(T, k, v, q) per step: a prefill of `steps[0]` tokens, then the rest."""
    for T in steps:
        k = rng.standard_normal((LAYERS, batch, KV_HEADS, T, HEAD_DIM)).astype(np.float32)
        v = rng.standard_normal((LAYERS, batch, KV_HEADS, T, HEAD_DIM)).astype(np.float32)
        q = rng.standard_normal((LAYERS, batch, KV_HEADS * GROUP, T, HEAD_DIM)).astype(np.float32)
        yield T, k, v, q


def run(cache, steps):
    outs = []
    for T, k, v, q in steps:
        out = []
        for layer in range(LAYERS):
            cache.append(layer, k[layer], v[layer])
            out.append(cache.attend(layer, q[layer]))
        cache.advance(T)
        outs.append(np.stack(out))
    return outs


def packkv(batch=1, window=8, max_context=400, params=PARAMS):
    return PackkvCache(CacheShape(LAYERS, KV_HEADS, HEAD_DIM, batch, max_context), CPU, params, window=window,
                       max_new_tokens=64)


def test_window_slides_block_by_block():
    """A prefill step compresses its full blocks at once; a decode step whose token completes a block
    starts its compression, and the advance DEFER_STEPS steps later commits it (the window holds the
    block's tokens until then)."""
    cache, defer, block = packkv(window=8), PackkvCache.DEFER_STEPS, PARAMS.block
    steps = [40] + [1] * 100
    commits = []
    for T, k, v, q in random_steps(np.random.default_rng(0), steps):
        for layer in range(LAYERS):
            cache.append(layer, k[layer], v[layer])
            cache.attend(layer, q[layer])
        n_before = int(cache.n_blocks[0])
        cache.advance(T)
        n, w = int(cache.n_blocks[0]), int(cache.window_len[0])
        assert n * block + w == cache.lengths[0]
        assert w < 8 + block + defer and (w >= 8 or n == 0)
        if n > n_before:
            commits.append((int(cache.lengths[0]), n - n_before))
    # the prefill of 40 commits one block; then a block falls due whenever the window reaches 8 + 32
    # tokens (lengths 72, 104), and commits 8 steps later
    assert commits == [(40, 1), (72 + defer, 1), (104 + defer, 1)]
    assert cache.in_flight is not None and cache.in_flight.steps == 140 - 136   # due at 136, started there


def test_rows_compress_at_once_and_the_batch_counts_their_events():
    """A row's view (a batch's sequence, for its prefill) never defers a compression, so it cannot start
    one beside the batch's; its events count in the batch's stats; row() commits the batch's pending one."""
    cache = packkv(batch=2, window=8)
    rng = np.random.default_rng(9)
    (T, k, v, q), = random_steps(rng, [39])
    row = cache.row(0)
    run(row, [(T, k, v, q)])
    assert int(cache.n_blocks[0]) == 0 and int(cache.window_len[0]) == 39
    assert row.reorganises_within(1)
    run(row, random_steps(rng, [1]))          # the 40th token completes a block: committed now
    assert int(cache.n_blocks[0]) == 1 and row.in_flight is None and cache.in_flight is None
    assert cache.stats()["compress_events"] == 1
    for _ in range(32):                       # sequence 1 still empty: both decode from here
        run(cache, random_steps(rng, [1], batch=2))
    assert cache.in_flight is not None        # the batch's decode deferred sequence 0's second block
    cache.row(1)
    assert cache.in_flight is None and int(cache.n_blocks[0]) == 2 and cache.stats()["compress_events"] == 2


def test_attention_equals_reference_over_decoded_blocks_and_window():
    """Expected output, built independently: encode each block as the cache must have, decode it, and
    attend over [decoded blocks (storage order), fp16 window] with a causal mask on the window."""
    rng = np.random.default_rng(1)
    steps = list(random_steps(rng, [60] + [1] * 30))
    cache = packkv(window=8)
    outs = run(cache, steps)
    k_all = np.concatenate([s[1] for s in steps], axis=3)[:, 0]       # [layers, kv_heads, tokens, D]
    v_all = np.concatenate([s[2] for s in steps], axis=3)[:, 0]
    n_tokens = k_all.shape[2]
    for i, (T, _, _, q) in enumerate(steps[-5:]):
        end = n_tokens - 4 + i                                        # tokens seen after this step
        start_step = len(steps) - 5 + i
        # the cache compressed the blocks that were due after the previous step
        seen_before = end - T
        n_blocks = max(seen_before - 8, 0) // PARAMS.block
        split = n_blocks * PARAMS.block
        for layer in range(LAYERS):
            blocks_k = k_all[layer, :, :split].reshape(KV_HEADS, n_blocks, PARAMS.block, HEAD_DIM).transpose(1, 0, 2, 3)
            blocks_v = v_all[layer, :, :split].reshape(KV_HEADS, n_blocks, PARAMS.block, HEAD_DIM).transpose(1, 0, 2, 3)
            buf, off, _ = codec.encode_blocks(blocks_k.astype(np.float16), blocks_v.astype(np.float16), PARAMS)
            k_hat, v_hat = codec.decode_blocks(buf, off, PARAMS, KV_HEADS, HEAD_DIM)
            keys = np.concatenate([k_hat.transpose(1, 0, 2, 3).reshape(KV_HEADS, split, HEAD_DIM),
                                   k_all[layer, :, split:end].astype(np.float16).astype(np.float32)], axis=1)
            values = np.concatenate([v_hat.transpose(1, 0, 2, 3).reshape(KV_HEADS, split, HEAD_DIM),
                                     v_all[layer, :, split:end].astype(np.float16).astype(np.float32)], axis=1)
            want = causal_attention(np, q[layer], keys[None], values[None], causal_mask(np, [end], T, end))
            np.testing.assert_allclose(outs[start_step][layer], want, rtol=1e-5, atol=1e-5)


def test_tight_bounds_approach_the_dense_cache():
    steps = list(random_steps(np.random.default_rng(2), [50] + [1] * 20))
    tight = codec.CodecParams(rel_k=2 ** -12, rel_v=2 ** -12, block=32, pack=16)
    dense = run(DenseCache(CacheShape(LAYERS, KV_HEADS, HEAD_DIM, 1, 400), CPU), steps)
    packed = run(packkv(params=tight), steps)
    loose = run(packkv(), steps)
    tight_err = max(np.abs(a - b).max() for a, b in zip(dense, packed))
    loose_err = max(np.abs(a - b).max() for a, b in zip(dense, loose))
    assert tight_err < 3e-3 < loose_err


def test_every_byte_is_counted():
    cache = packkv(window=8)
    run(cache, random_steps(np.random.default_rng(3), [60, 40] + [1] * 10))
    n_blocks, window = int(cache.n_blocks[0]), int(cache.window_len[0])
    records = cache.arena.data[:cache.arena.used]
    assert cache.arena.used == sum(
        int(np.frombuffer(records[int(o):int(o) + 12].tobytes(), dtype=np.uint32)[2])
        for o in cache.block_offsets[:, 0, :n_blocks].ravel())
    window_bytes = window * LAYERS * KV_HEADS * HEAD_DIM * 2 * 2
    assert cache.bytes_used() == cache.arena.used + n_blocks * LAYERS * 8 + window_bytes
    assert cache.bytes_reserved() >= cache.bytes_used()
    stats = cache.stats()
    assert stats["compression_ratio"] == pytest.approx(cache.fp16_bytes() / cache.bytes_used())
    assert stats["bits_per_element"] == pytest.approx(16 / stats["compression_ratio"])


def test_arena_grows_and_keeps_records():
    cache = packkv(window=0, max_context=2048)
    cache.arena = type(cache.arena)(np, 4096)
    run(cache, random_steps(np.random.default_rng(4), [64] * 20))
    assert cache.arena.capacity > 4096 and int(cache.n_blocks[0]) == 40
    for j in (0, 5, 39):   # records written before and after the arena grew decode to what attention used
        record = cache.arena.data[int(cache.block_offsets[1, 0, j]):]
        record_bytes = int(np.frombuffer(record[8:12].tobytes(), np.uint32)[0])
        k_hat, v_hat = codec.decode_block(record[:record_bytes], PARAMS, KV_HEADS, HEAD_DIM)
        np.testing.assert_array_equal(k_hat, cache.decoded_k[1, 0, :, j * 32:(j + 1) * 32])
        np.testing.assert_array_equal(v_hat, cache.decoded_v[1, 0, :, j * 32:(j + 1) * 32])


def test_arena_capacity_is_what_the_allocator_holds():
    arena_type = type(packkv().arena)
    assert arena_type.allocation_size(4097) == 4608                       # CuPy's pool: 512-byte units
    assert arena_type.allocation_size(3 << 20) == 4 << 20                # the driver: 2 MiB pages
    assert arena_type.allocation_size((4 << 20) + 1) == 6 << 20
    arena = arena_type(np, 5000)
    arena.append(np.zeros(6000, dtype=np.uint8))                          # doubles, then rounds
    assert arena.capacity == 10240 and arena.used == 6000


def test_batched_sequences_equal_each_alone():
    rng = np.random.default_rng(5)
    prompts = [rng.standard_normal((2, LAYERS, KV_HEADS, n, HEAD_DIM)).astype(np.float32) for n in (37, 61)]
    queries = [rng.standard_normal((LAYERS, KV_HEADS * GROUP, n, HEAD_DIM)).astype(np.float32) for n in (37, 61)]
    decode = [list(random_steps(rng, [1] * 40)) for _ in range(2)]

    def prefill_alone(cache, b):
        (k, v), q = prompts[b], queries[b]
        for layer in range(LAYERS):
            cache.append(layer, k[layer][None], v[layer][None])
            cache.attend(layer, q[layer][None])
        cache.advance(k.shape[2])

    alone = []
    for b in range(2):
        cache = packkv(window=8)
        prefill_alone(cache, b)
        alone.append(run(cache, decode[b]))
    # the batch: prefill each sequence into its own batch-1 cache, then copy its state into slot b
    batch = packkv(batch=2, window=8)
    for b in range(2):
        single = packkv(window=8)
        prefill_alone(single, b)
        for name in ("window_k", "window_v", "decoded_k", "decoded_v"):
            getattr(batch, name)[:, b] = getattr(single, name)[:, 0]
        batch.block_offsets[:, b] = single.block_offsets[:, 0] + batch.arena.append(single.arena.data[:single.arena.used])
        batch.window_len[b], batch.n_blocks[b], batch.lengths[b] = single.window_len[0], single.n_blocks[0], single.lengths[0]
    steps = [(1, np.concatenate([decode[0][i][1], decode[1][i][1]], axis=1),
              np.concatenate([decode[0][i][2], decode[1][i][2]], axis=1),
              np.concatenate([decode[0][i][3], decode[1][i][3]], axis=1)) for i in range(40)]
    together = run(batch, steps)
    for i in range(40):
        for b in range(2):
            np.testing.assert_allclose(together[i][:, b], alone[b][i][:, 0], rtol=1e-5, atol=1e-6)


def test_nan_is_refused_and_the_cache_keeps_what_it_had():
    cache = packkv(window=8)
    run(cache, random_steps(np.random.default_rng(6), [60]))
    before = (cache.arena.used, int(cache.n_blocks[0]), int(cache.window_len[0]), int(cache.lengths[0]))
    (T, k, v, q), = random_steps(np.random.default_rng(7), [20])
    k[1, 0, 1, 3, 5] = np.nan
    with pytest.raises(PackkvError, match=r"K of layer 1, sequence 0, KV head 1, token position \d+ is not finite"):
        run(cache, [(T, k, v, q)])
    assert (cache.arena.used, int(cache.n_blocks[0]), int(cache.window_len[0]), int(cache.lengths[0])) == before


def test_too_many_tokens_in_one_step_is_refused():
    cache = packkv()
    (T, k, v, q), = random_steps(np.random.default_rng(8), [65])
    with pytest.raises(ValueError, match="at most 64"):
        cache.append(0, k[0], v[0])


def test_pipelined_commits_leave_the_counters_to_the_device_until_a_block_compresses():
    """A pipelined decode advances the device counters itself (one per step, in stream order): a commit
    counted on the device uploads nothing, except when it commits compressed blocks (the windows moved:
    all device state is set from the host), and the pipeline may only run ahead when no such commit is
    next and two more tokens fit. The step that completes a block only starts its compression."""
    cache, defer = packkv(window=8, max_context=60), PackkvCache.DEFER_STEPS
    rng = np.random.default_rng(5)
    for T, k, v, q in random_steps(rng, [30]):
        run(cache, [(T, k, v, q)])
    assert int(cache.n_blocks[0]) == 0 and int(cache.window_len[0]) == 30
    for counter in cache.device_counters():
        counter[...] = 1000                         # what the device would hold: must not be uploaded over

    def decode_step():
        (T, k, v, q), = random_steps(rng, [1])
        for layer in range(LAYERS):
            cache.append(layer, k[layer], v[layer])
        cache.advance(T, counted_on_device=True)

    for step in range(10 + defer - 1):             # tokens 31..48: the 40th completes a block
        assert not cache.reorganises_within(1) and cache.may_run_ahead()
        # two steps may be in flight (their commits start the compression or leave it pending) but for
        # the last one before the commit
        assert cache.may_run_ahead(2) == (step != 10 + defer - 2)
        decode_step()
        assert (cache.in_flight is not None) == (step >= 9) and int(cache.n_blocks[0]) == 0
    assert int(cache.window_len[0]) == 39 + defer and cache.starts[0] == 1000 and cache.window_starts[0] == 1000
    assert cache.reorganises_within(1) and not cache.may_run_ahead()   # the next commit slides the window
    decode_step()
    assert int(cache.n_blocks[0]) == 1 and cache.in_flight is None
    length = 40 + defer
    assert (cache.starts[0], cache.window_starts[0], cache.device_n_blocks[0]) == (length, length - PARAMS.block, 1)
    cache.lengths[0] = 58
    assert cache.may_run_ahead()                    # tokens 59 and 60 fit a context of 60
    cache.lengths[0] = 59
    assert not cache.reorganises_within(1) and not cache.may_run_ahead()   # 61 would not
    cache.lengths[0] = 57
    assert cache.may_run_ahead(2) and not cache.may_run_ahead(3)   # 58, 59, 60 fit; 61 would not


def test_two_steps_ahead_are_refused_before_another_sequences_block_commits_the_pending_one():
    """Batch of two, windows one token apart: the next step starts sequence 0's compression and the one
    after completes sequence 1's block, which commits it at once (and starts sequence 1's). A pipeline
    must not have both steps in flight (may_run_ahead(2) is False); one is fine."""
    cache = packkv(batch=2, window=8)
    rng = np.random.default_rng(11)
    for T, k, v, q in random_steps(rng, [38], batch=2):
        run(cache, [(T, k, v, q)])
    (T, k, v, q), = random_steps(rng, [1], batch=2)
    cache.lengths[0] += 1                              # sequence 0 one token ahead, as a batch's rows may be
    cache.window_len[0] += 1
    assert cache.may_run_ahead(1) and not cache.reorganises_within(1)
    assert cache.reorganises_within(2) and not cache.may_run_ahead(2)
    run(cache, random_steps(rng, [1], batch=2))        # starts sequence 0's
    assert cache.n_blocks.tolist() == [0, 0] and cache.in_flight.due.tolist() == [1, 0]
    run(cache, random_steps(rng, [1], batch=2))        # commits it, starts sequence 1's
    assert cache.n_blocks.tolist() == [1, 0] and cache.in_flight.due.tolist() == [0, 1]


def test_a_refusal_after_a_commit_in_the_same_advance_keeps_the_commit_and_the_step_out():
    """A prefill chunk arrives while a decode step's compression is pending: the advance commits that one,
    then refuses the chunk's NaN; the commit stands, the chunk's tokens are not committed."""
    cache = packkv(window=8)
    rng = np.random.default_rng(12)
    run(cache, random_steps(rng, [39, 1]))             # the 40th token starts a compression
    assert cache.in_flight is not None
    (T, k, v, q), = random_steps(rng, [40])
    k[1, 0, 1, 3, 5] = np.nan                          # in the chunk's first block
    with pytest.raises(PackkvError, match="not finite"):
        run(cache, [(T, k, v, q)])
    assert int(cache.n_blocks[0]) == 1 and cache.in_flight is None
    assert int(cache.lengths[0]) == 40 and int(cache.window_len[0]) == 40 - PARAMS.block


def test_a_refused_commit_is_not_deferred_again():
    """The GPU finds NaN at the commit, DEFER_STEPS steps after the start: the blocks stay due, and the
    next attempt commits at once (refusing again at once) instead of growing the window by another
    deferral."""
    cache = packkv(window=8)
    rng = np.random.default_rng(13)
    run(cache, random_steps(rng, [39, 1]))
    real_start = cache.start_records

    class Refusing:
        def offsets(self):
            raise PackkvError("cannot compress the KV cache: simulated refusal at the commit")

    cache.start_records = lambda k, v, owners: (real_start(k, v, owners), Refusing())[1]
    cache.in_flight.records = Refusing()
    for _ in range(PackkvCache.DEFER_STEPS - 1):
        run(cache, random_steps(rng, [1]))
    with pytest.raises(PackkvError, match="simulated refusal"):
        run(cache, random_steps(rng, [1]))
    window = int(cache.window_len[0])
    assert cache.refused and cache.reorganises_within(1)
    with pytest.raises(PackkvError, match="simulated refusal"):
        run(cache, random_steps(rng, [1]))            # at once, not deferred again
    assert int(cache.window_len[0]) == window and cache.in_flight is None
    cache.start_records = real_start
    run(cache, random_steps(rng, [1]))                 # clean data again: committed at once
    assert int(cache.n_blocks[0]) == 1 and not cache.refused


def test_a_commit_done_ahead_leaves_the_cache_as_its_own_step_would():
    """commit_ahead (a pipelined decode enqueueing a commit's device work behind the step whose advance
    commits it): the same attention outputs and the same stored state as committing in that step, the
    pipeline may then run ahead of it, and the advance only does the host's part (no upload over the
    device counters)."""
    caches = packkv(window=8), packkv(window=8)
    rng = np.random.default_rng(21)
    steps = list(random_steps(rng, [39] + [1] * 40))
    outs = [run(caches[0], steps)]
    cache, ahead_outs, done_ahead = caches[1], [], 0
    for T, k, v, q in steps:
        out = []
        for layer in range(LAYERS):
            cache.append(layer, k[layer], v[layer])
            out.append(cache.attend(layer, q[layer]))
        ahead_outs.append(np.stack(out))
        if T == 1 and cache.in_flight is not None and cache.commit_in() == 1:
            assert not cache.may_run_ahead(1) and cache.commit_ahead(1)   # the step's work is done: 1 in flight
            assert cache.may_run_ahead(1) and cache.may_run_ahead(3) and not cache.commit_ahead(1)
            for counter in cache.device_counters():
                counter[...] += 1                     # the device counted the step in flight
            done_ahead += 1
            cache.advance(T, counted_on_device=True)
        else:
            cache.advance(T)
    outs.append(ahead_outs)
    assert done_ahead == 1 and all(np.array_equal(a, b) for a, b in zip(*outs))
    for name in ("n_blocks", "window_len", "lengths", "block_offsets", "window_starts", "device_n_blocks", "starts"):
        assert np.array_equal(getattr(caches[0], name), getattr(caches[1], name)), name
    w = int(caches[0].window_len[0])
    assert np.array_equal(caches[0].window_k[:, :, :, :w], caches[1].window_k[:, :, :, :w])
    assert caches[0].arena.used == caches[1].arena.used
    assert np.array_equal(caches[0].arena.data[:caches[0].arena.used], caches[1].arena.data[:caches[1].arena.used])


def test_commit_ahead_only_for_the_step_that_commits_and_catch_up_keeps_it():
    """commit_ahead(n) applies only when the advance of the n-th step in flight is the commit; a pipeline
    that stops before that advance commits it on the host (catch_up), with the windows of the steps it did
    commit: as settle() would have at that point."""
    caches = packkv(window=8), packkv(window=8)
    rng = np.random.default_rng(22)
    steps = list(random_steps(rng, [39] + [1] * PackkvCache.DEFER_STEPS))   # the 40th token starts one
    for cache in caches:
        run(cache, steps)
        assert cache.in_flight is not None and cache.commit_in() == 1
    cache = caches[1]
    assert not cache.commit_ahead(2) and cache.in_flight.ahead is None
    (T, k, v, q), = random_steps(rng, [1])
    for layer in range(LAYERS):                       # the step in flight: appended, never committed
        cache.append(layer, k[layer], v[layer])
    assert cache.commit_ahead(1)
    cache.catch_up()
    caches[0].settle()
    for c in caches:
        assert c.in_flight is None and int(c.n_blocks[0]) == 1 and int(c.lengths[0]) == 39 + PackkvCache.DEFER_STEPS
    for name in ("n_blocks", "window_len", "block_offsets", "window_starts", "device_n_blocks"):
        assert np.array_equal(getattr(caches[0], name), getattr(caches[1], name)), name
    w = int(caches[0].window_len[0])
    assert np.array_equal(caches[0].window_k[:, :, :, :w], caches[1].window_k[:, :, :, :w])


@pytest.mark.parametrize("prompts, depth", [([37], 3), ([37, 36, 35], 3), ([39, 38, 37, 36], 3), ([37, 35, 33], 2),
                                            ([30, 12, 25, 39, 9], 4), ([38, 38, 37], 1)])
def test_a_pipeline_never_has_a_step_in_flight_past_a_commit_not_done_ahead(prompts, depth):
    """GraphDecoder.greedy_steps' launch rule on the host's bookkeeping alone (no model): with up to `depth`
    steps ahead, launching while may_run_ahead, or after commit_ahead, every commit that happens with steps
    in flight was done ahead, and the device counters (advanced per launched step) always match the host's
    windows plus those steps. Sequences whose blocks fall due on consecutive steps make one commit start
    the next compression in the same advance (found by review: it was predicted a step late)."""
    cache = packkv(batch=len(prompts), window=8)
    rng = np.random.default_rng(0)
    for b, length in enumerate(prompts):
        run(cache.row(b), random_steps(rng, [length]))
    in_flight, commits = 0, 0

    def launch():
        nonlocal in_flight
        in_flight += 1
        for counter in cache.device_counters():
            counter[...] += 1

    for _ in range(80):
        if not in_flight:
            launch()
        while in_flight <= depth and (cache.may_run_ahead(in_flight)
                                      or cache.commit_ahead(in_flight) and cache.may_run_ahead(in_flight)):
            launch()
        pending, blocks = cache.in_flight, cache.n_blocks.copy()
        ahead = pending is not None and pending.ahead is not None
        cache.advance(1, counted_on_device=True)
        in_flight -= 1
        if (cache.n_blocks != blocks).any():
            commits += 1
            assert ahead or not in_flight, "a host commit with steps in flight"
        expected = cache.window_len + in_flight
        if cache.in_flight is not None and cache.in_flight.ahead is not None:
            expected = expected - cache.in_flight.due * cache.block
        assert np.array_equal(cache.window_starts, expected)
        assert np.array_equal(cache.starts, cache.lengths + in_flight)
    assert commits >= len(prompts)
