"""Batched generation: sequences of different lengths decoded together get the tokens each gets alone,
through the dense and the packkv cache; rows of a cache are views of its memory."""
import numpy as np
import pytest

from packkv.backend import get_backend
from packkv.cache import CacheShape, DenseCache
from packkv.codec import CodecParams
from packkv.generate import Engine, SamplingParams, generate, generate_batch

PROMPTS = ["The capital of France is", "Water boils at a temperature of one hundred degrees, and at the top",
           "1, 2, 3, 4,"]


def test_a_row_is_a_view_of_the_batch():
    cache = DenseCache(CacheShape(2, 1, 4, 3, 16), get_backend("cpu"))
    row = cache.row(1)
    k = np.ones((1, 1, 5, 4), np.float32)
    for layer in range(2):
        row.append(layer, k * (layer + 1), k)
    row.advance(5)
    assert list(cache.lengths) == [0, 5, 0] and row.shape.batch == 1
    assert (cache.k[1, 1, 0, :5] == 2).all() and (cache.k[:, [0, 2]] == 0).all()


@pytest.mark.slow
def test_batch_gives_each_sequence_its_own_tokens_and_text(smollm2_folder):
    """Through the packkv cache (block 16, window 8: blocks are compressed during prefill and decode);
    each sequence's text streams to its own callback."""
    params = {"params": CodecParams(block=16), "window": 8}
    engine = Engine(str(smollm2_folder), device="cpu")
    prompts = [engine.prompt_ids(p, chat=False) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    alone = [generate(engine, ids, 12, SamplingParams(), "packkv", show_progress=False, stop_at_eos=False,
                      **params) for ids in prompts]
    pieces = {b: [] for b in range(3)}
    together = generate_batch(engine, prompts, 12, SamplingParams(), "packkv", show_progress=False,
                              stop_at_eos=False, on_text=lambda b, piece: pieces[b].append(piece), **params)
    for b, (a, t) in enumerate(zip(alone, together)):
        assert t.token_ids == a.token_ids and t.text == a.text == "".join(pieces[b])
    assert together[0].cache_stats["kv_bytes_used"] > alone[0].cache_stats["kv_bytes_used"]
