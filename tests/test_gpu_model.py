"""On the GPU (pytest -m gpu): CuPy fp16 logits agree with NumPy fp32 within fp16 tolerance, and greedy
decoding of SmolLM2 gives the same tokens on both."""
import numpy as np
import pytest

from packkv.cache import CacheShape, DenseCache
from packkv.errors import PackkvError
from packkv.generate import Engine, SamplingParams, generate, generate_batch

pytestmark = pytest.mark.gpu
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engines(smollm2_folder, gpu):
    return Engine(str(smollm2_folder), device="cpu"), Engine(str(smollm2_folder), device="gpu")


def test_gpu_logits_match_cpu_within_fp16_tolerance(engines):
    cpu_engine, gpu_engine = engines
    text = "The quick brown fox jumps over the lazy dog, and the dog barks at the moon. " * 12
    ids = np.asarray([cpu_engine.tokenizer.encode(text)[:200]])
    logits = []
    for engine in engines:
        cache = engine.new_cache("dense", batch=1, tokens=256)
        logits.append(engine.backend.to_numpy(engine.model.forward(ids, cache, all_logits=True)))
    cpu_logits, gpu_logits = logits
    scale = np.abs(cpu_logits).max()
    assert np.abs(gpu_logits - cpu_logits).max() < 0.03 * scale
    # the ranking that matters: the top token of (almost) every position agrees
    agree = (gpu_logits.argmax(-1) == cpu_logits.argmax(-1)).mean()
    assert agree > 0.97, agree


def test_greedy_tokens_agree_on_gpu_and_cpu(engines):
    tokens = []
    for engine in engines:
        ids = engine.prompt_ids(PROMPT, chat=False)
        tokens.append(generate(engine, ids, 32, SamplingParams(), show_progress=False, stop_at_eos=False).token_ids)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 32


def test_graph_replay_gives_the_eager_tokens(engines):
    _, gpu_engine = engines
    ids = gpu_engine.prompt_ids(PROMPT, chat=False)
    runs = [generate(gpu_engine, ids, 40, SamplingParams(), show_progress=False, stop_at_eos=False,
                     use_graph=use_graph) for use_graph in (True, False)]
    assert runs[0].token_ids == runs[1].token_ids


def test_batched_graph_decode_gives_each_sequence_its_tokens(engines):
    _, gpu_engine = engines
    prompts = [gpu_engine.prompt_ids(p, chat=False) for p in
               (PROMPT, "Water boils at a temperature of one hundred degrees, and at", "1, 2, 3,")]
    alone = [generate(gpu_engine, ids, 32, SamplingParams(), show_progress=False, stop_at_eos=False).token_ids
             for ids in prompts]
    together = generate_batch(gpu_engine, prompts, 32, SamplingParams(), show_progress=False, stop_at_eos=False)
    assert [t.token_ids for t in together] == alone


def test_packkv_cache_greedy_tokens_agree_on_gpu_and_cpu(engines):
    """Long enough a prompt that blocks are compressed at prefill and during decode (window 32, block 64):
    the GPU's fused kernels and the CPU's reference path pick the same tokens."""
    prompt = ("The history of the city begins with a small settlement on the river. Over the centuries it "
              "grew into a market town, then a centre of trade and learning. ") * 6
    tokens = []
    for engine in engines:
        ids = engine.prompt_ids(prompt, chat=False)
        result = generate(engine, ids, 40, SamplingParams(), "packkv", show_progress=False, stop_at_eos=False,
                          window=32)      # the 32nd decode token completes a block, the 40th commits it
        assert result.cache_stats["compression_ratio"] > 2
        tokens.append(result.token_ids)
    assert len(engines[0].prompt_ids(prompt, chat=False)) > 3 * 64
    assert tokens[0] == tokens[1]


def test_packkv_graph_replay_gives_the_eager_tokens(engines):
    _, gpu_engine = engines
    ids = gpu_engine.prompt_ids("Once upon a time, in a land far away, " * 20, chat=False)
    runs = [generate(gpu_engine, ids, 100, SamplingParams(), "packkv", show_progress=False, stop_at_eos=False,
                     use_graph=use_graph, window=16) for use_graph in (True, False)]
    assert runs[0].token_ids == runs[1].token_ids


@pytest.mark.parametrize("kind", ["dense", "packkv", "quant"])
def test_pipelined_greedy_steps_match_step_by_step_and_leave_the_counters_committed(engines, kind):
    """greedy_steps (up to PIPELINE_DEPTH steps ahead of the host, commits done ahead, device-side argmax
    and counters) against the graph stepped one token at a time with host argmax, across compress events
    (window 16, block 64); closing it mid-run waits for the steps in flight and resets the device counters
    to the committed lengths."""
    from packkv.generate import GraphDecoder, prefill
    _, engine = engines
    ids = engine.prompt_ids(HISTORY, chat=False)
    runs = []
    for pipelined in (True, False):
        cache = engine.new_cache(kind, batch=1, tokens=len(ids) + 150, **({} if kind == "dense" else {"window": 16}))
        first = int(prefill(engine, ids, cache, show_progress=False)[0, -1].argmax())
        decoder, tokens = GraphDecoder(engine, cache), [first]
        if pipelined:
            steps = decoder.greedy_steps([first])
            tokens += [next(steps)[0] for _ in range(100)]
            steps.close()
        else:
            for _ in range(100):
                tokens.append(int(decoder.step([tokens[-1]])[0, -1].argmax()))
        runs.append(tokens)
        assert int(cache.lengths[0]) == len(ids) + 100 and int(cache.starts.get()[0]) == len(ids) + 100
        if kind != "dense":
            assert cache.compression_totals["events"] >= 2
            assert int(cache.window_starts.get()[0]) == int(cache.window_len[0])
            assert int(cache.device_n_blocks.get()[0]) == int(cache.n_blocks[0])
    assert runs[0] == runs[1]


