"""The GPU encoder (packkv/kernels/encoder.py) against the reference (packkv.codec): byte for byte.

CPU (CI): the Numba CUDA kernel runs under Numba's CUDA simulator, in a subprocess, because the
simulator must be switched on (NUMBA_ENABLE_CUDASIM=1) before anything imports numba.cuda, and other
tests of the same session may already have imported it for real. The shapes are tiny (the simulator
runs one Python thread per CUDA thread); every granularity, repack method and pack size is covered,
on random and adversarial blocks (constant tokens, zeros, fp16 extremes and subnormals, outliers,
arbitrary fp16 bit patterns), both lane widths (8-bit levels for rel >= ~1/126, 16-bit below), blocks
of 8 to 256 tokens, blocks of one launch with bounds of their own (and the packkv cache's compress events encoded that way), the
global-scratch placement, NaN/inf refusals and a full arena.

GPU (`-m gpu`): the compiled kernel on real shapes (SmolLM2 3 KV heads x 64, Llama-3.1-8B 8 x 128),
both granularities, all repack methods and pack sizes, the four greedy builds (lane widths, narrow levels),
blocks 128 and 256, many blocks at once (the look-back across concurrent CTAs), per-block bounds, NaN/inf and
a full arena; and the inline PTX (the greedy's, the quantize's fp16 min/max and conversions) against the
Python twins the simulator runs instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from packkv import codec
from packkv.codec import CodecParams

HERE = Path(__file__).resolve().parent
ADVERSARIAL = ("gaussian", "constant_tokens", "zeros", "fp16_extremes", "outlier_channels", "huge_outlier",
               "subnormals", "fp16_bits", "far_from_zero")


def make_blocks(kinds, H, T, D, seed):
    """k, v fp16 [len(kinds), H, T, D]: block i of K is of kinds[i][0], of V of kinds[i][1]."""
    sys.path.insert(0, str(HERE))
    from test_codec import make_block
    rng = np.random.default_rng(seed)
    k = np.stack([make_block(kk, (H, T, D), rng) for kk, _ in kinds])
    v = np.stack([make_block(kv, (H, T, D), rng) for _, kv in kinds])
    return k, v


def reference_records(k, v, params, block_rel=None, sink=None):
    """codec's records of the blocks back to back and their offsets: encode_blocks, or with per-block
    bounds block_rel [(rel_k, rel_v)] each block encoded alone with its own; with sink = (tokens [n], (rel_k,
    rel_v)) block b's first tokens[b] tokens at those bounds (codec's per-token bounds)."""
    if block_rel is None and sink is None:
        buffer, offsets, _ = codec.encode_blocks(k, v, params)
        return buffer, offsets
    block_rel = block_rel or [(params.rel_k, params.rel_v)] * len(k)
    records = []
    for b, (rk, rv) in enumerate(block_rel):
        token_rel = None
        if sink is not None and sink[0][b] > 0:
            first = np.arange(params.block) < sink[0][b]
            token_rel = (np.where(first, sink[1][0], rk), np.where(first, sink[1][1], rv))
        records.append(codec.encode_block(k[b], v[b], replace(params, rel_k=rk, rel_v=rv), token_rel)[0])
    return np.concatenate(records), np.cumsum([0] + [r.size for r in records])


def mixed_kinds(n, seed):
    rng = np.random.default_rng(seed)
    return [(ADVERSARIAL[i % len(ADVERSARIAL)], ADVERSARIAL[int(rng.integers(len(ADVERSARIAL)))]) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# The simulator worker: `python tests/test_encoder.py '<json list of cases>'` prints one JSON line
# ----------------------------------------------------------------------------------------------------

def _worker(cases):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # int64 SWAR words wrap in numpy scalars
    from packkv.kernels import encoder
    assert encoder.SIMULATOR
    print(json.dumps([(_simulate_cache if case.get("cache") else _simulate_blocks)(case, encoder) for case in cases]))


def _simulate_blocks(case, encoder):
    """Blocks of the case's kinds through BlockEncoder and codec: are the bytes the same?"""
    from numba import cuda
    params = CodecParams(**case["params"])
    k, v = make_blocks([tuple(x) for x in case["kinds"]], case["H"], params.block, case["D"], case["seed"])
    if case.get("repeat"):   # every token a copy of one of `repeat` tokens: ties everywhere
        rng = np.random.default_rng(case["seed"])
        pick = rng.integers(0, case["repeat"], size=params.block)
        k, v = k[:, :, pick].copy(), v[:, :, pick].copy()
    for name, where in case.get("poison", []):   # (array, [block, head, token, channel]) -> NaN / inf
        (k if name == "k" else v)[tuple(where)] = np.float16(np.inf if where[-1] % 2 else np.nan)
    for name, where, bits in case.get("bits", []):   # (array, [block, head, token], fp16 bit patterns)
        (k if name == "k" else v)[tuple(where)] = np.array(bits, np.uint16).view(np.float16)
    used = case.get("used", 48)
    out = {"id": case["id"]}
    block_rel = case.get("block_rel")
    sink = case.get("sink")       # [tokens per block, [rel_k, rel_v]]
    try:
        ref, ref_offsets = reference_records(k, v, params, block_rel, sink)
    except ValueError as exc:
        ref, out["ref_error"] = None, str(exc)
    size = case.get("arena", used + (ref.size if ref is not None else 0) + 64)
    host = np.full(size, 0xA5, dtype=np.uint8)
    arena = cuda.to_device(host)
    enc = encoder.BlockEncoder(params, case["H"], case["D"], threads=case.get("threads", 64),
                               force_global=case.get("force_global", False),
                               chunks_per_lane=case.get("chunks_per_lane", 8))
    rel_k, rel_v = (None, None) if block_rel is None else zip(*block_rel)
    try:
        offsets, new_used = enc.encode(k, v, arena, used, rel_k, rel_v,
                                       **({} if sink is None else {"sink_tokens": np.array(sink[0]), "sink_rel": sink[1]}))
        out["E"], out["lv_shared"] = enc.plan.E, enc.plan.lv_shared
        got = arena.copy_to_host()
        out["identical"] = bool(ref is not None and new_used - used == ref.size
                                and np.array_equal(got[used:new_used], ref)
                                and np.array_equal(offsets.copy_to_host(), used + ref_offsets))
        out["prefix_untouched"] = bool((got[:used] == 0xA5).all())
        out["bytes"] = int(new_used - used)
    except ValueError as exc:
        out["error"], out["error_type"] = str(exc), type(exc).__name__
        out["needed"] = getattr(exc, "needed", None)
        out["ref_bytes"] = None if ref is None else int(ref.size)
    return out