HISTORY = ("The history of the city begins with a small settlement on the river. Over the centuries it "
           "grew into a market town, then a centre of trade and learning. ") * 6


def cpu_gpu_and_graph_runs(engines, cache_kind, max_tokens, **cache_params):
    """Greedy generations of HISTORY on the CPU path, GPU eager and GPU graph-replayed, in that order."""
    return [generate(engine, engine.prompt_ids(HISTORY, chat=False), max_tokens, SamplingParams(), cache_kind,
                     show_progress=False, stop_at_eos=False, use_graph=use_graph, **cache_params)
            for engine, use_graph in ((engines[0], False), (engines[1], False), (engines[1], True))]


def test_packkv_sink_bounds_and_channel_scales_agree_on_gpu_and_cpu_and_in_the_graph(engines):
    """The first block encoded with its own bounds (a second encoder group) and channel scales (elementwise
    ops around attention, inside the captured graph): GPU eager, GPU graph and the CPU path pick the
    same tokens, and the stats report both."""
    from packkv.cache import ChannelScales
    c = engines[0].config
    shape = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    rng = np.random.default_rng(0)
    scales = ChannelScales(rng.uniform(0.5, 2.0, shape), rng.uniform(0.5, 2.0, shape))
    runs = cpu_gpu_and_graph_runs(engines, "packkv", 32, window=32, sink=(0.02, 0.05), scales=scales)
    for run in runs:
        assert run.cache_stats["kv_params"]["sink"] == [0.02, 0.05]
        assert run.cache_stats["kv_params"]["channel_scales"]
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids


def test_quant_cache_on_gpu_agrees_with_cpu_and_in_the_graph(engines):
    """The quant baseline: records encoded on the device, decode attention in its kernel inside the captured
    graph; CPU, GPU eager and GPU graph pick the same greedy tokens over blocks compressed at prefill
    and during decode (4 bits, groups of 32, window 32)."""
    from packkv.quant import QuantParams
    runs = cpu_gpu_and_graph_runs(engines, "quant", 48, window=32, params=QuantParams(4, 32))
    assert all(run.cache_stats["compression_ratio"] > 2 for run in runs)
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids


def test_packkv_graph_survives_the_arena_moving(engines):
    """The decode kernel reads the arena's address from device memory: the arena grows (and moves) while
    decoding, the graph is captured once, and the tokens equal eager decoding's."""
    import cupy
    from packkv.cache import ByteArena
    from packkv.generate import EagerDecoder, GraphDecoder, prefill
    _, engine = engines
    ids = engine.prompt_ids("Once upon a time, in a land far away, " * 20, chat=False)
    runs = []
    for decoder_kind in (GraphDecoder, EagerDecoder):
        cache = engine.new_cache("packkv", batch=1, tokens=len(ids) + 300, window=16)
        cache.arena = ByteArena(cupy, 4096)                  # tiny: it must grow during decode
        logits = prefill(engine, ids, cache, show_progress=False)
        decoder, tokens, addresses, graphs = decoder_kind(engine, cache), [], set(), set()
        for _ in range(300):
            tokens.append(int(logits[0, -1].argmax()))
            logits = decoder.step([tokens[-1]])
            addresses.add(int(cache.arena.address.get()[0]))
            graphs.add(id(getattr(decoder, "graph", None)))
        assert len(addresses) > 1 and len(graphs) == 1
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_gpu_out_of_memory_is_a_clear_error(gpu):
    shape = CacheShape(layers=80, kv_heads=64, head_dim=256, batch=64, max_context=131072)
    with pytest.raises(PackkvError, match=r"out of GPU memory: the dense KV cache .* needs \d+\.\d MiB"):
        DenseCache(shape, gpu)


def test_nan_in_a_decode_steps_block_is_refused_at_its_commit_and_the_cache_keeps_what_it_had(gpu):
    """On the GPU a decode step's compression runs beside the next steps and the encoder finds NaN itself:
    the advance that commits the block (DEFER_STEPS later) refuses, naming layer, sequence, head and
    position, and leaves the committed state as it was; the step before it had committed normally."""
    from packkv import codec
    from packkv.cache import PackkvCache
    xp, rng = gpu.xp, np.random.default_rng(0)
    shape = CacheShape(layers=2, kv_heads=2, head_dim=64, batch=1, max_context=256)
    cache = PackkvCache(shape, gpu, codec.CodecParams(block=32), window=8)

    def step(T, bad_token=None):
        k, v = (rng.standard_normal((1, 2, T, 64)).astype(np.float16) for _ in range(2))
        if bad_token is not None:
            k[0, 1, bad_token, 3] = np.nan
        for layer in range(2):
            cache.append(layer, xp.asarray(k), xp.asarray(v))
        cache.advance(T)

    step(20)
    step(1, bad_token=0)                    # position 20: in the block that falls due at length 40
    for _ in range(19 + PackkvCache.DEFER_STEPS - 1):
        step(1)
    assert cache.in_flight is not None and int(cache.n_blocks[0]) == 0
    before = (cache.arena.used, int(cache.n_blocks[0]), int(cache.window_len[0]), int(cache.lengths[0]))
    with pytest.raises(PackkvError, match=r"K of layer 0, sequence 0, KV head 1, token position 20 is not finite"):
        step(1)
    assert (cache.arena.used, int(cache.n_blocks[0]), int(cache.window_len[0]), int(cache.lengths[0])) == before
    assert cache.in_flight is None