def _simulate_cache(case, encoder):
    """A CPU packkv cache with layer and sink bounds (test_cache_bounds) fed the case's steps; every
    compress event's blocks encoded again as the cache's GPU path does (one call with the cache's
    block_bounds): is the arena byte for byte the grouped CPU path's?"""
    from numba import cuda
    sys.path.insert(0, str(HERE))
    import test_cache_bounds as bounded
    cache = bounded.bounded_cache(bounded.CPU, CodecParams(**case["params"]), sink_tokens=case.get("sink_tokens"))
    events, start_grouped = [], cache.start_records

    def spy(k, v, owners):
        events.append((k, v, owners))
        return start_grouped(k, v, owners)

    cache.start_records = spy
    bounded.feed(cache, bounded.random_steps(case["seed"], case["steps"]))
    arena, used, lanes = cuda.to_device(np.zeros(cache.arena.used + 64, np.uint8)), 0, []
    for k, v, owners in events:
        rel_k, rel_v = cache.block_bounds(owners)
        sink_tokens, sink_rel = cache.partial_sinks(owners), (cache.sink_params.rel_k, cache.sink_params.rel_v)
        lanes.append(encoder.lane_bits(cache.params, encoder.tightest_bounds(
            encoder.block_bounds(cache.params, len(k), rel_k, rel_v),
            encoder.sink_columns(len(k), cache.params.block, sink_tokens, sink_rel))))
        _, used = encoder.encode_blocks_device(k, v, cache.params, arena, used, rel_k, rel_v, sink_tokens, sink_rel,
                                               threads=64)
    same = used == cache.arena.used and np.array_equal(arena.copy_to_host()[:used], cache.arena.data[:used])
    return {"id": case["id"], "identical": bool(same), "events": len(events), "lanes": lanes}


def _start(cases):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(cases)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)


def _collect(proc, timeout=1200):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return {r["id"]: r for r in json.loads(out.strip().splitlines()[-1])}


def _params(**kw):
    return {**vars(CodecParams()), **kw}


def _identical_cases(granularity, repack):
    cases = []
    for i, pack in enumerate(codec.PACK_SIZES):
        block = pack * (2 if pack < 32 else 1)
        H, D = (2, 8) if pack < 32 else (1, 4)
        cases.append(dict(id=f"p{pack}", params=_params(granularity=granularity, repack=repack, pack=pack,
                                                          block=block),
                          H=H, D=D, kinds=mixed_kinds(3, seed=i), seed=100 + i))
    return cases


def _lane_cases():
    return [
        dict(id="e16", params=_params(rel_k=2.0 ** -12, rel_v=0.05, pack=8, block=16), H=2, D=8,
             kinds=mixed_kinds(2, 5), seed=1),
        dict(id="e8_fine", params=_params(rel_k=0.01, rel_v=1.0, repack="sort", pack=8, block=8), H=3, D=4,
             kinds=mixed_kinds(2, 6), seed=2),
        dict(id="global", params=_params(pack=8, block=16, granularity="token-head"), H=3, D=12,
             kinds=mixed_kinds(2, 7), seed=3, force_global=True),
        dict(id="global_e16", params=_params(rel_k=2.0 ** -12, rel_v=2.0 ** -12, pack=8, block=16), H=1,
             D=12, kinds=mixed_kinds(2, 8), seed=4, force_global=True, threads=32),
        dict(id="reload", params=_params(pack=8, block=8), H=2, D=72, kinds=mixed_kinds(2, 9), seed=5,
             chunks_per_lane=1),   # a token wider than a lane group's registers: quantize reloads it
    ]


def _greedy_cases():
    """Greedy with two to eight packs of 8 or 16 per block; repeated tokens, constant tokens and small
    integers tie costs everywhere (the lowest token must win, as in codec). The work splits covered:
    one to four warps per unit (candidate slices), units in rounds (more units than warps), idle
    warps, lane groups of 2 to 32 lanes per candidate, one or two row words per lane (a partial
    last word), slices longer than a warp (removal in several chunks), lazy picks (rows of 32 words
    or more). Blocks stay at 16-64 tokens
    and one block per case: the simulator runs every CUDA thread as a Python thread."""
    cases = []
    shapes = [("token-layer", 8, 32, 1, 8, 32, 0, ("gaussian", "gaussian"), 1),
              ("token-layer", 16, 32, 2, 8, 32, 0, ("gaussian", "gaussian"), 1),
              ("token-layer", 8, 32, 1, 16, 32, 3, ("constant_tokens", "outlier_channels"), 22),
              ("token-head", 16, 32, 2, 8, 64, 3, ("zeros", "gaussian"), 23),
              ("token-head", 8, 16, 3, 16, 64, 3, ("far_from_zero", "constant_tokens"), 24)]
    for granularity, pack, block, H, D, threads, repeat, kinds, seed in shapes:
        cases.append(dict(id=f"{granularity}-p{pack}-r{repeat}", params=_params(granularity=granularity,
                          pack=pack, block=block), H=H, D=D, kinds=[kinds], seed=seed, repeat=repeat,
                          threads=threads))
    cases.append(dict(id="e16", params=_params(rel_k=2.0 ** -12, rel_v=0.05, pack=8, block=16), H=1, D=8,
                      kinds=[("gaussian", "huge_outlier")], seed=30, threads=32))
    # rows of 34 words: two words per lane, the second one for 2 lanes only
    cases.append(dict(id="chunks", params=_params(granularity="token-head", pack=8, block=16), H=2,
                      D=136, kinds=[("gaussian", "far_from_zero")], seed=33, threads=64))
    # 4 warps for one unit; 8 warps for 3 units (2 per unit, 2 idle); one warp, 63-token slices
    for name, granularity, H, D, block, threads in (("warps4", "token-layer", 2, 8, 32, 128),
                                                   ("idle", "token-head", 3, 8, 24, 256),
                                                   ("long", "token-head", 1, 4, 64, 32)):
        cases.append(dict(id=name, params=_params(granularity=granularity, pack=8, block=block), H=H, D=D,
                          kinds=[("gaussian", "outlier_channels")], seed=34, threads=threads))
    cases.append(dict(id="small_ints", params=_params(rel_k=0.3, rel_v=1.0, pack=8, block=16), H=2, D=12,
                      kinds=[("subnormals", "fp16_extremes")], seed=31, threads=32))
    # levels of up to 8 bits in 16-bit lanes: two words' ranges counted in one (the narrow build)
    cases.append(dict(id="e16_narrow", params=_params(rel_k=0.005, rel_v=0.05, pack=8, block=16), H=1, D=8,
                      kinds=[("gaussian", "outlier_channels")], seed=32, threads=32))
    return cases


def _lazy_greedy_cases():
    """Rows of 32 words or more: lazy picks (stale costs as lower bounds, the unit's best key so far shared
    by its warps), with ties, one, two and four warps per unit, 8-bit lanes with levels of up to 4 bits
    (two words' ranges counted in one) and up to 7, 16-bit lanes with levels of up to 8 and 13 bits, rows
    of 2 words per lane with a partial last one, small levels. A job of its own, and not in the default run
    (-m long_simulation): these took ~3.5 minutes beside the default jobs on 2 shared cores here. On a GPU,
    test_gpu_greedy_real_shapes_byte_identical and test_gpu_greedy_lane_builds run the lazy picks at
    SmolLM2's and the 8B shape's rows (token-layer and token-head)."""
    return [dict(id=name, params=_params(granularity=granularity, pack=8, block=block, rel_k=rel_k), H=H, D=D,
                 kinds=[("gaussian", "far_from_zero")], seed=35, threads=threads, repeat=repeat)
            for name, granularity, H, D, block, threads, repeat, rel_k in (
                ("lazy", "token-layer", 2, 64, 32, 64, 0, 0.1), ("lazy_ties", "token-layer", 2, 64, 32, 64, 3, 0.1),
                ("lazy_e16", "token-layer", 1, 64, 32, 32, 0, 2.0 ** -12),
                ("lazy_small", "token-layer", 2, 64, 32, 64, 0, 0.5),
                ("lazy_warps4", "token-layer", 2, 64, 24, 128, 2, 0.1),
                ("lazy_partial_words", "token-layer", 2, 72, 16, 64, 0, 0.03),
                ("lazy_e16_narrow", "token-layer", 1, 64, 16, 32, 0, 0.005))]


def _block_bound_cases():
    """Blocks of one launch with bounds of their own (per-layer and sink bounds in the cache): 8-bit
    lanes when every block's bounds allow them (whatever params say), 16-bit lanes for all blocks as
    soon as one block's bound is below ~1/126."""
    loose = [(0.1, 0.2), (0.3, 0.05), (1.0, 1.0), (0.02, 0.5)]
    return [
        dict(id="greedy_e8", params=_params(rel_k=2.0 ** -12, pack=8, block=16), H=2, D=8,
             kinds=mixed_kinds(4, 40), seed=40, block_rel=loose),
        dict(id="greedy_e16", params=_params(pack=8, block=16), H=2, D=8, kinds=mixed_kinds(3, 41), seed=41,
             block_rel=[(0.1, 0.2), (2.0 ** -12, 0.003), (0.5, 0.2)]),
        dict(id="token_head_sort", params=_params(granularity="token-head", repack="sort", pack=8, block=16),
             H=3, D=4, kinds=mixed_kinds(4, 42), seed=42, block_rel=loose[::-1]),
        dict(id="global_none", params=_params(repack="none", pack=8, block=8), H=1, D=12,
             kinds=mixed_kinds(3, 43), seed=43, force_global=True, block_rel=[(0.25, 0.01), (0.1, 0.2), (0.2, 0.1)]),
    ]


def _large_block_cases():
    """Blocks of 128 and 256 tokens (the accuracy profiles' blocks; the other simulator cases stay at 8-64
    tokens): greedy picks over 16 packs (token indices past 127 in the pick keys, one warp's slice of 256
    tokens), two warps per unit over 128 tokens (slices of 64: the case that found the seed counted once per
    32 tokens of the slice, which shifted the slice's write-back), and the sort repack with the level matrix in global scratch
    and 16-bit lanes (where SmolLM2's block 256 puts it when a bound is below ~1/126), the blocks at bounds of
    their own (a first block at the sink's, the next at a layer's)."""
    return [
        dict(id="b256_greedy", params=_params(block=256), H=1, D=4, kinds=[("gaussian", "outlier_channels")],
             seed=50, threads=32),
        dict(id="b128_greedy_two_warps", params=_params(granularity="token-head", pack=32, block=128), H=1, D=4,
             kinds=[("far_from_zero", "constant_tokens")], seed=51, threads=64),
        dict(id="b256_sort_global_e16", params=_params(repack="sort", block=256), H=2, D=8, kinds=mixed_kinds(2, 52),
             seed=52, force_global=True, block_rel=[(2.0 ** -12, 0.03), (0.055, 0.27)]),
    ]


def _cache_cases():
    """The cache's prefill (sink and layer bounds: 16-bit lanes) and one decode event (layer bounds: 8-bit);
    the same with only the first 5 tokens, then 21 (a block and 5), at the sink bounds (--kv-sink-tokens)."""
    return [dict(id="cache", cache=True, params=_params(repack="sort", block=16, pack=8), seed=3, steps=[40, 20]),
            dict(id="cache_sink5", cache=True, params=_params(block=16, pack=8), seed=4, steps=[40, 20],
                 sink_tokens=5),
            dict(id="cache_sink21", cache=True, params=_params(granularity="token-head", repack="sort", block=16,
                                                                 pack=8), seed=5, steps=[40, 20], sink_tokens=21)]


def _sink_token_cases():
    """Each block's first n tokens at bounds of their own (sink tokens), the rest at the block's: every count
    from none to the whole block, with per-block bounds or params', both granularities, greedy and sort;
    the lane width follows the sink bounds too (16-bit lanes when only they are below ~1/126)."""
    loose = [(0.1, 0.2), (0.3, 0.05), (0.05, 0.27), (0.02, 0.5)]
    return [
        dict(id="greedy_e16", params=_params(pack=8, block=16), H=2, D=8, kinds=mixed_kinds(4, 60), seed=60,
             block_rel=loose, sink=[[0, 5, 16, 1], [2.0 ** -12, 0.003]]),
        dict(id="greedy_e8", params=_params(pack=8, block=16), H=2, D=8, kinds=mixed_kinds(3, 61), seed=61,
             sink=[[15, 0, 8], [0.01, 0.03]]),
        dict(id="token_head_sort", params=_params(granularity="token-head", repack="sort", pack=8, block=16),
             H=3, D=4, kinds=mixed_kinds(3, 62), seed=62, block_rel=loose[:3], sink=[[4, 16, 9], [0.02, 0.01]]),
        dict(id="token_head_greedy", params=_params(granularity="token-head", pack=8, block=32), H=2, D=8,
             kinds=mixed_kinds(2, 63), seed=63, threads=64, sink=[[3, 31], [0.01, 0.03]]),
    ]


def _refusal_cases():
    base = dict(params=_params(pack=8, block=16), H=2, D=8, kinds=mixed_kinds(3, 9), seed=11)
    return [dict(base, id="nan_v", poison=[("v", [2, 0, 3, 4]), ("v", [1, 1, 9, 1])]),
            dict(base, id="inf_k", poison=[("k", [1, 1, 5, 7]), ("v", [0, 0, 0, 0])]),
            dict(base, id="nan_kv", poison=[("v", [2, 1, 6, 2]), ("k", [2, 1, 6, 0])]),
            # the quantize's ranges work on fp16 bit patterns: signed zeros, subnormals, fp16's extremes
            dict(base, id="extremes", bits=[
                ("k", [0, 0, 0], [0x8000] * 8),
                ("k", [0, 0, 1], [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x8400]),
                ("k", [0, 1, 2], [0x7BFF, 0xFBFF, 0x0000, 0x3C00, 0x8001, 0xBC00, 0x7BFE, 0x0001]),
                ("v", [1, 0, 3], [0x7BFF] * 8),
                ("v", [1, 1, 4], [0xFBFF, 0x7BFF] * 4),
                ("k", [2, 0, 5], [0x0001, 0x0002, 0x0003, 0x8001, 0x0010, 0x8200, 0x0000, 0x0007]),
                ("v", [2, 1, 6], [0x0001] * 8),
                ("v", [0, 1, 7], [0xFBFF] * 8),
                ("k", [1, 0, 8], [0x8000, 0xFBFF, 0x8000, 0x8000, 0x8000, 0x8000, 0x8000, 0x8000]),
                ("v", [2, 0, 9], [0x0000, 0x7BFF, 0x0000, 0x0000, 0x0000, 0x0000, 0x8000, 0x0000])]),
            dict(base, id="full", arena=64 + 48)]


SIM_JOBS = {f"test_simulated_encoder_is_byte_identical[{r}-{g}]": (_identical_cases, (g, r))
            for g in codec.GRANULARITIES for r in codec.REPACK_METHODS}
SIM_JOBS["test_simulated_lane_widths_placements_and_odd_shapes"] = (_lane_cases, ())
SIM_JOBS["test_simulated_greedy_picks_and_ties"] = (_greedy_cases, ())
SIM_JOBS["test_simulated_lazy_greedy_picks"] = (_lazy_greedy_cases, ())
SIM_JOBS["test_simulated_per_block_bounds"] = (_block_bound_cases, ())
SIM_JOBS["test_simulated_blocks_of_128_and_256_tokens"] = (_large_block_cases, ())
SIM_JOBS["test_simulated_cache_events_in_one_call"] = (_cache_cases, ())
SIM_JOBS["test_simulated_sink_tokens"] = (_sink_token_cases, ())
SIM_JOBS["test_simulated_refusals"] = (_refusal_cases, ())


@pytest.fixture(scope="module")
def simulated(request):
    """Starts the simulator jobs of every selected test at once (they are CPU-bound subprocesses)."""
    selected = {item.name for item in request.session.items}
    procs = {name: _start(make(*args)) for name, (make, args) in SIM_JOBS.items() if name in selected}
    yield lambda name: _collect(procs[name])
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------------
# CPU: the kernel under the CUDA simulator
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
@pytest.mark.parametrize("repack", codec.REPACK_METHODS)
def test_simulated_encoder_is_byte_identical(simulated, request, granularity, repack):
    """Every pack size, one or two packs per block, random and adversarial blocks in one batch."""
    for r in simulated(request.node.name).values():
        assert r.get("identical"), r
        assert r["prefix_untouched"], r


def test_simulated_lane_widths_placements_and_odd_shapes(simulated, request):
    """16-bit lanes (rel 2**-12: ~4097 levels), 8-bit lanes at the edge (rel 0.01), the global
    scratch for the level matrix, head_dim 4 and 12 (padding lanes), 3 heads, one warp per CTA, tokens
    wider than the registers that hold them while quantizing."""
    results = simulated(request.node.name)
    assert results["e16"]["E"] == 16 and results["e8_fine"]["E"] == 8
    assert not results["global"]["lv_shared"] and not results["global_e16"]["lv_shared"]
    for r in results.values():
        assert r.get("identical"), r


def test_simulated_greedy_picks_and_ties(simulated, request):
    """The greedy order (every work split, ties) equals codec's, byte for byte."""
    results = simulated(request.node.name)
    assert len(results) == 12
    assert results["e16_narrow"]["E"] == 16
    for r in results.values():
        assert r.get("identical"), r


@pytest.mark.long_simulation
def test_simulated_lazy_greedy_picks(simulated, request):
    """The lazy picks (rows of 32 words or more) give codec's greedy order, byte for byte."""
    results = simulated(request.node.name)
    assert len(results) == 7
    assert results["lazy_e16"]["E"] == 16 and results["lazy_e16_narrow"]["E"] == 16
    assert results["lazy_partial_words"]["E"] == 8
    for r in results.values():
        assert r.get("identical"), r


def test_simulated_per_block_bounds(simulated, request):
    """One launch, each block with its own (rel_k, rel_v): every record is byte-identical to codec's
    record of that block with its own bounds; the lane width follows the tightest block."""
    results = simulated(request.node.name)
    assert results["greedy_e8"]["E"] == 8 and results["greedy_e16"]["E"] == 16
    assert not results["global_none"]["lv_shared"]
    for r in results.values():
        assert r.get("identical"), r
        assert r["prefix_untouched"], r


def test_simulated_blocks_of_128_and_256_tokens(simulated, request):
    """Blocks larger than 64 tokens are byte-identical to codec's: greedy over 8 and 16 packs, sort with the
    level matrix in global scratch at 16-bit lanes."""
    results = simulated(request.node.name)
    assert results["b256_greedy"]["E"] == 8 and results["b256_greedy"]["lv_shared"]
    assert results["b256_sort_global_e16"]["E"] == 16 and not results["b256_sort_global_e16"]["lv_shared"]
    for r in results.values():
        assert r.get("identical"), r
        assert r["prefix_untouched"], r


def test_simulated_cache_events_in_one_call(simulated, request):
    """What the packkv cache's GPU path does, one encoder call per compress event with each block's
    bounds (PackkvCache.block_bounds), writes the arena its grouped CPU path writes."""
    results = simulated(request.node.name)
    r = results["cache"]
    assert r["identical"] and r["events"] == 2 and r["lanes"] == [16, 8], r
    for name in ("cache_sink5", "cache_sink21"):     # the first 5 (21) tokens at the sink bounds
        assert results[name]["identical"] and results[name]["lanes"] == [16, 8], results[name]


def test_simulated_sink_tokens(simulated, request):
    """Per-block counts of first tokens at sink bounds: every record is codec's with those per-token bounds;
    the lane width follows the tightest bound any token has."""
    results = simulated(request.node.name)
    assert results["greedy_e16"]["E"] == 16 and results["greedy_e8"]["E"] == 8
    for r in results.values():
        assert r.get("identical"), r
        assert r["prefix_untouched"], r


def test_simulated_refusals(simulated, request):
    """NaN/inf: a ValueError naming the first bad (array, block, head, token), as the codec names it,
    and nothing committed; a too-small arena: ArenaFullError with the size it needs."""
    r = simulated(request.node.name)
    assert r["nan_v"]["error_type"] == "NonFiniteInputError"   # a ValueError (caught as one above)
    assert r["nan_v"]["error"] == r["nan_v"]["ref_error"], r["nan_v"]
    assert "v has a non-finite" in r["nan_v"]["error"] and "block 1, head 1, token 9" in r["nan_v"]["error"]
    assert r["inf_k"]["error"] == r["inf_k"]["ref_error"] and "k has a non-finite" in r["inf_k"]["error"]
    assert "block 1, head 1, token 5" in r["inf_k"]["error"]
    assert r["nan_kv"]["error"] == r["nan_kv"]["ref_error"] and "k has a non-finite" in r["nan_kv"]["error"]
    assert "block 2, head 1, token 6" in r["nan_kv"]["error"]
    assert r["extremes"].get("identical") and r["extremes"]["prefix_untouched"], r["extremes"]
    assert r["full"]["error_type"] == "ArenaFullError" and r["full"]["needed"] == 48 + r["full"]["ref_bytes"]


def test_level_bound_and_lane_choice():
    from packkv.kernels.encoder import lane_bits, level_bound
    assert level_bound(0.1) == 11 and level_bound(0.2) == 6 and level_bound(1.0) == 3
    assert lane_bits(CodecParams()) == 8 and lane_bits(CodecParams(rel_k=2.0 ** -12)) == 16
    # the bound holds on adversarial data for every rel the codec test draws
    rng = np.random.default_rng(0)
    for rel in (2.0 ** -12, 0.01, 1 / 126, 0.1, 0.3, 1.0):
        for kind in ADVERSARIAL:
            sys.path.insert(0, str(HERE))
            from test_codec import make_block
            x = make_block(kind, (2, 64, 16), rng)
            levels, _, _ = codec.quantize_tokens(x.astype(np.float32), rel)
            assert levels.max() <= level_bound(rel), (rel, kind)


def test_quotient_by_reciprocal_is_the_ieee_division():
    """quantize's x / step as x r plus one FMA correction (r = 1 / step correctly rounded) gives the IEEE
    quotient for every pair of fp16 significands (exponents only scale), through the float64 sum that
    the simulator's fma32 uses too."""
    from packkv.kernels.encoder import quotient_reference
    assert quotient_reference() == 0


def test_block_bounds_and_the_tightest_block():
    """Per-block bounds become float32 (rel_k, rel_v) pairs, checked like CodecParams; the lane width
    and the record size bound follow the tightest block, not params."""
    from packkv.kernels.encoder import block_bounds, lane_bits, max_record_bytes
    params, tight = CodecParams(), CodecParams(rel_k=2.0 ** -12)
    assert block_bounds(params, 2).tolist() == [[np.float32(0.1), np.float32(0.2)]] * 2
    bounds = block_bounds(params, 3, rel_k=[0.1, 2.0 ** -12, 1.0])
    assert bounds.dtype == np.float32 and bounds[:, 1].tolist() == [np.float32(0.2)] * 3
    assert lane_bits(params, bounds) == 16 and lane_bits(tight, block_bounds(params, 3)) == 8
    assert max_record_bytes(params, 3, 8, bounds) == max_record_bytes(tight, 3, 8)
    for bad in ([0.1, 0.2], [0.1, 2.0, 0.1], [0.1, np.nan, 0.1], [0.1, 1e-5, 0.1]):
        with pytest.raises(ValueError, match="rel_v"):
            block_bounds(params, 3, rel_v=bad)


def test_max_record_bytes_bounds_real_records():
    from packkv.kernels.encoder import max_record_bytes
    rng = np.random.default_rng(1)
    for kind in ADVERSARIAL:
        for params in (CodecParams(), CodecParams(granularity="token-head", pack=8), CodecParams(rel_k=2.0 ** -12)):
            k, v = make_blocks([(kind, kind)], 3, params.block, 8, int(rng.integers(1 << 30)))
            buf, _, _ = codec.encode_blocks(k, v, params)
            assert buf.size <= max_record_bytes(params, 3, 8)


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernel on real shapes
# ----------------------------------------------------------------------------------------------------

def _gpu_encode(k, v, params, used=48, extra=64, arena_size=None, block_rel=None, sink=None, **options):
    import cupy
    from packkv.kernels.encoder import encode_blocks_device
    ref, ref_offsets = reference_records(k, v, params, block_rel, sink)
    size = arena_size or used + ref.size + extra
    arena = cupy.full(size, 0xA5, dtype=cupy.uint8)
    rel_k, rel_v = (None, None) if block_rel is None else zip(*block_rel)
    if sink is not None:
        options = {**options, "sink_tokens": np.array(sink[0]), "sink_rel": sink[1]}
    offsets, new_used = encode_blocks_device(cupy.asarray(k), cupy.asarray(v), params, arena, used, rel_k, rel_v,
                                             **options)
    got = cupy.asnumpy(arena)
    return ref, ref_offsets, got, cupy.asnumpy(cupy.asarray(offsets)), new_used


def _assert_identical(k, v, params, used=48, **options):
    ref, ref_offsets, got, offsets, new_used = _gpu_encode(k, v, params, used=used, **options)
    assert new_used - used == ref.size
    assert np.array_equal(offsets, used + ref_offsets)
    diff = np.flatnonzero(got[used:new_used] != ref)
    assert diff.size == 0, f"{diff.size} bytes differ, first at {diff[:8]}"
    assert (got[:used] == 0xA5).all() and (got[new_used:] == 0xA5).all()


@pytest.mark.gpu
@pytest.mark.parametrize("H,D", [(3, 64), (8, 128)])
@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
def test_gpu_greedy_real_shapes_byte_identical(gpu, H, D, granularity):
    params = CodecParams(granularity=granularity)   # greedy, pack 16, block 64
    k, v = make_blocks(mixed_kinds(12, H), H, params.block, D, seed=D + H)
    _assert_identical(k, v, params)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
@pytest.mark.parametrize("rel", [(0.1, 0.2), (0.03, 0.05), (0.005, 0.01), (2.0 ** -10, 0.003)])
def test_gpu_greedy_lane_builds(gpu, granularity, rel):
    """The 8B shape with bounds that pick each greedy build: 8-bit lanes with levels of <= 4 bits (two words'
    ranges counted in one) and <= 7 bits, 16-bit lanes with <= 8 bits (two in one) and <= 13 bits."""
    from packkv.kernels.encoder import lane_bits, narrow_levels
    params = CodecParams(granularity=granularity, rel_k=rel[0], rel_v=rel[1])
    assert (lane_bits(params), narrow_levels(params)) == {0.1: (8, True), 0.03: (8, False), 0.005: (16, True),
                                                          2.0 ** -10: (16, False)}[rel[0]]
    k, v = make_blocks(mixed_kinds(8, 11), 8, params.block, 128, seed=11)
    _assert_identical(k, v, params)


@pytest.mark.gpu
def test_gpu_ptx_primitives_match_their_twins(gpu):
    """The inline PTX of the greedy (PRMT sign lanes, REDUX sum and min, DP4A) against the pure-Python twins
    that the simulator runs: what makes the simulator tests speak for the GPU build."""
    from numba import cuda
    from packkv.kernels import encoder
    sign8, sign16 = encoder.SIGN_LANES[8], encoder.SIGN_LANES[16]
    redux_add, redux_min, dot4 = encoder.redux_add, encoder.redux_min, encoder.dot4

    @cuda.jit
    def probe(x, y, z, out):
        i = cuda.threadIdx.x
        out[0, i] = sign8(x[i])
        out[1, i] = sign16(x[i])
        out[2, i] = redux_add(x[i])
        out[3, i] = redux_min(x[i])
        out[4, i] = dot4(x[i], y[i], z[i])

    rng = np.random.default_rng(12)
    for _ in range(4):
        x, y, z = (rng.integers(0, 1 << 32, size=32, dtype=np.uint64).astype(np.uint32) for _ in range(3))
        out = np.zeros((5, 32), np.uint32)
        probe[1, 32](x, y, z, out)
        for i in range(32):
            assert out[0, i] == encoder.sign_lanes_reference(x[i], 8)
            assert out[1, i] == encoder.sign_lanes_reference(x[i], 16)
            assert out[4, i] == encoder.dot4_reference(x[i], y[i], z[i])
        assert (out[2] == np.uint32(int(x.astype(np.uint64).sum()) & 0xFFFFFFFF)).all()
        assert (out[3] == x.min()).all()


@pytest.mark.gpu
def test_gpu_half_primitives_match_their_twins(gpu):
    """The quantize's fp16 PTX (min/max.f16x2, cvt.f32.f16 of either half) against the Python twins, on every
    finite fp16 value (signed zeros, subnormals, +-65504) paired with shuffled others; zeros of either sign
    compare equal (the ranges' sign of zero does not reach a record)."""
    from numba import cuda
    from packkv.kernels import encoder
    hmin2, hmax2, half_lo, half_hi = encoder.hmin2, encoder.hmax2, encoder.half_lo, encoder.half_hi

    @cuda.jit
    def probe(x, y, out):
        i = cuda.grid(1)
        if i < x.size:
            out[0, i] = hmin2(x[i], y[i])
            out[1, i] = hmax2(x[i], y[i])
            out[2, i] = half_lo(x[i])
            out[3, i] = half_hi(x[i])

    bits = np.arange(1 << 16, dtype=np.uint32)
    finite = bits[(bits & 0x7C00) != 0x7C00]
    rng = np.random.default_rng(13)
    x = finite | (rng.permutation(finite) << 16)
    y = rng.permutation(finite) | (rng.permutation(finite) << 16)
    out = np.zeros((4, x.size), np.uint32)
    probe[(x.size + 255) // 256, 256](x, y, out)
    as_f16 = lambda w: np.stack([w & 0xFFFF, w >> 16]).astype(np.uint16).view(np.float16)
    assert np.array_equal(as_f16(out[0]), np.minimum(as_f16(x), as_f16(y)))   # == : -0.0 == 0.0
    assert np.array_equal(as_f16(out[1]), np.maximum(as_f16(x), as_f16(y)))
    assert np.array_equal(out[2].view(np.float32), as_f16(x)[0].astype(np.float32))
    assert np.array_equal(out[2], as_f16(x)[0].astype(np.float32).view(np.uint32))   # bit for bit
    assert np.array_equal(out[3], as_f16(x)[1].astype(np.float32).view(np.uint32))
    for i in rng.integers(0, x.size, 200):   # the twins the simulator runs
        assert encoder.half_f32_reference(x[i], False) == out[2, i]
        assert encoder.half_f32_reference(x[i], True) == out[3, i]
        for got, ref in ((out[0, i], encoder.hmin2_reference(x[i], y[i])),
                         (out[1, i], encoder.hmax2_reference(x[i], y[i]))):
            assert np.array_equal(as_f16(np.uint32(got)), as_f16(np.uint32(ref)))


@pytest.mark.gpu
@pytest.mark.parametrize("repack", codec.REPACK_METHODS)
@pytest.mark.parametrize("pack", codec.PACK_SIZES)
def test_gpu_repack_and_pack_sizes(gpu, repack, pack):
    params = CodecParams(repack=repack, pack=pack)
    k, v = make_blocks(mixed_kinds(4, pack), 8, params.block, 128, seed=pack)
    _assert_identical(k, v, params)


@pytest.mark.gpu
def test_gpu_many_blocks_lookback(gpu):
    """More blocks than CTAs in flight: records land in block order, offsets chain across CTAs."""
    params = CodecParams()
    k, v = make_blocks(mixed_kinds(600, 3), 3, 64, 64, seed=3)
    _assert_identical(k, v, params, used=4096)


@pytest.mark.gpu
def test_gpu_block_128_and_fine_levels(gpu):
    """Block 128 of the 8B shape (the level matrix lives in global scratch) and 16-bit lanes; token-head
    there (2 warps per unit, slices of 64 tokens) and SmolLM2's block 256 (token-head: 5 warps per unit,
    slices of up to 51 tokens), where the seed's slice once shifted the write-back of slices past 32 tokens."""
    _assert_identical(*make_blocks(mixed_kinds(4, 1), 8, 128, 128, seed=1), CodecParams(block=128))
    _assert_identical(*make_blocks(mixed_kinds(4, 3), 8, 128, 128, seed=3),
                      CodecParams(block=128, granularity="token-head"))
    for granularity in codec.GRANULARITIES:
        _assert_identical(*make_blocks(mixed_kinds(4, 4), 3, 256, 64, seed=4),
                          CodecParams(block=256, granularity=granularity))
    _assert_identical(*make_blocks(mixed_kinds(4, 2), 3, 64, 64, seed=2),
                      CodecParams(rel_k=2.0 ** -12, granularity="token-head"))


@pytest.mark.gpu
@pytest.mark.parametrize("sink", [None, (2.0 ** -10, 0.003)])
@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
def test_gpu_per_block_bounds(gpu, granularity, sink):
    """The 8B shape, 48 blocks of 8 layers' bounds (layer scales) in one launch, the first blocks at the
    sink's (16-bit lanes for all): each record is codec's of its block with its own bounds."""
    params = CodecParams(granularity=granularity)
    rng = np.random.default_rng(9)
    layer_rel = [(float(rk), float(rv)) for rk, rv in rng.uniform(0.02, 0.5, size=(8, 2))]
    block_rel = [sink if sink is not None and b % 6 == 0 else layer_rel[b % 8] for b in range(48)]
    k, v = make_blocks(mixed_kinds(48, 9), 8, params.block, 128, seed=9)
    _assert_identical(k, v, params, block_rel=block_rel)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
def test_gpu_sink_tokens(gpu, granularity):
    """SmolLM2's shape at block 128, each block's first 0-128 tokens at (0.01, 0.03) and the rest at a layer's
    bounds, in one launch: each record is codec's with those per-token bounds."""
    params = CodecParams(granularity=granularity, block=128)
    rng = np.random.default_rng(10)
    block_rel = [(float(rk), float(rv)) for rk, rv in rng.uniform(0.03, 0.4, size=(12, 2))]
    tokens = [0, 4, 8, 32, 64, 127, 128, 1, 16, 0, 96, 5]
    k, v = make_blocks(mixed_kinds(12, 10), 3, params.block, 64, seed=10)
    _assert_identical(k, v, params, block_rel=block_rel, sink=(tokens, (0.01, 0.03)))


@pytest.mark.gpu
def test_gpu_refusals(gpu):
    import cupy
    from packkv.kernels.encoder import ArenaFullError, encode_blocks_device
    params = CodecParams()
    k, v = make_blocks(mixed_kinds(5, 4), 8, 64, 128, seed=4)
    k[3, 5, 17, 100] = np.float16(np.nan)
    k[4, 0, 0, 0] = np.float16(np.inf)
    arena = cupy.zeros(1 << 20, dtype=cupy.uint8)
    with pytest.raises(ValueError) as exc:
        codec.encode_blocks(k, v, params)
    with pytest.raises(ValueError, match="block 3, head 5, token 17") as got:
        encode_blocks_device(cupy.asarray(k), cupy.asarray(v), params, arena, 0)
    assert str(got.value) == str(exc.value)
    for lane in range(4):   # each fp16 of an 8-byte word: the top one's NaN test carries into bit 63
        k, v = make_blocks(mixed_kinds(5, 6), 8, 64, 128, seed=6)
        v[2, 1, 7, 4 * 9 + lane] = np.float16(np.nan)
        with pytest.raises(ValueError, match="v has a non-finite.*block 2, head 1, token 7"):
            encode_blocks_device(cupy.asarray(k), cupy.asarray(v), params, arena, 0)
    k, v = make_blocks(mixed_kinds(5, 5), 8, 64, 128, seed=5)
    ref, _, _ = codec.encode_blocks(k, v, params)
    with pytest.raises(ArenaFullError) as full:
        encode_blocks_device(cupy.asarray(k), cupy.asarray(v), params, cupy.zeros(4096, cupy.uint8), 16)
    assert full.value.needed == 16 + ref.size


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
