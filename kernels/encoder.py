"""The GPU encoder of packkv's compressed KV format (v1): Numba CUDA, one launch per batch of blocks.

API (what packkv/cache.py calls):

    offsets, new_used = encode_blocks_device(k, v, params, arena, used, rel_k=None, rel_v=None,
                                             sink_tokens=None, sink_rel=None)

k, v: fp16 device arrays [n_blocks, n_kv_heads, block, head_dim] (CuPy or any CUDA-array-interface
array; C-contiguous; head_dim a multiple of 4), all layers and sequences that are due, in the order their
records should land. arena: a 1-D uint8 device array; used: the arena's used bytes (a multiple of 16).
rel_k, rel_v: optional per-block bounds (host sequences of n_blocks numbers in [2**-12, 1]) that replace
params' (e.g. per-layer and attention-sink bounds), so that blocks of any bounds share one launch.
Records are bump-allocated from `used` on, in block order, byte-identical to
`packkv.codec.encode_blocks(k, v, params)`'s buffer (with per-block bounds: record b is
`codec.encode_block` of block b with its own rel_k[b], rel_v[b]; records do not store bounds).
sink_tokens, sink_rel: optional per-block counts (host, n_blocks ints in [0, block]) of each block's first
tokens encoded at sink_rel = (rel_k, rel_v) instead (a sequence's first tokens, attention sinks, when they
are not a whole block): record b is then `codec.encode_block` with those per-token bounds. The lane
width of the level matrix (and with it the plan's shared memory) follows the tightest block's bounds;
`max_record_bytes(params, H, D, bounds)` likewise. Returns offsets, an int64 device array (CuPy when
CuPy is there) [n_blocks + 1] of absolute arena offsets (offsets[0] == used, record b at
arena[offsets[b]:offsets[b+1]], offsets[-1] == new_used), and new_used (a Python int). The call
synchronizes once (it reads back the end offset, error flags and offsets). NaN/inf input raises
NonFiniteInputError (a ValueError) naming the array, block, head and token; records that do not fit
raise ArenaFullError(needed=...). Either way nothing is committed: `used` is still valid (bytes past it
may have been written). `job = start_blocks_device(...)` is the same launch without the wait: the
readback lands in pinned host memory behind it on the stream, and `job.result()` waits, returning (new_used, host offsets) or raising (the cache compresses a decode
step's blocks this way while the next steps run). `max_record_bytes(params, H, D)` bounds one record, to size an arena beforehand.
`BlockEncoder(params, H, D)` is the same with the compiled kernel and scratch kept (encode_blocks_device
caches one per configuration). The first call of a configuration compiles the kernel (~20-40 s).
Diagnostics: `BlockEncoder(..., profile=True)` builds the kernel with per-phase clock64 sums (thread 0 of
each CTA, one global atomic per phase and tile; the plain build has none of it), read by
`phase_cycles()` after a launch (`python3 bench/encoder.py --profile` prints them for the 8B 128K batch).

Method. One launch does everything. Each CTA (persistent grid, tiles taken from an atomic counter in
block order) takes one block (one record) at a time:

1. quantize: lane groups per (unit, token) read the unit's fp16 values as 8-byte words into registers
   (16 loads in flight per lane), reduce min/max, compute step/offset (fp32, no FMA, integer round-up to
   fp16, fp32 magic-number rint), and write the integer levels to a level matrix LV (shared memory when
   it fits, else per-CTA global scratch), token-major, 8 (or 4) levels per int64 word (SWAR lanes of 8
   bits when every block's rel >= ~1/126, else 16); NaN/inf is detected here and reported after the launch.
   The min/max works on fp16 pairs: per 8-byte word one NaN/inf test of its 4 exponent fields (SWAR)
   and min/max.f16x2 of its halves (2 fused VHMNMX per word; the token's code, for the error, is only
   computed in the rare branch), converting only the final pairs to fp32; the levels convert each value
   with one cvt.f32.f16 and keep levels and a chunk's sums in 32 bits. SASS (8B shape, sm_90): the
   min/max's ~15 instructions per value (a branch, a conversion by shift and multiply, two FMNMX, and
   per word the 64-bit NaN codes) became ~2.5 (~20 a word pair: the exponent tests, a branch, 4 VHMNMX)
   plus the unchanged chunk selection; the levels pass, led by the IEEE division (~9 per value), lost
   its 64-bit level arithmetic (~4 per value). Measured: quantize 47.7 -> 35.1 ms at the 8B 128K prefill.
   Then x / step became x r plus one FMA correction (r = 1 / step, once per token; quotient(): the
   same bits as the division for every fp16 x and step, checked exhaustively) and rint's second FADD
   and F2I an integer subtraction: per value 6 instructions (cvt, FMUL, 2 FFMA, FADD, IADD) instead
   of ~16 (MUFU.RCP, 5 FFMA, FCHK and its branch, 2 FADD, F2I, IADD; SASS, 8B shape), among them
   two quarter-rate ones (MUFU.RCP, F2I: ~16k cycles a block on their pipe). Both passes over a
   lane's 8 chunks are written out: as loops they compiled to a chain of compares and moves per chunk
   picking its registers (~25 instructions a chunk and pass, about the levels' own arithmetic for 8
   values); quantize's SASS grew from ~6.6k to ~7.9k static instructions. Measured then (H100,
   profile build): quantize 124.9k cycles a block, ~4x what its ~2k instructions a warp and token (4
   tokens a warp, 4 warps a scheduler: ~32k issue cycles) need. Its hot path was interleaved with
   rarely taken code, each piece a branch region the scheduler cannot interleave across: per level
   pair a range check (branch, 64-bit clamps, an atomic), per chunk the NaN code (a division
   call), per chunk load an int64 division's call path (head dims not a power of 2). Now the levels
   are clamped unconditionally with int32 min/max (the identity in range) and tested once a chunk;
   NaN/inf only sets bits in the first pass, and one reloading loop (bad_chunks_code) names the word
   in the rare case; divmod_p2 divides in 32 bits. SASS (8B shape): quantize 7.8k -> 6.0k static
   instructions; a levels chunk's code 210 -> 125 laid out (executed ~110 -> 125: the clamps' 4
   VIMNMX a pair now run, the branch regions are gone), a min/max chunk's 122 -> 21 laid out
   (executed ~20 either way). Measured (below, encoder_round5.json): quantize 35.0 -> 33.2 ms.
2. repack: none, sort (rank by level sum), or greedy: per pack a seed (rounded mean, integer dots
   (DP4A on 8-bit lanes), float64 cosine, lowest index on ties; mean and scores CTA-wide), then
   pack-1 picks of the candidate with the least cost[t] = sum_c width(max(hi,q)-min(lo,q)), lowest
   token on ties. The picks run warp-synchronously, one CTA barrier per pick: NWU = NW / n_units
   warps per unit (16 for one unit at 512 threads; units beyond NW / NWU take later rounds of the
   same pack). Warp r of a unit takes the slice [r*n/NWU, (r+1)*n/NWU) of the unit's remaining
   tokens (ascending) as its candidates (a private copy, CAND, from which the warp removes its own
   picks); lane groups of G = min(32, row words) lanes take one candidate each, a lane holds the
   pack's lo/hi of its WPL words (sub, sub + G, ...) in registers as 32-bit halves and costs each
   on 32-bit SWAR words (the integer ALU's width): per-lane max/min by q + 0x80.. - hi (a lane's top
   bit says q >= hi), a PRMT that spreads that bit over the lane and a select; widths by smearing
   bits and one POPC; when every level fits half a lane (levels <= 15 at 8 bits, the default
   bounds' <= 11) two words' ranges share one word first. 21 instructions per 8 levels, from 51
   with int64 SWAR (SASS, 8B shape). The group sums (REDUX at G = 32), and the warp keeps the least
   (cost << 32 | token << 12 | slice index) key. With G = 32 (rows of 32 words or more) the warp
   picks lazily: STALE keeps each candidate's cost at its last evaluation in the pack, a lower bound
   of its cost now (lo/hi only grow); the warp evaluates its least stale key (two REDUX.MIN) while
   that is below its bound, the least of its own keys and BEST, the unit's least key of the pick so
   far, which every evaluation atomicMin's (the atomic returns it: the other warps' evaluations
   tighten the bound as they land; exact: the others cannot win). In a NumPy model of the 8B
   shape's synthetic KV (8 blocks) that evaluates 55% of the (pick, candidate) pairs at 16 warps per
   unit, from 72% with each warp's own best as its bound. After a __syncthreads the unit's BEST is
   the winner (double-buffered by pick: warp 0 resets the next pick's during a pick); the owner
   drops the pick from its slice, and the pack's lo/hi grow once, in a shared copy (the unit's
   threads a word each), a second __syncthreads, then every warp reloads its registers from it:
   before, each of the 16 warps grew all 256 words of its own copy, ~20% of the picks' instructions
   with the 32-bit SWAR. At the pack's end each warp writes its slice's remaining tokens back to
   REM at the slice start minus the picks of the earlier slices (tokens below its first one): REM
   stays ascending. Barriers per pack: 2 for the seed, 2 per pick (1 for the last), 1 at the end.
   Measured (H100, below, git bd6c614): repack 165 ms at the 8B shape's 128K prefill with int64 SWAR
   and each warp's own bound, from 276 ms with the CTA-wide design. Counted from that build's SASS
   (/work/notes/encoder_study.md): ~1.05M warp instructions per block, ~0.40 issued per scheduler
   per cycle, near the integer pipe's 0.5: issue-bound. This build (32-bit SWAR, the CTA-wide
   bound, REDUX, one shared lo/hi, DP4A seeds): ~0.42M estimated (its SASS per step times the
   model's evaluation counts), with a larger share on the FMA pipe (IMAD, VIADD); measured: repack
   91.2 ms (below).
   Token-head at the 8B shape (8 units of 32 words): 2 warps per unit, one word per lane, and the
   level matrix fits in shared memory; SmolLM2 token-head (rows of 16 words): 2 candidates per warp
   at a time, no lazy skip;
3. pack statistics (min and width per pack of P tokens x 1 channel: a thread per LV word and pack
   row, its LPW entries stored by a running 32-bit index), then a warp per section: the section's
   sizes and, by a running warp scan over its packs, each pack's payload offset; after one barrier
   warp 0 scans the sections' sizes into their starts and the record size. Before: the payload
   offsets by a CTA-wide scan (each thread 16 consecutive packs: 16-way shared bank conflicts, 3
   barriers, an int64 division call) and the section starts by one thread in int64 (SASS, 8B shape:
   4455 static instructions for the phase, now 1887). Measured: ~19 ms -> 5.7-9.2 ms (below);
4. the tile publishes its record size; decoupled look-back over the tiles' record sizes gives a
   record's arena offset (a single-pass prefix sum: no second launch, no host round trip), one tile
   later: the record is written to the CTA's global scratch (REC, a record bound per CTA: 18 MB
   at the 8B shape, L2-resident) and copied to the arena (4 independent 32-bit loads a thread in
   flight) when the CTA has finished its next tile's statistics. Before, the look-back came right
   after publishing, while predecessors whose greedy took longer were still running: with the write
   off it measured 17.6 ms at the 8B 128K prefill with the greedy, 0.8 ms with repack none (equal
   block times). The deferred copy costs a read and write of the compressed bytes (~2 GiB there,
   mostly L2) and one barrier a tile. Measured: look-back 2.3-3.7 ms (below);
5. write (into REC): every 32-bit word of the headers, steps and bit streams is assembled by one
   thread and stored coalesced; the payload section by section: a thread per pack gathers its P levels, VCH
   (4 at 8-bit lanes) per chunk with the loads independent, into a bit accumulator and ORs each
   filled 32-bit word into the section's payload staged in shared memory (atomics: a word can hold
   several packs' bits; R * D * P * (E - 1) / 32 words, 7 KiB at the 8B shape; in the CTA's global
   scratch, with the pack tables, when those do not fit), then after a barrier the staged words are
   stored coalesced and zeroed. Before (encoder_repack2.json: write
   58.7 ms at the 8B 128K prefill) one thread per payload word found its packs by a binary search
   over their byte offsets and assembled the word value by value: ~750 SASS instructions a word,
   their loads in dependent chains (9 search steps, then per value two dependent LDS), with 16 warps
   per SM, and lanes of a warp diverging (each its own number of packs and values). Now ~380
   instructions a pack of 16 (SASS, 8B shape): ~3.1M thread instructions a block instead of ~6.2M
   (8.3k payload words), 4 loads in flight per chunk, no divergence but the packs' widths, 2
   barriers per section (32 per block). Measured: write 58.7 -> 25.2 ms at the 8B 128K prefill (below).
   Now two staging buffers (14 KiB at the 8B shape; shared memory 221.5 of 227 KiB) that sections
   alternate: the barrier after a section's staging also ends the previous section's store and
   zeroing, so one barrier a section (16 per block instead of 32). A pack's levels are now loaded in
   rounds of 4 chunks (a whole pack of 16 at 8-bit lanes: 16 token and 16 level loads in flight) before
   any chunk is ORed in: the staging atomics may alias the shared loads (one array), so each load after
   an atomic waited for it, and the chunks' loads ran as 4 dependent rounds a pack; the chunks' level
   arithmetic in 32 bits (SASS, 8B shape: a pack of 16's chunks 342 -> 266 instructions, besides its
   ~70 of setup). Measured: write (with the copy) 25.6 -> 27.0 ms, within the runs' noise (below).

Speed (bench/results/encoder_round5.json, H100, `python3 bench/encoder.py --reps 5 --breakdown --out
encoder_round5.json`, git 4d1c7f9 = this encoder): Llama-3.1-8B 128K-token prefill (65536 blocks, 16 GiB
of K+V) in 0.162 s with the greedy (105.8 GB/s: issue 4's 100 GB/s; under 2% of the prefill's
matmul-bound time), 0.073 s with none (236.1 GB/s), sort 235.4 GB/s; token-head greedy 61.3 GB/s; 8K
prefill 89.6 GB/s. The breakdown (differences of partial runs): quantize 33.2 ms, repack 90.7, statistics
9.2, look-back 2.3, write (with the copy) 27.0. A profile build (`--profile`, 7d3df4e) put the repack at 58%
of the cycles, quantize 20%, write 15%. The same machine kind measured the round-4 tree (35950d0) at 103.0 GB/s
(encoder_round4.json) and, on other days' machines, 102.3 and 100.8.
Before: encoder_round3.json (git 1391702): 0.175 s (98.3 GB/s), quantize 35.1 ms, repack 93.2, pack statistics
and look-back (split noisily) 19.4 and 17.6.
Before: encoder_round2.json (git 067868a, quantize with a per-value NaN branch and 64-bit levels): 0.186 s
(91.2 GB/s), quantize 47.7 ms.
Before: encoder_repack2.json (git 7b17898, the payload written a thread per word with a binary search over
the packs' offsets): 0.218 s (77.3 GB/s), write 58.7 ms.
Before (encoder.json, git bd6c614: int64 SWAR, each warp's own lazy bound, 16 copies of lo/hi): 0.297 s
(57.9 GB/s), repack 164.8 ms, write 66.7. The greedy before that (CTA-wide phases per pick, costs kept per
token and updated by change lists; git 5ba9b04) took 0.41 s (42.3 GB/s), repack 276 ms.

Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba.cuda is imported) the same
kernel runs on the CPU; warp shuffles and reductions, which the simulator lacks, go through a per-warp
barrier there, and the inline PTX (PRMT, REDUX, DP4A, min/max.f16x2, cvt.f32.f16) through pure-Python
twins.

Attempts that lost (measured or estimated, then removed):
- the CTA-wide greedy above (per pick: full cost evaluations by lane groups over (candidate, segment)
  classes, or incremental updates over per-unit lists of the channels the last pick changed; ~2
  barriers, an argmin in every warp and shared atomics per pick): 276 ms of repack at the 8B shape.
- incremental costs with lanes over candidates, or at SWAR-word granularity (~46% of the words change
  per pick on the 8B shape's KV): no gain over the change lists.
- lazy greedy over the whole candidate set (stale costs as lower bounds, evaluate candidates in bound
  order until the best exact cost beats every bound): ~31% of the evaluations in a NumPy model, but
  needs a sorted candidate order per pick and serial rounds in the CTA-wide design; the warp
  picks use the per-warp form with a CTA-wide bound (BEST): 55% at the 8B shape, where the
  whole-set form needs 44% in this build's model.
- skipping changed channels whose width function over q in [0, Lmax] is unchanged: 2% of them.
"""
from __future__ import annotations

import math
import os

import numpy as np

from packkv import codec

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"

from numba import cuda  # noqa: E402  (after reading the simulator switch)
from numba import float64 as nb_float64, int32 as nb_int32, int64 as nb_int64, uint32 as nb_uint32  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Layout of the small int64 meta array (runtime dimensions and region offsets) and of the work array
# ----------------------------------------------------------------------------------------------------

_META_FIELDS = (
    "n_blocks", "H", "T", "D", "P", "R", "layer", "repack", "n_units", "CU", "WK", "WU", "W", "n_sec",
    "GSQ", "GS", "NWU", "UPR", "used0", "cap", "scr64", "dq_shift", "d_shift", "mode", "SW",
    # region offsets in bytes: in shared memory, or in the CTA's global scratch for LV / PACK*
    "o_lv", "o_pinfo", "o_poff", "o_mw", "o_nrm", "o_key", "o_score", "o_stepk", "o_stepv", "o_offk",
    "o_offv", "o_order", "o_rem", "o_cand", "o_stale", "o_best", "o_box", "o_seci", "o_toki", "o_misc",
    "o_stage", "o_rec",
)
M = {name: i for i, name in enumerate(_META_FIELDS)}
SECI_FIELDS = 8   # per section: WB, MB, min_base, payload bytes, start, payload start, -, -
TOKI_FIELDS = 8   # per unit: k_base, v_base, k_bits, v_bits, start, -, -, -
MISC_FIELDS = 8   # tile, bad, base, size, skip, -, -, -
# work array (int64): [0] end offset of the last record, [1] first NaN code, [2] arena overflow,
# [3] internal error, [4] tile counter, then one look-back status word per block
W_END, W_NAN, W_OVER, W_INTERNAL, W_TILE, W_PROF, W_STATUS = 0, 1, 2, 3, 4, 8, 16
# profile builds (BlockEncoder(profile=True), diagnostics only): work[W_PROF + i] sums, over the CTAs, the
# clock64 cycles thread 0 spent in phase i of its tiles (until the barrier that ends the phase; the
# statistics until warp 0 has the record size)
PROF_PHASES = ("tile fetch", "quantize", "repack", "statistics", "publish + look-back", "copy", "write")
# the launch's bounds (float32), BSTRIDE per block: rel_k, rel_v, sink rel_k, sink rel_v, n_sink (its first n_sink
# tokens at the sink bounds), unused
BSTRIDE = 6
NO_NAN = np.int64(2 ** 62)
FLAG_AGG = np.int64(1 << 60)
FLAG_PRE = np.int64(2 << 60)
VAL_MASK = np.int64((1 << 60) - 1)


def _s64(x: int) -> np.int64:
    """A 64-bit pattern as a signed int64 constant (Numba and the simulator both type it int64)."""
    x &= (1 << 64) - 1
    return np.int64(x - (1 << 64) if x >= (1 << 63) else x)


def _lanes(E: int, bits) -> np.int64:
    """An int64 with the given bit pattern repeated in every E-bit lane."""
    return _s64(sum(bits << (E * i) for i in range(64 // E)))


# ----------------------------------------------------------------------------------------------------
# Warp intrinsics. Numba's CUDA simulator has no shuffles: there, a warp exchanges values through a
# per-warp table and a 32-thread barrier (every call site is reached by all 32 lanes of a warp).
# ----------------------------------------------------------------------------------------------------

if SIMULATOR:
    import threading

    _warp_lock = threading.Lock()
    _warp_state: dict = {}

    def _warp():
        me = threading.current_thread()
        key = (id(me._manager), tuple(me.blockIdx), me.thread_id // 32)
        with _warp_lock:
            if key not in _warp_state:
                _warp_state[key] = (threading.Barrier(32, timeout=120), [None] * 32)
        barrier, table = _warp_state[key]
        return barrier, table, me.thread_id % 32

    def shfl_xor(v, off):
        barrier, table, lane = _warp()
        table[lane] = v
        barrier.wait()
        out = table[lane ^ int(off)]
        barrier.wait()
        return out

    def shfl_up(v, off):
        barrier, table, lane = _warp()
        table[lane] = v
        barrier.wait()
        out = table[lane - int(off)] if lane >= off else v
        barrier.wait()
        return out

    def shfl_idx(v, src):
        barrier, table, lane = _warp()
        table[lane] = v
        barrier.wait()
        out = table[int(src)]
        barrier.wait()
        return out

    def syncwarp():
        barrier, _, _ = _warp()
        barrier.wait()

    def backoff():
        pass
else:
    @cuda.jit(device=True)
    def shfl_xor(v, off):
        return cuda.shfl_xor_sync(0xFFFFFFFF, v, off)

    @cuda.jit(device=True)
    def shfl_up(v, off):
        return cuda.shfl_up_sync(0xFFFFFFFF, v, off)

    @cuda.jit(device=True)
    def shfl_idx(v, src):
        return cuda.shfl_sync(0xFFFFFFFF, v, src)

    @cuda.jit(device=True)
    def syncwarp():
        cuda.syncwarp(0xFFFFFFFF)

    @cuda.jit(device=True)
    def backoff():
        cuda.nanosleep(np.uint32(256))


# ----------------------------------------------------------------------------------------------------
# PTX the compiler does not emit from Python (inline PTX, as numba-cuda's own cache hints), each with
# the pure-Python twin the simulator runs (and tests/test_encoder.py checks the PTX against on a GPU):
# - sign_lanes(x, E): each E-bit lane of a 32-bit word all ones where its top bit is set, else zero:
#   one PRMT with sign-replicating selectors (libdevice's __nv_byte_perm masks the selector's sign bits
#   away, so it cannot do this);
# - redux_add / redux_min: a warp's sum / least of an unsigned 32-bit value (REDUX, sm_80+), every lane;
# - dot4(a, b, c): c + the dot product of a's and b's 4 unsigned bytes (DP4A);
# - hmin2 / hmax2(a, b): lane-wise min / max of two words of two fp16 values each (HMNMX2, sm_80+; the
#   quantize's ranges, on finite values: a word with NaN/inf is refused before its min/max counts);
# - half_lo / half_hi(x): the float32 bits of x's low / high fp16 half (one conversion, exact).
# ----------------------------------------------------------------------------------------------------

_U32 = (1 << 32) - 1
_SIGN_SELECTOR = {8: 0xBA98, 16: 0xBB99}   # result byte i <- sign of byte i (8-bit lanes) / of its lane's top byte


def sign_lanes_reference(x, E: int) -> int:
    x = int(x) & _U32
    lane = (1 << E) - 1
    return sum(lane << s for s in range(0, 32, E) if (x >> (s + E - 1)) & 1)


def dot4_reference(a, b, c) -> int:
    a, b = int(a) & _U32, int(b) & _U32
    return (int(c) + sum(((a >> s) & 0xFF) * ((b >> s) & 0xFF) for s in range(0, 32, 8))) & _U32


def _halves(x) -> np.ndarray:
    return np.array([int(x) & 0xFFFF, (int(x) >> 16) & 0xFFFF], np.uint16).view(np.float16)


def _pack_halves(h) -> int:
    b = np.asarray(h, np.float16).view(np.uint16)
    return int(b[0]) | int(b[1]) << 16


def hmin2_reference(a, b) -> int:
    return _pack_halves(np.minimum(_halves(a), _halves(b)))


def hmax2_reference(a, b) -> int:
    return _pack_halves(np.maximum(_halves(a), _halves(b)))


def half_f32_reference(x, hi: bool) -> int:
    return int(np.float32(_halves(x)[int(hi)]).view(np.uint32))


if SIMULATOR:
    def _sign_lanes(E):
        def sign_lanes(x):
            return np.uint32(sign_lanes_reference(x, E))
        return sign_lanes

    def _warp_reduce(v, op):
        barrier, table, lane = _warp()
        table[lane] = int(v) & _U32
        barrier.wait()
        out = op(table)
        barrier.wait()
        return np.uint32(out)

    def redux_add(v):
        return _warp_reduce(v, lambda t: sum(t) & _U32)

    def redux_min(v):
        return _warp_reduce(v, min)

    def dot4(a, b, c):
        return np.uint32(dot4_reference(a, b, c))

    def hmin2(a, b):
        return np.uint32(hmin2_reference(a, b))

    def hmax2(a, b):
        return np.uint32(hmax2_reference(a, b))

    def half_lo(x):
        return np.uint32(half_f32_reference(x, False))

    def half_hi(x):
        return np.uint32(half_f32_reference(x, True))
else:
    from llvmlite import ir as _ir
    from numba import types as _types
    try:
        from numba.cuda.extending import intrinsic as _intrinsic
    except ImportError:   # numba-cuda releases before numba.cuda.extending: numba's generic intrinsic
        from numba.core.extending import intrinsic as _intrinsic

    def _ptx_u32(text: str, n_args: int, convergent: bool = False):
        """Lowering of a uint32(uint32 x n_args) that is one PTX instruction ($0 the result)."""
        def codegen(context, builder, signature, values):
            i32 = _ir.IntType(32)
            asm = _ir.InlineAsm(_ir.FunctionType(i32, [i32] * n_args), text,
                                ",".join(["=r"] + ["r"] * n_args), side_effect=convergent)
            # a warp-collective instruction must not be moved into divergent code
            return builder.call(asm, values, attrs=("convergent",) if convergent else ())
        return _types.uint32(*([_types.uint32] * n_args)), codegen

    def _sign_lanes(E):
        text = f"prmt.b32 $0, $1, 0, {_SIGN_SELECTOR[E]:#x};"

        @_intrinsic
        def sign_lanes(typingctx, x):
            return _ptx_u32(text, 1)
        return sign_lanes

    @_intrinsic
    def redux_add(typingctx, v):
        return _ptx_u32("redux.sync.add.u32 $0, $1, 0xffffffff;", 1, convergent=True)

    @_intrinsic
    def redux_min(typingctx, v):
        return _ptx_u32("redux.sync.min.u32 $0, $1, 0xffffffff;", 1, convergent=True)

    @_intrinsic
    def dot4(typingctx, a, b, c):
        return _ptx_u32("dp4a.u32.u32 $0, $1, $2, $3;", 3)

    @_intrinsic
    def hmin2(typingctx, a, b):
        return _ptx_u32("min.f16x2 $0, $1, $2;", 2)

    @_intrinsic
    def hmax2(typingctx, a, b):
        return _ptx_u32("max.f16x2 $0, $1, $2;", 2)

    @_intrinsic
    def half_lo(typingctx, x):
        return _ptx_u32("{.reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, l;}", 1)

    @_intrinsic
    def half_hi(typingctx, x):
        return _ptx_u32("{.reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, h;}", 1)

SIGN_LANES = {E: _sign_lanes(E) for E in (8, 16)}

if SIMULATOR:
    def fma32(a, b, c):
        """float32 a * b + c rounded once, as the device's fma.rn.f32 (the simulator's cuda.fma rounds the
        product first). Through float64: the product is exact there (48 bits); the sum is rounded twice,
        which for the encoder's uses (quotient: a residual that fits float32, and a correction that
        quotient_reference finds never lands on a float32 midpoint in float64) gives the same bits."""
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
else:
    @cuda.jit(device=True)
    def fma32(a, b, c):
        return cuda.fma(a, b, c)


def quotient_reference() -> int:
    """How many pairs of fp16 significands (x, s in [1, 2047]) kernel quotient() gets wrong against the
    IEEE division, the sum computed in float64 as the simulator's fma32 (and how many of those sums sit
    on a float32 midpoint, where float64's rounding could differ from one fma's): 0 expected."""
    m = np.arange(1, 2048, dtype=np.float32)
    wrong = 0
    for s in m:
        r = np.float32(1) / s
        y = m * r
        e64 = m.astype(np.float64) - y.astype(np.float64) * np.float64(s)
        e = e64.astype(np.float32)                # the residual: must fit float32 (fma's is exact)
        d = e.astype(np.float64) * np.float64(r) + y.astype(np.float64)
        on_midpoint = (d.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)
        wrong += int(((d.astype(np.float32) != m / s) | on_midpoint | (e.astype(np.float64) != e64)).sum())
    return wrong

# clock64() (profile builds): the SM's cycle counter (volatile inline PTX, not moved across the phases)
if SIMULATOR:
    import time as _time

    def clock64():
        return np.int64(_time.perf_counter_ns())
else:
    @_intrinsic
    def clock64(typingctx):
        def codegen(context, builder, signature, values):
            i64 = _ir.IntType(64)
            asm = _ir.InlineAsm(_ir.FunctionType(i64, []), "mov.u64 $0, %clock64;", "=l", side_effect=True)
            return builder.call(asm, [])
        return _types.int64(), codegen


# ----------------------------------------------------------------------------------------------------
# The kernel (built per lane width E and CTA size; dimensions are runtime values from `meta`)
# ----------------------------------------------------------------------------------------------------

_KERNELS: dict = {}


def _lanes32(E: int, bits: int) -> int:
    """A 32-bit word with the given bit pattern repeated in every E-bit lane."""
    return sum(bits << (E * i) for i in range(32 // E))


def _build_kernel(E: int, NT: int, LV_SH: bool, PK_SH: bool, QCH: int, G: int, WPL: int, EXACT: bool,
                  NARROW: bool, PROF: bool):
    LPW = 64 // E                       # levels per int64 word
    NG = 32 // G                        # greedy: candidates a warp evaluates at once (lane groups of G)
    LM = np.int64((1 << E) - 1)         # lane mask
    LANE_MAX = (1 << (E - 1)) - 1       # SWAR compare needs the lane's top bit clear
    I32_0, I32_LANE_MAX = np.int32(0), np.int32(LANE_MAX)
    # The SWAR arithmetic works on 32-bit words (the integer ALU's width: an int64 add or shift is two
    # instructions). The greedy's widths: a range of up to E - 1 bits is smeared down its lane and the
    # set bits counted; when every level fits half a lane (NARROW: levels <= 15 for E = 8, the default
    # bounds' <= 11), two words' ranges share one word first, each in lanes of CW = E / 2 bits.
    HB32 = np.int64(_lanes32(E, 1 << (E - 1)))
    CW = E // 2 if NARROW else E        # the lanes whose widths are counted
    SMEAR = CW.bit_length() - 1         # smear steps (shifts 1, 2, 4, 8) that fill CW bits
    SM_1, SM_2, SM_4, SM_8 = (np.int64(_lanes32(CW, (1 << max(CW - s, 0)) - 1)) for s in (1, 2, 4, 8))
    sign_lanes = SIGN_LANES[E]
    EVEN = np.int64(_lanes32(2 * E, (1 << E) - 1))   # the even lanes of a 32-bit word, in lanes of 2E bits
    MEAN_CHUNK = 65535 // LANE_MAX if E == 8 else 1 << 13   # tokens summed before a 16-bit lane could overflow
    HALVES = 2 * WPL                    # 32-bit words of a unit's row per lane (greedy's lo/hi registers)
    LOW32 = np.int64(0xFFFFFFFF)
    NW = NT // 32
    FULL = 0xFFFFFFFF
    E_ = np.int64(E)
    LPW_ = np.int64(LPW)
    HLPW = np.int64(LPW // 2)           # levels per 32-bit half of an LV word
    VCH = 32 // E                       # write: values per chunk, VCH * (E - 1) < 32 bits (P is a multiple)
    LM32 = np.int32((1 << E) - 1)
    F_65504 = np.float32(65504.0)
    F_32767 = np.float32(32767.0)
    F_2P24 = np.float32(2.0 ** 24)
    F_2M24 = np.float32(2.0 ** -24)
    F_2M14 = np.float32(2.0 ** -14)
    I_BIG = np.int64(1 << 40)
    KEY_BIG = np.int64(1 << 62)
    F_MAGIC = np.float32(1.5 * 2.0 ** 23)
    I_MAGIC = np.int32(F_MAGIC.view(np.int32))
    # quantize's NaN/inf test, unsigned: the top lane's carry goes into bit 63, and numba adds int64 with
    # LLVM's nsw (no signed wrap), under which that carry cannot happen, so the compiled test of the top
    # lane (channels 3 mod 4) folded to false: NaN there went unseen (the simulator, in Python, saw it)
    EXP4 = np.uint64(_lanes(16, 0x7C00).view(np.uint64))     # the exponent fields of a word's 4 fp16 values,
    EXP4_LSB = np.uint64(_lanes(16, 0x0400).view(np.uint64)) # their lowest bits,
    SIGN4 = np.uint64(_lanes(16, 0x8000).view(np.uint64))    # and sign bits
    H2_MAX = np.uint32(0x7BFF7BFF)      # fp16 pairs (65504, 65504) and (-65504, -65504)
    H2_MIN = np.uint32(0xFBFFFBFF)

    @cuda.jit(device=True)
    def lanes_max(a, b):
        """Lane-wise max of two 32-bit words of E-bit lanes (top bits clear): a + HB - b has a lane's top
        bit set where a >= b (no borrow crosses a lane); PRMT spreads it over the lane; select."""
        m = np.int64(sign_lanes((a + HB32 - b) & LOW32))
        return b ^ ((a ^ b) & m)

    @cuda.jit(device=True)
    def lanes_min(a, b):
        m = np.int64(sign_lanes((a + HB32 - b) & LOW32))
        return a ^ ((a ^ b) & m)

    @cuda.jit(device=True)
    def width_sum(r):
        """Sum over the CW-bit lanes of a 32-bit word of bit_length(lane): smear each lane's top bit
        down, count the bits."""
        r |= (r >> 1) & SM_1
        if SMEAR >= 2:
            r |= (r >> 2) & SM_2
        if SMEAR >= 3:
            r |= (r >> 4) & SM_4
        if SMEAR >= 4:
            r |= (r >> 8) & SM_8
        return np.int64(cuda.popc(np.uint32(r)))

    @cuda.jit(device=True)
    def width(x):
        """bit_length of 0 <= x < 2**31."""
        return np.int64(32 - cuda.clz(np.int32(x)))

    @cuda.jit(device=True)
    def grp_sum(v, gs):
        """Sum over aligned groups of gs lanes (gs a power of two <= 32, the same in the whole warp)."""
        if gs > 16:
            v += shfl_xor(v, 16)
        if gs > 8:
            v += shfl_xor(v, 8)
        if gs > 4:
            v += shfl_xor(v, 4)
        if gs > 2:
            v += shfl_xor(v, 2)
        if gs > 1:
            v += shfl_xor(v, 1)
        return v

    @cuda.jit(device=True)
    def grp_min(v, gs):
        if gs > 16:
            v = min(v, shfl_xor(v, 16))
        if gs > 8:
            v = min(v, shfl_xor(v, 8))
        if gs > 4:
            v = min(v, shfl_xor(v, 4))
        if gs > 2:
            v = min(v, shfl_xor(v, 2))
        if gs > 1:
            v = min(v, shfl_xor(v, 1))
        return v

    @cuda.jit(device=True)
    def grp_max(v, gs):
        if gs > 16:
            v = max(v, shfl_xor(v, 16))
        if gs > 8:
            v = max(v, shfl_xor(v, 8))
        if gs > 4:
            v = max(v, shfl_xor(v, 4))
        if gs > 2:
            v = max(v, shfl_xor(v, 2))
        if gs > 1:
            v = max(v, shfl_xor(v, 1))
        return v

    @cuda.jit(device=True)
    def udiv(x, d):
        """x // d for 0 <= x < 2**32 and 0 < d < 2**32 (bit positions in a record, field widths): a
        32-bit division, not the int64 subroutine call that `//` on int64 compiles to."""
        return np.int64(np.uint32(x) // np.uint32(d))

    @cuda.jit(device=True)
    def divmod_p2(x, d, sh):
        """(x // d, x % d) for 0 <= x < 2**32 (chunk and pack indices), by shifts when d = 2**sh (sh >=
        0), else by udiv: int64 `//` inlined a 32-bit path and a call of the 64-bit subroutine at each
        of quantize's ~33 chunk loads (~100 instructions each, cold at power-of-2 head dims but laid out
        between the hot ones)."""
        if sh >= 0:
            return x >> sh, x & (d - 1)
        q = udiv(x, d)
        return q, x - q * d

    @cuda.jit(device=True)
    def rint32(y):
        """rint of a float32 |y| < 2**22: adding 1.5 * 2**23 rounds to an integer (half to even) and
        leaves the sum in [2**23, 2**24), where its bits minus the constant's are that integer: one
        FADD and an integer subtraction (merged with the caller's), not a second FADD and an F2I
        (a quarter-rate conversion; once per quantized value)."""
        return np.int32((y + F_MAGIC).view(np.int32) - I_MAGIC)

    @cuda.jit(device=True)
    def quotient(x, s, r):
        """x / s in float32, correctly rounded (the IEEE division's result), from r = 1 / s correctly
        rounded: y = x r, then one Markstein correction y + r (x - y s), the residual exact by FMA; 3
        instructions instead of the division's ~9 and its range check. For fp16 values x and steps s
        (finite, s >= 2**-24) the result equals x / s: quotient_reference checks every pair of 11-bit
        significands (exponents only scale, no intermediate leaves fp32's normal range)."""
        y = x * r
        return fma32(fma32(-y, s, x), r, y)

    @cuda.jit(device=True)
    def quant_step(lo, hi, rel):
        """docs/FORMAT.md section 1: step (float32, an fp16 value) of a token with range [lo, hi]."""
        amax = hi
        if -lo > amax:
            amax = -lo
        s = (hi - lo) * rel
        if s == 0:
            s = amax
        g = amax / F_32767
        if g > s:
            s = g
        if s > F_65504:
            s = F_65504
        if s < F_2M14:
            n = np.int64(math.ceil(s * F_2P24))
            if n < 1:
                n = 1
            return np.float32(n) * F_2M24
        b = np.int64(s.view(np.int32))
        b = (b + 0x1FFF) & ~np.int64(0x1FFF)
        return np.int32(b).view(np.float32)

    @cuda.jit(device=True)
    def step_bits16(step):
        """The fp16 bit pattern of a float32 that is exactly an fp16 value >= 2**-24."""
        if step < F_2M14:
            return np.int64(step * F_2P24)
        b = np.int64(step.view(np.int32))
        return (b >> 13) - (112 << 10)

    # meta indices (compile-time constants)
    iN, iH, iT, iD, iP, iR, iLAYER, iREPACK, iNU, iCU, iWK, iWU, iW, iNSEC = (M[k] for k in (
        "n_blocks", "H", "T", "D", "P", "R", "layer", "repack", "n_units", "CU", "WK", "WU", "W", "n_sec"))
    iGSQ, iGS, iNWU, iUPR, iUSED, iCAP, iSCR = (M[k] for k in ("GSQ", "GS", "NWU", "UPR", "used0", "cap",
                                                              "scr64"))
    iDQSH, iDSH, iMODE, iSW, oSTG, oREC = (M[k] for k in ("dq_shift", "d_shift", "mode", "SW", "o_stage", "o_rec"))
    oLV, oPI, oPO, oMW, oNRM, oKEY, oSC, oSK, oSV, oOK, oOV, oOR, oRM, oCD, oST, oBE, oBX, oSE, oTK, oMI = (
        M[k] for k in ("o_lv", "o_pinfo", "o_poff", "o_mw", "o_nrm", "o_key", "o_score", "o_stepk",
                       "o_stepv", "o_offk", "o_offv", "o_order", "o_rem", "o_cand", "o_stale", "o_best",
                       "o_box", "o_seci", "o_toki", "o_misc"))

    # ------------------------------------------------------------------------------------------
    # 1. quantize: LV rows (token-major, unit-major words), per-token steps/offsets, sums, norms
    # ------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def load_chunk(X, b, H, T, t, DQ, dqsh, layer, u, j, NCH):
        """8-byte word j (4 fp16 channels) of token t's unit u, or 0 past the unit's end."""
        if j >= NCH:
            return np.int64(0)
        h = u
        wd = j
        if layer:
            h, wd = divmod_p2(j, DQ, dqsh)
        return X[np.uint64(((b * H + h) * T + t) * DQ + wd)]

    @cuda.jit(device=True)
    def nonfinite_lanes(x):
        """The sign bit of each fp16 lane of the 8-byte word x whose exponent field is all ones (NaN/inf):
        adding 1 to the field carries into the sign bit. Unsigned: see EXP4."""
        return ((np.uint64(x) & EXP4) + EXP4_LSB) & SIGN4

    @cuda.jit(device=True)
    def load_chunks(K64, V64, b, H, T, t, DQ, dqsh, layer, u, j, GSQ, NCH):
        """A lane's QCH words j, j + GSQ, ... of token t's unit u in K64 and in V64 (QCH 1: the others 0),
        K's and V's in turn, every load issued before any is used; values, not arrays (an array's
        indexing compiled to selects)."""
        z = np.int64(0)
        k0 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j, NCH)
        v0 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j, NCH)
        if QCH != 8:
            return k0, z, z, z, z, z, z, z, v0, z, z, z, z, z, z, z
        k1 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + GSQ, NCH)
        v1 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + GSQ, NCH)
        k2 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + 2 * GSQ, NCH)
        v2 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + 2 * GSQ, NCH)
        k3 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + 3 * GSQ, NCH)
        v3 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + 3 * GSQ, NCH)
        k4 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + 4 * GSQ, NCH)
        v4 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + 4 * GSQ, NCH)
        k5 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + 5 * GSQ, NCH)
        v5 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + 5 * GSQ, NCH)
        k6 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + 6 * GSQ, NCH)
        v6 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + 6 * GSQ, NCH)
        k7 = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, j + 7 * GSQ, NCH)
        v7 = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, j + 7 * GSQ, NCH)
        return k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7

    @cuda.jit(device=True)
    def chunk_minmax(ck, cv, j, NCH, lok2, hik2, lov2, hiv2, bad):
        """Fold 4 K and 4 V fp16 values into the running ranges (fp16 pairs, HMNMX2 on the words'
        halves: 4 instructions a word, fused to 2 VHMNMX); a word with NaN/inf (an exponent field of
        all ones: adding 1 to it carries into the lane's sign bit, one test for 4 values) sets bits of
        bad (bad_chunks_code then names it). Before: a branch, a conversion and two float min/max per
        value, and the codes computed for every word."""
        if j < NCH:
            bad |= nonfinite_lanes(ck) | nonfinite_lanes(cv)
            k_lo = np.uint32(ck & LOW32)
            k_hi = np.uint32((ck >> 32) & LOW32)
            v_lo = np.uint32(cv & LOW32)
            v_hi = np.uint32((cv >> 32) & LOW32)
            lok2 = hmin2(lok2, hmin2(k_lo, k_hi))
            hik2 = hmax2(hik2, hmax2(k_lo, k_hi))
            lov2 = hmin2(lov2, hmin2(v_lo, v_hi))
            hiv2 = hmax2(hiv2, hmax2(v_lo, v_hi))
        return lok2, hik2, lov2, hiv2, bad

    @cuda.jit(device=True)
    def bad_chunks_code(K64, V64, b, H, T, t, u, DQ, dqsh, layer, j, GSQ, NCH, NBHT):
        """The least (array, block, head, token) code of the NaN/inf words among the lane's chunks j,
        j + GSQ, ... (QCH of them), reloaded: the rare path, one copy out of the chunks' straight-line
        code (it was inlined into each of the 8 chunks' tests: ~90 instructions each between the hot
        ones, and a branch region per chunk)."""
        code_min = NO_NAN
        for jc in range(j, min(NCH, j + QCH * GSQ), GSQ):   # (a runtime bound: not unrolled)
            ck = load_chunk(K64, b, H, T, t, DQ, dqsh, layer, u, jc, NCH)
            cv = load_chunk(V64, b, H, T, t, DQ, dqsh, layer, u, jc, NCH)
            bad_k = nonfinite_lanes(ck)
            bad_v = nonfinite_lanes(cv)
            if bad_k | bad_v:
                h = u
                if layer:
                    h, _ = divmod_p2(jc, DQ, dqsh)
                code = (b * H + h) * T + t
                if not bad_k:   # K's codes first: the codec names K before V
                    code += NBHT
                code_min = min(code_min, code)
        return code_min

    @cuda.jit(device=True)
    def pair_min(x2):
        """The smaller of a word's two fp16 values, as float32."""
        return min(half_lo(x2).view(np.float32), half_hi(x2).view(np.float32))

    @cuda.jit(device=True)
    def pair_max(x2):
        return max(half_lo(x2).view(np.float32), half_hi(x2).view(np.float32))

    @cuda.jit(device=True)
    def half_f32(c, i):
        """fp16 value i (0..3, a compile-time constant) of the 8-byte word c, as float32 (one conversion)."""
        w = np.uint32((c >> (32 * (i >> 1))) & LOW32)
        if i & 1:
            return half_hi(w).view(np.float32)
        return half_lo(w).view(np.float32)

    @cuda.jit(device=True)
    def chunk_levels(ck, cv, j, NCH, stk, stv, rk, rv, offk, offv, row, WK, LVA, LV32, work, ssum, ssq):
        """Quantize 4 K and 4 V values (x / step by quotient(): rk, rv the steps' reciprocals) and store
        them as LV lanes; returns the running sums."""
        if j < NCH:
            pk = np.int64(0)
            pv = np.int64(0)
            csum = np.int32(0)   # the chunk's sums in 32 bits (8 levels < 2**15), added once
            csq = np.int32(0)    # (8-bit lanes only: 8 squares of levels < 2**7)
            out = np.int32(0)    # the levels ORed: a bit outside LANE_MAX's says one was out of range
            for i in range(4):
                qk = np.int32(rint32(quotient(half_f32(ck, i), stk, rk)) - offk)
                qv = np.int32(rint32(quotient(half_f32(cv, i), stv, rv)) - offv)
                # clamped unconditionally (2 min/max a level, the identity when in range) and tested
                # once a chunk: a branch a pair made each pair's chain a scheduling region of its own
                # (no interleaving across the chunk's 8 levels) and inlined 32 copies of the rare path
                out = np.int32(out | qk | qv)
                qk = min(max(qk, I32_0), I32_LANE_MAX)   # (int32 bounds: int64 ones cost 8 instructions)
                qv = min(max(qv, I32_0), I32_LANE_MAX)
                csum = np.int32(csum + qk + qv)
                if E == 8:
                    csq = np.int32(csq + qk * qk + qv * qv)
                else:
                    ssq += np.int64(qk) * qk + np.int64(qv) * qv
                pk |= np.int64(qk) << (E_ * i)
                pv |= np.int64(qv) << (E_ * i)
            if out & ~LANE_MAX:   # either below 0 or above LANE_MAX (internal error: reported)
                cuda.atomic.max(work, W_INTERNAL, 1)
            ssum += csum
            ssq += csq
            if E == 8:   # 4 levels = half a word (unsigned indices: no negative-index wraparound code)
                LV32[np.uint64(2 * row + j)] = np.int32(pk)
                LV32[np.uint64(2 * (row + WK) + j)] = np.int32(pv)
            else:
                LVA[np.uint64(row + j)] = pk
                LVA[np.uint64(row + WK + j)] = pv
        return ssum, ssq

    @cuda.jit(device=True)
    def ph_quantize(b, K64, V64, LVA, LV32, lv0, sh64, sh32, meta, work, bounds, tid):
        rel_k = bounds[BSTRIDE * b]      # this block's (rel_k, rel_v), float32
        rel_v = bounds[BSTRIDE * b + 1]
        sink_k = bounds[BSTRIDE * b + 2]  # the bounds of its first n_sink tokens (sink tokens)
        sink_v = bounds[BSTRIDE * b + 3]
        n_sink = np.int64(bounds[BSTRIDE * b + 4])
        n_blocks = meta[iN]
        H = meta[iH]
        T = meta[iT]
        D = meta[iD]
        layer = meta[iLAYER]
        n_units = meta[iNU]
        CU = meta[iCU]
        WK = meta[iWK]
        WU = meta[iWU]
        W = meta[iW]
        GSQ = meta[iGSQ]
        key0 = meta[oKEY] >> 3
        nrm0 = meta[oNRM] >> 3
        sk0 = meta[oSK] >> 2
        sv0 = meta[oSV] >> 2
        ok0 = meta[oOK] >> 2
        ov0 = meta[oOV] >> 2
        mi0 = meta[oMI] >> 3
        DQ = D >> 2
        dqsh = meta[iDQSH]
        NCH = CU >> 2              # 8-byte chunks (4 channels) of a token's unit, per K and per V
        UT = n_units * T
        groups = NT // GSQ
        g = tid // GSQ
        sub = tid % GSQ
        span = GSQ * QCH           # chunks a lane group holds in registers (QCH per lane) at a time
        iters = (UT + groups - 1) // groups
        z = np.int64(0)
        NBHT = n_blocks * H * T   # V's NaN codes follow K's
        for it_k in range(iters):
            it = g + groups * it_k
            valid = it < UT
            u = it // T
            t = it - u * T
            lok2 = H2_MAX   # fp16 pairs: every finite value is within [-65504, 65504]
            hik2 = H2_MIN
            lov2 = H2_MAX
            hiv2 = H2_MIN
            bad_code = NO_NAN
            k0 = k1 = k2 = k3 = k4 = k5 = k6 = k7 = z
            v0 = v1 = v2 = v3 = v4 = v5 = v6 = v7 = z
            nch = z
            if valid:
                nch = NCH
            for j0 in range(0, NCH, span):
                j = j0 + sub
                # every load first (QCH x 2 in flight per lane), then the arithmetic
                k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7 = load_chunks(
                    K64, V64, b, H, T, t, DQ, dqsh, layer, u, j, GSQ, nch)
                # the chunks written out, not a loop: the loop compiled to a chain of selects per chunk
                # (~25 instructions a chunk, picking its registers), as many as the levels' arithmetic
                bad = np.uint64(0)
                lok2, hik2, lov2, hiv2, bad = chunk_minmax(k0, v0, j, nch, lok2, hik2, lov2, hiv2, bad)
                if QCH == 8:
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k1, v1, j + GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k2, v2, j + 2 * GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k3, v3, j + 3 * GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k4, v4, j + 4 * GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k5, v5, j + 5 * GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k6, v6, j + 6 * GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                    lok2, hik2, lov2, hiv2, bad = chunk_minmax(k7, v7, j + 7 * GSQ, nch, lok2, hik2, lov2, hiv2, bad)
                if bad != 0:
                    bad_code = min(bad_code, bad_chunks_code(K64, V64, b, H, T, t, u, DQ, dqsh, layer, j, GSQ, nch,
                                                               NBHT))
            lok = grp_min(pair_min(lok2), GSQ)
            hik = grp_max(pair_max(hik2), GSQ)
            lov = grp_min(pair_min(lov2), GSQ)
            hiv = grp_max(pair_max(hiv2), GSQ)
            bad_code = grp_min(bad_code, GSQ)
            if valid and bad_code < NO_NAN and sub == 0:
                cuda.atomic.min(work, W_NAN, bad_code)
                sh64[mi0 + 1] = 1
            ssum = z
            ssq = z
            stk = np.float32(1)
            stv = np.float32(1)
            rk = np.float32(1)
            rv = np.float32(1)
            offk = np.int32(0)
            offv = np.int32(0)
            if valid and bad_code == NO_NAN:
                if t < n_sink:
                    stk = quant_step(lok, hik, sink_k)
                    stv = quant_step(lov, hiv, sink_v)
                else:
                    stk = quant_step(lok, hik, rel_k)
                    stv = quant_step(lov, hiv, rel_v)
                offk = rint32(lok / stk)
                offv = rint32(lov / stv)
                rk = np.float32(1) / stk   # correctly rounded (IEEE division), once per token
                rv = np.float32(1) / stv
                row = lv0 + t * W + u * WU
                for j0 in range(0, NCH, span):
                    j = j0 + sub
                    if NCH > span:   # the token did not fit in the registers: load this part again
                        k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7 = load_chunks(
                            K64, V64, b, H, T, t, DQ, dqsh, layer, u, j, GSQ, NCH)
                    ssum, ssq = chunk_levels(k0, v0, j, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                             LVA, LV32, work, ssum, ssq)
                    if QCH == 8:   # (written out, as the min/max's)
                        ssum, ssq = chunk_levels(k1, v1, j + GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                        ssum, ssq = chunk_levels(k2, v2, j + 2 * GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                        ssum, ssq = chunk_levels(k3, v3, j + 3 * GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                        ssum, ssq = chunk_levels(k4, v4, j + 4 * GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                        ssum, ssq = chunk_levels(k5, v5, j + 5 * GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                        ssum, ssq = chunk_levels(k6, v6, j + 6 * GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                        ssum, ssq = chunk_levels(k7, v7, j + 7 * GSQ, NCH, stk, stv, rk, rv, offk, offv, row, WK,
                                                 LVA, LV32, work, ssum, ssq)
                if E == 8 and (NCH & 1) != 0 and sub == 0:   # zero the unused half of the last words
                    LV32[2 * (row + WK) - 1] = 0
                    LV32[2 * (row + WU) - 1] = 0
            ssum = grp_sum(ssum, GSQ)
            ssq = grp_sum(ssq, GSQ)
            if valid and sub == 0 and bad_code == NO_NAN:
                sh64[key0 + u * T + t] = ssum
                sh64[nrm0 + u * T + t] = ssq
                sh32[sk0 + u * T + t] = np.int32(step_bits16(stk))
                sh32[sv0 + u * T + t] = np.int32(step_bits16(stv))
                sh32[ok0 + u * T + t] = np.int32(offk)
                sh32[ov0 + u * T + t] = np.int32(offv)

    # ------------------------------------------------------------------------------------------
    # 2. repack
    # ------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def ph_order_simple(sh64, sh32, meta, tid):
        """'none' (and greedy with one pack): identity; 'sort': stable rank by the level sum."""
        T = meta[iT]
        UT = meta[iNU] * T
        key0 = meta[oKEY] >> 3
        or0 = meta[oOR] >> 2
        if meta[iREPACK] == 1:
            for i in range(tid, UT, NT):
                u = i // T
                t = i - u * T
                kt = sh64[key0 + i]
                rank = 0
                for s in range(T):
                    ks = sh64[key0 + u * T + s]
                    if ks < kt or (ks == kt and s < t):
                        rank += 1
                sh32[or0 + u * T + rank] = np.int32(t)
        else:
            for i in range(tid, UT, NT):
                sh32[or0 + i] = np.int32(i % T)

    @cuda.jit(device=True)
    def ph_mean(LV32, lv0, sh32, meta, rb, n_rem, tid):
        """MW = per-channel rounded mean (2*sum + n) // (2n) of the remaining tokens, packed like LV: a
        thread per 32-bit word, whose even and odd lanes it sums in lanes of 2E bits (flushed into
        int64 totals before a lane could overflow)."""
        T = meta[iT]
        WU = meta[iWU]
        W = meta[iW]
        mw0 = meta[oMW] >> 2
        for wi in range(tid, 2 * W, NT):
            u = wi // (2 * WU)
            rowb = 2 * lv0 + wi
            s0 = np.int64(0)
            s1 = np.int64(0)
            s2 = np.int64(0)
            s3 = np.int64(0)
            tb = rb + u * T
            for c0 in range(0, n_rem, MEAN_CHUNK):
                ev = np.int64(0)
                od = np.int64(0)
                for i in range(c0, min(c0 + MEAN_CHUNK, n_rem)):
                    t = np.int64(sh32[np.uint64(tb + i)])
                    w = np.int64(LV32[np.uint64(rowb + 2 * W * t)]) & LOW32
                    ev = (ev + (w & EVEN)) & LOW32        # (32-bit adds: the sums fit)
                    od = (od + ((w >> E_) & EVEN)) & LOW32
                if E == 8:
                    s0 += ev & 0xFFFF
                    s1 += od & 0xFFFF
                    s2 += ev >> 16
                    s3 += od >> 16
                else:
                    s0 += ev
                    s1 += od
            n2 = np.uint32(2 * n_rem)
            mw = np.int64(0)
            for l in range(32 // E):
                if l == 0:
                    acc = s0
                elif l == 1:
                    acc = s1
                elif l == 2:
                    acc = s2
                else:
                    acc = s3
                # < 2**28: a 32-bit division
                mw |= np.int64(np.uint32(2 * acc + n_rem) // n2) << (E_ * l)
            sh32[mw0 + wi] = np.int32(mw)

    @cuda.jit(device=True)
    def ph_scores(LVA, lv0, sh64, sh32, shf, meta, rb, n_rem, tid):
        """SCORE[u][i] = float64(q_t . m) / sqrt(float64(|q_t|^2)) (0 for an all-zero token); with 8-bit
        lanes the products by DP4A, 4 per instruction (levels and means < 128: no sign, no overflow)."""
        T = meta[iT]
        WU = meta[iWU]
        W = meta[iW]
        GS = meta[iGS]
        n_units = meta[iNU]
        mw0 = meta[oMW] >> 3
        nrm0 = meta[oNRM] >> 3
        sc0 = meta[oSC] >> 3
        groups = NT // GS
        g = tid // GS
        sub = tid % GS
        n_items = n_units * n_rem
        iters = (n_items + groups - 1) // groups
        for it_k in range(iters):
            it = g + groups * it_k
            dot = np.int64(0)
            t = np.int64(0)
            u = it // n_rem
            i = it - u * n_rem
            if it < n_items:
                t = sh32[rb + u * T + i]
                rowb = lv0 + t * W
                for wi in range(u * WU + sub, (u + 1) * WU, GS):
                    q = LVA[np.uint64(rowb + wi)]
                    m = sh64[np.uint64(mw0 + wi)]
                    if E == 8:
                        dot += np.int64(dot4(q & LOW32, m & LOW32, dot4((q >> 32) & LOW32, (m >> 32) & LOW32, 0)))
                    else:
                        for l in range(LPW):
                            dot += ((q >> (E_ * l)) & LM) * ((m >> (E_ * l)) & LM)
            dot = grp_sum(dot, GS)
            if it < n_items and sub == 0:
                nrm = sh64[nrm0 + u * T + t]
                sc = 0.0
                if nrm > 0:
                    sc = np.float64(dot) / math.sqrt(np.float64(nrm))
                shf[sc0 + u * T + i] = sc

    @cuda.jit(device=True)
    def word_cost(q, lo, hi, k):
        """Sum over the levels of one int64 LV word q of width(max(hi, q) - min(lo, q)), the pack's lo/hi
        of its two 32-bit halves at lo[2k], lo[2k + 1] (hi likewise)."""
        r0 = lanes_max(q & LOW32, np.int64(hi[2 * k])) - lanes_min(q & LOW32, np.int64(lo[2 * k]))
        r1 = lanes_max(q >> 32 & LOW32, np.int64(hi[2 * k + 1])) - lanes_min(q >> 32 & LOW32, np.int64(lo[2 * k + 1]))
        if NARROW:   # the lanes of r1 into the empty upper halves of r0's (an add: one LEA)
            return width_sum(r0 + (r1 << CW))
        return width_sum(r0) + width_sum(r1)

    @cuda.jit(device=True)
    def words_min(a, b):
        """Lane-wise min of two int64 LV words, by their 32-bit halves."""
        return lanes_min(a & LOW32, b & LOW32) | (lanes_min(a >> 32 & LOW32, b >> 32 & LOW32) << 32)

    @cuda.jit(device=True)
    def words_max(a, b):
        return lanes_max(a & LOW32, b & LOW32) | (lanes_max(a >> 32 & LOW32, b >> 32 & LOW32) << 32)

    @cuda.jit(device=True)
    def warp_seed(sh32, shf, meta, u, n_rem, lane):
        """The seed of unit u (every lane gets it): the position of the largest SCORE among the n_rem
        remaining tokens, lowest position on ties."""
        T = meta[iT]
        sc0 = meta[oSC] >> 3
        bestf = -1.0
        bi = I_BIG
        for i in range(lane, n_rem, 32):
            sc = shf[sc0 + u * T + i]
            if sc > bestf:
                bestf = sc
                bi = i
        for off in (16, 8, 4, 2, 1):
            obf = shfl_xor(bestf, off)
            oi = shfl_xor(bi, off)
            if obf > bestf or (obf == bestf and oi < bi):
                bestf = obf
                bi = oi
        return bi

    @cuda.jit(device=True)
    def cand_cost(LVA, row, WU, lo, hi, sub):
        """A candidate's cost, every lane of its group of G gets it: the lane's words sub, sub + G, ...
        of the row at `row` (all G * WPL of them when EXACT), summed over the group."""
        acc = np.int64(0)
        for k in range(WPL):
            if EXACT or sub + G * k < WU:
                acc += word_cost(LVA[np.uint64(row + G * k)], lo, hi, k)
        if G == 32:
            return np.int64(redux_add(acc))
        return np.int64(grp_sum(np.int32(acc), G))   # 32-bit shuffles

    @cuda.jit(device=True)
    def lane_least(sh32, cb, sb, n_c, lane):
        """The least stale key (STALE << 32 | CAND << 12 | j) of this lane's slots j = lane + 32 i."""
        least = KEY_BIG
        if lane < n_c:      # (slices are rarely longer than a warp: no loop set-up for the first slot)
            least = (np.int64(sh32[np.uint64(sb + lane)]) << 32) | (np.int64(sh32[np.uint64(cb + lane)]) << 12) | lane
        for j in range(lane + 32, n_c, 32):
            least = min(least, (np.int64(sh32[np.uint64(sb + j)]) << 32) | (np.int64(sh32[np.uint64(cb + j)]) << 12) | j)
        return least

    @cuda.jit(device=True)
    def warp_best(LVA, lv0, sh32, sh64, meta, cb, sb, n_c, lo, hi, u, lane, bi):
        """This warp's least key (cost << 32 | t << 12 | j) over the candidates t = CAND[cb + j] it
        evaluates (KEY_BIG if none); each is also atomicMin'ed into BEST = sh64[bi], the unit's least key
        of the pick so far (the winner once every warp of the unit is done).

        G = 32 (rows of 32 words or more): one candidate at a time, lazily. STALE[sb + j] is the
        candidate's cost at its last evaluation in this pack, a lower bound of its cost now (the pack's
        lo/hi only grow), so stale << 32 | t << 12 | j bounds its key from below. The warp evaluates its
        least stale key while that is below its bound, the least of BEST and its own keys (the others
        cannot win: every key is unique); the atomic returns BEST, so the other warps' evaluations
        tighten the bound as they land. An evaluated candidate's stale key is its key, never below the
        bound again: each is evaluated at most once per pick. Each lane keeps the least stale key of its
        slots (j = lane + 32 i) in a register, and only the lane of an evaluated slot recomputes it; the
        warp's least is two REDUX.MIN: its cost, then its t << 12 | j among the lanes of that cost. No
        other lane reads STALE before the pick's barrier. Smaller rows: lane groups of G lanes take a
        candidate each (NG at a time), every candidate evaluated."""
        WU = meta[iWU]
        W = meta[iW]
        base = lv0 + u * WU
        mine = KEY_BIG
        if NG == 1:
            bound = shfl_idx(sh64[bi], 0)
            least = lane_least(sh32, cb, sb, n_c, lane)
            while True:
                c_min = np.int64(redux_min(least >> 32))
                tj = LOW32
                if least >> 32 == c_min:
                    tj = least & LOW32
                f = (c_min << 32) | np.int64(redux_min(tj))
                if f >= bound:
                    break
                j1 = f & 0xFFF
                t = (f & LOW32) >> 12
                key = (cand_cost(LVA, base + t * W + lane, WU, lo, hi, lane) << 32) | (f & LOW32)
                mine = min(mine, key)
                landed = KEY_BIG
                if lane == (j1 & 31):   # the lane that holds slot j1: its stale cost, its least again
                    sh32[np.uint64(sb + j1)] = np.int32(key >> 32)
                    if n_c <= 32:       # slot j1 is its only one
                        least = key
                    else:
                        least = lane_least(sh32, cb, sb, n_c, lane)
                    landed = cuda.atomic.min(sh64, bi, key)
                bound = min(bound, min(key, shfl_idx(landed, j1 & 31)))
            return mine
        g = lane // G
        sub = lane - g * G
        for it in range((n_c + NG - 1) // NG):
            j = it * NG + g
            t = np.int64(0)
            if j < n_c:
                t = np.int64(sh32[cb + j])
            cost = cand_cost(LVA, base + t * W + sub, WU, lo, hi, sub)
            if j < n_c:
                mine = min(mine, (cost << 32) | (t << 12) | j)
        mine = grp_min(mine, 32)
        if lane == 0 and mine < KEY_BIG:
            cuda.atomic.min(sh64, bi, mine)
        return mine

    @cuda.jit(device=True)
    def ph_greedy(LVA, LV32, lv0, sh64, sh32, shf, meta, tid):
        """Per pack: seed (CTA-wide mean and scores), then pack-1 picks, each by NWU warps per unit.

        REM holds each unit's remaining tokens (ascending) at the pack's start; warp r of a unit takes
        the slice [a, b) = [r * n / NWU, (r + 1) * n / NWU) of it as its candidates (CAND, its private
        copy, the picked ones removed by the warp itself), keeps the pack's lo/hi of its lanes' words
        in registers (32-bit halves), and per pick atomicMin's the keys it evaluates into the unit's
        BEST; after a CTA barrier every warp of the unit reads the winner there, the unit's threads
        grow the shared copy of lo/hi (BOX) by it, a word each, and after a second barrier every warp
        reloads its registers from BOX (the last pick of a pack skips the growth and the second
        barrier: the next seed starts over). BEST is double-buffered by pick: during a pick warp 0 resets the next pick's, which
        every warp last read before this pick's barriers. At the pack's end
        each warp writes its slice's remaining tokens back to REM (still ascending). Units beyond
        NW / NWU wait for a later round of the same pack."""
        T = meta[iT]
        P = meta[iP]
        WU = meta[iWU]
        W = meta[iW]
        n_units = meta[iNU]
        NWU = meta[iNWU]
        UPR = meta[iUPR]
        UT = n_units * T
        rm0 = meta[oRM] >> 2
        cd0 = meta[oCD] >> 2
        st0 = meta[oST] >> 2
        be0 = meta[oBE] >> 3
        or0 = meta[oOR] >> 2
        lane = tid & 31
        warp = tid >> 5
        ul = warp // NWU
        r = warp - ul * NWU
        sub = lane % G
        box = (meta[oBX] >> 3) + ul * 2 * WU    # the pack's lo (WU words), then hi, of the unit in slot ul
        lo = cuda.local.array(HALVES, nb_uint32)
        hi = cuda.local.array(HALVES, nb_uint32)
        for i in range(tid, UT, NT):
            sh32[rm0 + i] = np.int32(i % T)
        for i in range(tid, 2 * NW, NT):
            sh64[be0 + i] = KEY_BIG
        cuda.syncthreads()
        par = 0
        n_rem = T
        for start in range(0, T - P, P):
            ph_mean(LV32, lv0, sh32, meta, rm0, n_rem, tid)
            cuda.syncthreads()
            ph_scores(LVA, lv0, sh64, sh32, shf, meta, rm0, n_rem, tid)
            cuda.syncthreads()
            for rnd in range((n_units + UPR - 1) // UPR):
                u = rnd * UPR + ul
                active = ul < UPR and u < n_units
                if not active:
                    u = np.int64(0)
                a = r * n_rem // NWU
                n_c = (r + 1) * n_rem // NWU - a
                rb = rm0 + u * T
                cb = cd0 + u * T + a
                sb = st0 + u * T + a
                t_first = np.int64(0)
                removed_before = np.int64(0)     # picks of this pack in the slices before this one
                if active:
                    ip = warp_seed(sh32, shf, meta, u, n_rem, lane)
                    t = np.int64(sh32[rb + ip])
                    if a < ip + 1 and ip < a + n_c:          # the seed is ours: copy the slice without it
                        for j in range(lane, n_c - 1, 32):
                            sh32[cb + j] = sh32[rb + a + j + (1 if a + j >= ip else 0)]
                        n_c -= 1
                    else:
                        for j in range(lane, n_c, 32):
                            sh32[cb + j] = sh32[rb + a + j]
                    for j in range(lane, n_c, 32):
                        sh32[sb + j] = 0
                    if ip < a:   # the seed was in an earlier slice (once per lane, whatever its share of the slice)
                        removed_before += 1
                    if n_c > 0:
                        t_first = np.int64(sh32[rb + a])
                    row = lv0 + t * W + u * WU
                    for w in range(r * 32 + lane, WU, NWU * 32):   # this warp's share of the unit's box
                        q = LVA[np.uint64(row + w)]
                        sh64[box + w] = q
                        sh64[box + WU + w] = q
                    row += sub
                    for k in range(WPL):
                        q = np.int64(0)
                        if EXACT or sub + G * k < WU:
                            q = LVA[np.uint64(row + G * k)]
                        lo[2 * k] = q & LOW32
                        lo[2 * k + 1] = q >> 32 & LOW32
                        hi[2 * k] = q & LOW32
                        hi[2 * k + 1] = q >> 32 & LOW32
                    if r == 0 and lane == 0:
                        sh32[or0 + u * T + start] = np.int32(t)
                    syncwarp()
                for pos in range(start + 1, start + P):
                    bi = be0 + par * NW + ul
                    mine = KEY_BIG
                    if active:
                        mine = warp_best(LVA, lv0, sh32, sh64, meta, cb, sb, n_c, lo, hi, u, lane, bi)
                    if warp == 0 and lane < UPR:
                        sh64[be0 + (1 - par) * NW + lane] = KEY_BIG
                    cuda.syncthreads()   # BEST is the winner; no lane reads BOX until the next barrier
                    if active:
                        key = sh64[bi]
                        t = (key & LOW32) >> 12
                        if key == mine:                  # ours: remove candidate j from the slice
                            j0 = key & 0xFFF
                            for jb in range(j0, n_c - 1, 32):
                                j = jb + lane
                                v = np.int32(0)
                                c = np.int32(0)
                                if j < n_c - 1:
                                    v = sh32[cb + j + 1]
                                    c = sh32[sb + j + 1]
                                syncwarp()
                                if j < n_c - 1:
                                    sh32[cb + j] = v
                                    sh32[sb + j] = c
                            n_c -= 1
                            syncwarp()
                        elif t < t_first:
                            removed_before += 1
                        if r == 0 and lane == 0:
                            sh32[or0 + u * T + pos] = np.int32(t)
                    if pos < start + P - 1:   # (after the pack's last pick the next seed starts over)
                        if active:
                            row = lv0 + t * W + u * WU
                            for w in range(r * 32 + lane, WU, NWU * 32):   # the box grows by the winner, once
                                q = LVA[np.uint64(row + w)]
                                sh64[box + w] = words_min(sh64[box + w], q)
                                sh64[box + WU + w] = words_max(sh64[box + WU + w], q)
                        cuda.syncthreads()
                        if active:
                            for k in range(WPL):
                                if EXACT or sub + G * k < WU:
                                    lw = sh64[np.uint64(box + sub + G * k)]
                                    hw = sh64[np.uint64(box + WU + sub + G * k)]
                                    lo[2 * k] = lw & LOW32
                                    lo[2 * k + 1] = lw >> 32 & LOW32
                                    hi[2 * k] = hw & LOW32
                                    hi[2 * k + 1] = hw >> 32 & LOW32
                    par = 1 - par
                if active:   # the slice's remaining tokens back to REM (nobody reads REM until the barrier)
                    for j in range(lane, n_c, 32):
                        sh32[rb + a - removed_before + j] = sh32[cb + j]
            cuda.syncthreads()
            n_rem -= P
        for i in range(tid, n_units * P, NT):   # the last pack: the remaining tokens, ascending
            u = i // P
            j = i - u * P
            sh32[or0 + u * T + T - P + j] = sh32[rm0 + u * T + j]

    # ------------------------------------------------------------------------------------------
    # 3. pack statistics, section sizes, pack payload offsets
    # ------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def ph_pack_stats(LVA, lv0, PK, pi0, sh32, meta, tid):
        """PINFO[((2h + kv) * R + r) * D + d] = pack min << 8 | pack width."""
        T = meta[iT]
        D = meta[iD]
        P = meta[iP]
        R = meta[iR]
        layer = meta[iLAYER]
        CU = meta[iCU]
        WK = meta[iWK]
        WU = meta[iWU]
        W = meta[iW]
        or0 = meta[oOR] >> 2
        for it in range(tid, R * W, NT):
            r = udiv(it, W)                  # 32-bit divisions: int64 `//` is a ~70-instruction call
            wi = it - r * W
            u = udiv(wi, WU)
            ob = or0 + u * T + r * P
            q = LVA[np.uint64(lv0 + sh32[ob] * W + wi)]
            mn = q
            mx = q
            for j in range(1, P):
                q = LVA[np.uint64(lv0 + sh32[ob + j] * W + wi)]
                mn = words_min(mn, q)
                mx = words_max(mx, q)
            wj = wi - u * WU
            kv = np.int64(0)
            if wj >= WK:
                kv = np.int64(1)
            c = (wj - kv * WK) * LPW_
            h = u
            d = c
            if layer:
                h = udiv(c, D)
                d = c - h * D
            # the word's levels are channels d, d + 1, ... of head h: PINFO entries idx, idx + 1, ..., but
            # past the head's last channel the next head's section pair, 2 R D - D entries on (layer
            # granularity, D not a multiple of LPW); 32-bit halves of mn / mx, no int64 per level
            idx = np.int32(((2 * h + kv) * R + r) * D + d)   # from pi0
            jump = np.int32((2 * R - 1) * D)
            dd = np.int32(d)
            n_lv = np.int32(min(LPW_, CU - c))
            for l in range(LPW):
                if l < n_lv:
                    lo_l = np.int32((mn >> (E_ * l)) & LM)
                    hi_l = np.int32((mx >> (E_ * l)) & LM)
                    PK[pi0 + idx] = np.int32((lo_l << 8) | width(hi_l - lo_l))
                idx = np.int32(idx + 1)
                dd = np.int32(dd + 1)
                if dd == D:
                    dd = np.int32(0)
                    idx = np.int32(idx + jump)

    @cuda.jit(device=True)
    def warp_incl_scan(v, lane):
        """Inclusive prefix sum of an int32 v over the warp's lanes (every lane of the warp calls it)."""
        for off in (1, 2, 4, 8, 16):
            y = shfl_up(v, off)
            if lane >= off:
                v = np.int32(v + y)   # (Numba widens int32 sums to int64: 32-bit shuffles need the cast)
        return v

    @cuda.jit(device=True)
    def ph_sections(PK, pi0, po0, sh64, sh32, meta, tid):
        """A warp per section: WB, MB, min_base, payload bytes, and POFF[g], each pack's payload byte
        offset in its section (a running warp scan over the section's packs, 32 at a time, in 32-bit:
        a section's payload is < 2**31 bytes); a warp per unit: offset bases and bits. After a barrier
        warp 0 scans the sections' sizes (the units' token sections, then the channel sections) into
        their starts and the record size (publishing it to itself: the look-back is warp 0's).
        Before: a CTA-wide scan over the packs (each thread 16 consecutive ones: 16-way bank conflicts,
        3 barriers, an int64 division call) and the starts by one thread (int64, Python-style %)."""
        T = meta[iT]
        D = meta[iD]
        P = meta[iP]
        R = meta[iR]
        H = meta[iH]
        n_units = meta[iNU]
        n_sec = meta[iNSEC]
        se0 = meta[oSE] >> 2
        tk0 = meta[oTK] >> 2
        ok0 = meta[oOK] >> 2
        ov0 = meta[oOV] >> 2
        mi0 = meta[oMI] >> 3
        lane = tid & 31
        warp = tid >> 5
        RD = R * D
        PB = np.int32(P >> 3)          # payload bytes per bit of a pack's width (P is 8, 16 or 32)
        for s in range(warp, 2 * H, NW):
            g0 = s * RD
            wmax = np.int32(0)
            mnmin = np.int32(1 << 30)
            mnmax = np.int32(0)
            run = np.int32(0)          # the widths of the section's packs before this round
            for i0 in range(0, RD, 32):
                i = i0 + lane
                w = np.int32(0)
                if i < RD:
                    info = PK[pi0 + g0 + i]
                    w = np.int32(info & 0xFF)
                    mnv = np.int32(info >> 8)
                    wmax = max(wmax, w)
                    mnmin = min(mnmin, mnv)
                    mnmax = max(mnmax, mnv)
                incl = warp_incl_scan(w, lane)
                if i < RD:
                    PK[po0 + g0 + i] = np.int32((run + incl - w) * PB)
                run = np.int32(run + shfl_idx(incl, 31))
            wmax = grp_max(wmax, 32)
            mnmin = grp_min(mnmin, 32)
            mnmax = grp_max(mnmax, 32)
            if lane == 0:
                e0 = se0 + s * SECI_FIELDS
                sh32[e0 + 0] = np.int32(width(wmax))
                sh32[e0 + 1] = np.int32(width(mnmax - mnmin))
                sh32[e0 + 2] = mnmin
                sh32[e0 + 3] = np.int32(run * PB)
        for u in range(warp, n_units, NW):
            kmin = np.int32(1 << 30)
            kmax = np.int32(-(1 << 30))
            vmin = np.int32(1 << 30)
            vmax = np.int32(-(1 << 30))
            for t in range(lane, T, 32):
                ok = sh32[ok0 + u * T + t]
                ov = sh32[ov0 + u * T + t]
                kmin = min(kmin, ok)
                kmax = max(kmax, ok)
                vmin = min(vmin, ov)
                vmax = max(vmax, ov)
            kmin = grp_min(kmin, 32)
            kmax = grp_max(kmax, 32)
            vmin = grp_min(vmin, 32)
            vmax = grp_max(vmax, 32)
            if lane == 0:
                e0 = tk0 + u * TOKI_FIELDS
                sh32[e0 + 0] = kmin
                sh32[e0 + 1] = vmin
                sh32[e0 + 2] = np.int32(width(kmax - kmin))
                sh32[e0 + 3] = np.int32(width(vmax - vmin))
        cuda.syncthreads()
        if warp == 0:   # (32-bit: the format's section starts are 32-bit words)
            carry = np.int32(12 + 4 * n_sec)   # the header and section table
            for i0 in range(0, n_sec, 32):
                i = i0 + lane
                size = np.int32(0)
                e0 = tk0 + i * TOKI_FIELDS
                if i < n_units:   # token section: header, steps, K and V offset bit streams, to 4 bytes
                    size = np.int32((8 + 4 * T + ((T * (sh32[e0 + 2] + sh32[e0 + 3])) >> 3) + 3) & ~3)
                elif i < n_sec:   # channel section: header and pack header stream (to 4), payload (to 4)
                    e0 = se0 + (i - n_units) * SECI_FIELDS
                    ps = np.int32((4 + ((RD * (sh32[e0 + 0] + sh32[e0 + 1]) + 7) >> 3) + 3) & ~3)
                    sh32[e0 + 5] = ps
                    size = np.int32(ps + ((sh32[e0 + 3] + 3) & ~3))
                incl = warp_incl_scan(size, lane)
                if i < n_sec:
                    sh32[e0 + 4] = np.int32(carry + incl - size)
                carry = np.int32(carry + shfl_idx(incl, 31))
            if lane == 0:
                sh64[mi0 + 3] = (np.int64(carry) + 15) & ~np.int64(15)
                sh64[mi0 + 5] = carry
            syncwarp()

    # ------------------------------------------------------------------------------------------
    # 4. look-back (warp 0): the record's offset in the arena, one tile later
    # ------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def ph_publish(b, size, work, lane):
        """Warp 0: publish tile b's record size (its inclusive prefix when b == 0)."""
        if lane == 0:
            if b == 0:
                cuda.atomic.add(work, W_STATUS + b, FLAG_PRE | size)
            else:
                cuda.atomic.add(work, W_STATUS + b, FLAG_AGG | size)

    @cuda.jit(device=True)
    def ph_lookback(b, bad, size, sh64, meta, work, offsets, lane):
        """Warp 0, for tile b (published before with this size; bad: no record): sum the predecessors'
        sizes 32 tiles at a time until one that knows its inclusive prefix (decoupled look-back);
        publish the inclusive prefix; the record's arena offset to MISC[2], its skip flag (no record,
        or past the arena's end) to MISC[4]."""
        n_blocks = meta[iN]
        mi0 = meta[oMI] >> 3
        excl = np.int64(0)
        top = b - 1
        if lane == 0 and top >= 0:
            while (cuda.atomic.add(work, W_STATUS + top, 0) >> 60) == 0:
                backoff()
        syncwarp()
        while top >= 0:
            j = top - lane
            st = FLAG_PRE             # before tile 0: nothing
            if j >= 0:
                st = cuda.atomic.add(work, W_STATUS + j, 0)
            flag = st >> 60
            first_pre = np.int64(32)
            if flag == 2:
                first_pre = lane
            first_pre = grp_min(first_pre, 32)
            missing = np.int64(0)
            if flag == 0 and lane < first_pre:
                missing = np.int64(1)
            if grp_max(missing, 32) != 0:         # a tile in the window is not done: read it again
                backoff()
            else:
                val = np.int64(0)
                if lane <= first_pre:
                    val = st & VAL_MASK
                excl += grp_sum(val, 32)
                if first_pre < 32:
                    break
                top -= 32
        if lane == 0:
            if b > 0:
                cuda.atomic.add(work, W_STATUS + b, (FLAG_PRE | (excl + size)) - (FLAG_AGG | size))
            base = meta[iUSED] + excl
            offsets[b] = base
            if b == n_blocks - 1:
                offsets[n_blocks] = base + size
                work[W_END] = base + size
            skip = 0
            if bad != 0:
                skip = 1
            elif base + size > meta[iCAP]:
                cuda.atomic.max(work, W_OVER, 1)
                skip = 1
            sh64[mi0 + 2] = base
            sh64[mi0 + 4] = skip

    # ------------------------------------------------------------------------------------------
    # 5. write: every 32-bit word of the record by one thread
    # ------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def ph_write_head(out32, rw, sh64, sh32, meta, tid):
        """Record header, section table, token sections."""
        H = meta[iH]
        T = meta[iT]
        D = meta[iD]
        P = meta[iP]
        layer = meta[iLAYER]
        n_units = meta[iNU]
        n_sec = meta[iNSEC]
        se0 = meta[oSE] >> 2
        tk0 = meta[oTK] >> 2
        sk0 = meta[oSK] >> 2
        sv0 = meta[oSV] >> 2
        ok0 = meta[oOK] >> 2
        ov0 = meta[oOV] >> 2
        or0 = meta[oOR] >> 2
        mi0 = meta[oMI] >> 3
        total = sh64[mi0 + 3]
        body = sh64[mi0 + 5]
        flags = layer | ((width(P) - 4) << 1)
        for j in range(tid, 3 + n_sec, NT):
            if j == 0:
                val = 1 | (flags << 8) | (H << 16)
            elif j == 1:
                val = T | (D << 16)
            elif j == 2:
                val = total
            elif j < 3 + n_units:
                val = np.int64(sh32[tk0 + (j - 3) * TOKI_FIELDS + 4])
            else:
                val = np.int64(sh32[se0 + (j - 3 - n_units) * SECI_FIELDS + 4])
            out32[rw + j] = np.int32(val & LOW32)
        for j in range(tid, (total - body) >> 2, NT):   # zero padding to 16
            out32[rw + (body >> 2) + j] = 0
        for u in range(n_units):
            e0 = tk0 + u * TOKI_FIELDS
            kbase = np.int64(sh32[e0 + 0])
            vbase = np.int64(sh32[e0 + 1])
            kb = np.int64(sh32[e0 + 2])
            vb = np.int64(sh32[e0 + 3])
            tsw = rw + (np.int64(sh32[e0 + 4]) >> 2)
            nwords = (8 + 4 * T + T * (kb + vb) // 8 + 3) // 4
            ob = or0 + u * T
            for j in range(tid, nwords, NT):
                if j == 0:
                    val = (kbase & 0xFFFF) | ((vbase & 0xFFFF) << 16)
                elif j == 1:
                    val = kb | (vb << 8)
                elif j < 2 + T:   # steps, K then V, two per word, storage order
                    p = 2 * (j - 2)
                    base_s = sk0
                    if p >= T:
                        p -= T
                        base_s = sv0
                    val = (np.int64(sh32[base_s + u * T + sh32[ob + p]]) |
                           (np.int64(sh32[base_s + u * T + sh32[ob + p + 1]]) << 16))
                else:             # offset bit streams: K fields, then V fields
                    bit0 = 32 * (j - 2 - T)
                    val = np.int64(0)
                    if kb > 0:
                        for f in range(udiv(bit0, kb), min(udiv(bit0 + 31, kb), T - 1) + 1):
                            fv = sh32[ok0 + u * T + sh32[ob + f]] - kbase
                            sft = f * kb - bit0
                            if sft >= 0:
                                val |= fv << sft
                            else:
                                val |= fv >> (-sft)
                    vbit0 = bit0 - T * kb
                    if vb > 0 and vbit0 + 31 >= 0:
                        for f in range(udiv(max(vbit0, 0), vb), min(udiv(vbit0 + 31, vb), T - 1) + 1):
                            fv = sh32[ov0 + u * T + sh32[ob + f]] - vbase
                            sft = f * vb - vbit0
                            if sft >= 0:
                                val |= fv << sft
                            else:
                                val |= fv >> (-sft)
                out32[tsw + j] = np.int32(val & LOW32)

    @cuda.jit(device=True)
    def pack_chunk(LV32, sh32, ob, lvb, W2, lsh, pmin, w):
        """VCH levels of a pack (tokens sh32[ob:ob + VCH], the level's 32-bit half of its LV word at LV32
        index lvb + 2 W t, shifted by lsh) minus the pack minimum, w bits each, LSB first: < 32 bits.
        Independent loads; unsigned indices (no negative-index wraparound code), 32-bit arithmetic."""
        chunk = np.int32(0)
        for i in range(VCH):
            t = np.int64(sh32[np.uint64(ob + i)])
            lev = np.int32(np.int32(np.int32(LV32[np.uint64(lvb + t * W2)]) >> lsh) & LM32) - pmin
            chunk = np.int32(chunk | np.int32(lev << np.int32(w * i)))
        return chunk

    @cuda.jit(device=True)
    def put_chunk(PK, sw, acc, bit, chunk, cw):
        """Append a chunk of cw < 32 bits to the bit accumulator (bit < 32 bits pending, so it holds < 64)
        and OR a filled 32-bit word into the staged payload at sw (a word can hold bits of several packs,
        hence the atomic); returns the new acc, bit, sw."""
        acc |= np.int64(chunk) << bit
        bit += cw
        if bit >= 32:
            cuda.atomic.or_(PK, np.uint64(sw), np.int32(acc & LOW32))
            acc >>= 32
            bit -= 32
            sw += 1
        return acc, bit, sw

    @cuda.jit(device=True)
    def ph_write_sections(out32, rw, LV32, lv0, PK, pi0, po0, st0, sh32, meta, tid):
        """Channel sections: header word, pack header stream, payload (staged in PK from st0 on, in two
        buffers of SW words that sections alternate: one barrier a section, the staging of a section
        overlapping the store of the one before; zero there between uses; every thread of the CTA calls
        it: it has barriers)."""
        H = meta[iH]
        T = meta[iT]
        D = meta[iD]
        P = meta[iP]
        R = meta[iR]
        layer = meta[iLAYER]
        WK = meta[iWK]
        WU = meta[iWU]
        W = meta[iW]
        se0 = meta[oSE] >> 2
        or0 = meta[oOR] >> 2
        RD = R * D
        dsh = meta[iDSH]
        W2 = 2 * W
        SW = meta[iSW]
        for s in range(2 * H):
            e0 = se0 + s * SECI_FIELDS
            stg = st0 + (s & 1) * SW   # this section's staging buffer
            WB = np.int64(sh32[e0 + 0])
            MB = np.int64(sh32[e0 + 1])
            mbase = np.int64(sh32[e0 + 2])
            pbytes = np.int64(sh32[e0 + 3])
            csw = rw + (np.int64(sh32[e0 + 4]) >> 2)
            nh = np.int64(sh32[e0 + 5]) >> 2
            F = WB + MB
            gb = s * RD
            h = s >> 1
            kv = s & 1
            for j in range(tid, nh, NT):
                if j == 0:
                    val = WB | (MB << 8) | (mbase << 16)
                else:
                    bit0 = 32 * (j - 1)
                    val = np.int64(0)
                    if F > 0:
                        for f in range(udiv(bit0, F), min(udiv(bit0 + 31, F), RD - 1) + 1):
                            info = np.int64(PK[pi0 + gb + f])
                            fv = (info & 0xFF) | (((info >> 8) - mbase) << WB)
                            sft = f * F - bit0
                            if sft >= 0:
                                val |= fv << sft
                            else:
                                val |= fv >> (-sft)
                out32[csw + j] = np.int32(val & LOW32)
            # payload: one thread per pack appends its P values (w bits each, LSB first) to a bit
            # accumulator and ORs every filled 32-bit word into the section's staged payload (a word
            # can hold bits of several packs, hence the atomics); after a barrier the staged
            # words are stored coalesced and zeroed for the next section. Before: one thread per
            # payload word found its packs by a binary search over POFF (~750 instructions a word).
            for f in range(tid, RD, NT):
                info = np.int64(PK[pi0 + gb + f])
                w = info & 0xFF
                if w > 0:
                    pmin = info >> 8
                    r, d = divmod_p2(f, D, dsh)
                    if layer:
                        c = h * D + d
                        uu = np.int64(0)
                        wi = kv * WK + c // LPW_
                        ln = c % LPW_
                    else:
                        uu = h
                        wi = h * WU + kv * WK + d // LPW_
                        ln = d % LPW_
                    # the level's 32-bit half of its LV word (LV32 index lvb + 2 W t), its shift there;
                    # unsigned indices: no negative-index wraparound code in the per-value loop
                    half = ln // HLPW
                    lsh = E_ * (ln - half * HLPW)
                    lvb = 2 * (lv0 + wi) + half
                    ob = or0 + uu * T + r * P
                    poff = np.int64(PK[po0 + gb + f])
                    sw = stg + (poff >> 2)
                    bit = 8 * (poff & 3)
                    acc = np.int64(0)
                    w32 = np.int32(w)
                    pm32 = np.int32(pmin)
                    ls32 = np.int32(lsh)
                    cw = VCH * w
                    for v0 in range(0, P, 4 * VCH):
                        # a round of 4 chunks (16 values at 8-bit lanes: a whole pack of 16) gathered
                        # before any of them is ORed in: the atomics on the staging buffer may alias
                        # the shared loads of tokens and levels, so a load after an atomic waits for it
                        # (one chain of two dependent loads per round instead of per chunk); the last
                        # two chunks when the pack has them (P >= 2 VCH always)
                        more = v0 + 2 * VCH < P
                        c0 = pack_chunk(LV32, sh32, ob + v0, lvb, W2, ls32, pm32, w32)
                        c1 = pack_chunk(LV32, sh32, ob + v0 + VCH, lvb, W2, ls32, pm32, w32)
                        c2 = np.int32(0)
                        c3 = np.int32(0)
                        if more:
                            c2 = pack_chunk(LV32, sh32, ob + v0 + 2 * VCH, lvb, W2, ls32, pm32, w32)
                            c3 = pack_chunk(LV32, sh32, ob + v0 + 3 * VCH, lvb, W2, ls32, pm32, w32)
                        acc, bit, sw = put_chunk(PK, sw, acc, bit, c0, cw)
                        acc, bit, sw = put_chunk(PK, sw, acc, bit, c1, cw)
                        if more:
                            acc, bit, sw = put_chunk(PK, sw, acc, bit, c2, cw)
                            acc, bit, sw = put_chunk(PK, sw, acc, bit, c3, cw)
                    if bit > 0:
                        cuda.atomic.or_(PK, np.uint64(sw), np.int32(acc & LOW32))
            cuda.syncthreads()   # (also: the section before this one has stored and zeroed its buffer)
            pw_base = csw + nh
            for j in range(tid, (pbytes + 3) // 4, NT):
                out32[pw_base + j] = PK[stg + j]
                PK[stg + j] = 0

    @cuda.jit(device=True)
    def copy_record(arena32, REC, rec0, sh64, mi0, size, tid):
        """The record in REC (size bytes, a multiple of 16) to the arena at MISC[2] unless MISC[4] says
        skip; 4 independent loads per thread in flight (REC is read back from L2)."""
        if sh64[mi0 + 4] != 0:
            return
        aw = sh64[mi0 + 2] >> 2
        nw = size >> 2
        for j0 in range(4 * tid, nw, 4 * NT):   # (nw is a multiple of 4)
            w0 = REC[rec0 + j0]
            w1 = REC[rec0 + j0 + 1]
            w2 = REC[rec0 + j0 + 2]
            w3 = REC[rec0 + j0 + 3]
            arena32[aw + j0] = np.uint32(w0)
            arena32[aw + j0 + 1] = np.uint32(w1)
            arena32[aw + j0 + 2] = np.uint32(w2)
            arena32[aw + j0 + 3] = np.uint32(w3)

    # ------------------------------------------------------------------------------------------
    # the kernel: a persistent loop over tiles (blocks, in order)
    # ------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def prof_mark(work, i, tp, tid):
        """Profile builds: add the cycles since tp to phase i's sum (thread 0); returns now."""
        now = clock64()
        if tid == 0:
            cuda.atomic.add(work, W_PROF + i, now - tp)
        return now

    def encode_kernel(K64, V64, arena32, meta, work, offsets, g64, g32, bounds):
        sh64 = cuda.shared.array(0, nb_int64)
        sh32 = cuda.shared.array(0, nb_int32)
        shf = cuda.shared.array(0, nb_float64)
        tid = np.int64(cuda.threadIdx.x)
        n_blocks = meta[iN]
        slot = np.int64(cuda.blockIdx.x) * meta[iSCR]   # this CTA's global scratch, in int64 words
        if LV_SH:
            LVA = sh64
            LV32 = sh32
            lv0 = meta[oLV] >> 3
        else:
            LVA = g64
            LV32 = g32
            lv0 = slot + (meta[oLV] >> 3)
        if PK_SH:
            PK = sh32
            pi0 = meta[oPI] >> 2
            po0 = meta[oPO] >> 2
            st0 = meta[oSTG] >> 2
        else:
            PK = g32
            pi0 = 2 * slot + (meta[oPI] >> 2)
            po0 = 2 * slot + (meta[oPO] >> 2)
            st0 = 2 * slot + (meta[oSTG] >> 2)
        mi0 = meta[oMI] >> 3
        repack = meta[iREPACK]
        greedy = repack == 2 and meta[iT] > meta[iP]
        mode = meta[iMODE]     # 0; for timing phases only: 1 no write, 2 no look-back, 4 no stats, 8 no repack
        REC = g32                # the record, written here, copied to the arena one tile later
        rec0 = 2 * slot + (meta[oREC] >> 2)
        pend = np.int64(-1)      # the tile whose record waits in REC, its record size and bad flag
        pend_size = np.int64(0)
        pend_bad = np.int64(0)
        for i in range(tid, 2 * meta[iSW], NT):   # the write's staging buffers: zero, and zeroed after each use
            PK[st0 + i] = 0
        tp = np.int64(0)
        if PROF:
            tp = clock64()
        while True:
            if tid == 0:
                sh64[mi0 + 0] = cuda.atomic.add(work, W_TILE, 1)
                sh64[mi0 + 1] = 0
            cuda.syncthreads()
            if PROF:
                tp = prof_mark(work, 0, tp, tid)
            b = sh64[mi0 + 0]
            done = b >= n_blocks    # (one more round: the last tile's record still waits in REC)
            bad = np.int64(0)
            if not done:
                ph_quantize(b, K64, V64, LVA, LV32, lv0, sh64, sh32, meta, work, bounds, tid)
                cuda.syncthreads()
                if PROF:
                    tp = prof_mark(work, 1, tp, tid)
                bad = sh64[mi0 + 1]
                if bad == 0 and (mode & 8) == 0:
                    if greedy:
                        ph_greedy(LVA, LV32, lv0, sh64, sh32, shf, meta, tid)
                    else:
                        ph_order_simple(sh64, sh32, meta, tid)
                    cuda.syncthreads()
                if PROF:
                    tp = prof_mark(work, 2, tp, tid)
                if bad == 0 and (mode & 4) == 0:
                    ph_pack_stats(LVA, lv0, PK, pi0, sh32, meta, tid)
                    cuda.syncthreads()
                    ph_sections(PK, pi0, po0, sh64, sh32, meta, tid)
                if PROF:
                    tp = prof_mark(work, 3, tp, tid)
            # The record goes to the CTA's scratch (REC) and is copied to the arena one tile later: its
            # look-back then finds its predecessors' sizes published (tiles start in order, but a greedy
            # block's time varies: the look-back right after publishing, its predecessors still running,
            # measured 17.6 ms of 174.5 at the 8B 128K prefill with the write off, 0.8 ms with repack none)
            if tid < 32 and (mode & 6) == 0:
                if not done:
                    size = np.int64(0)
                    if bad == 0:
                        size = sh64[mi0 + 3]
                    ph_publish(b, size, work, tid)
                if pend >= 0:
                    ph_lookback(pend, pend_bad, pend_size, sh64, meta, work, offsets, tid)
            cuda.syncthreads()
            if PROF:
                tp = prof_mark(work, 4, tp, tid)
            if pend >= 0 and (mode & 15) == 0:
                copy_record(arena32, REC, rec0, sh64, mi0, pend_size, tid)
                cuda.syncthreads()   # REC is free
            if PROF:
                tp = prof_mark(work, 5, tp, tid)
            if done:
                break
            pend = b
            pend_bad = bad
            pend_size = np.int64(0)
            if bad == 0 and (mode & 4) == 0:
                pend_size = sh64[mi0 + 3]
            if bad == 0 and (mode & 15) == 0:
                ph_write_head(REC, rec0, sh64, sh32, meta, tid)
                ph_write_sections(REC, rec0, LV32, lv0, PK, pi0, po0, st0, sh32, meta, tid)
            cuda.syncthreads()
            if PROF:
                tp = prof_mark(work, 6, tp, tid)

    if SIMULATOR:
        return cuda.jit(encode_kernel)
    return cuda.jit(encode_kernel, max_registers=min(255, 65536 // NT))


def get_kernel(E: int, NT: int, lv_shared: bool, pack_shared: bool, chunks_per_lane: int = 8, group: int = 32,
               words_per_lane: int = 1, exact_rows: bool = False, narrow: bool = False, profile: bool = False):
    """The kernel for lane width E, NT threads, the level matrix / pack tables in shared memory or not,
    chunks_per_lane 8-byte input words per lane held in registers while quantizing a token, the
    greedy's lane groups (group lanes per candidate, words_per_lane words of a unit's row per lane;
    exact_rows: a row is exactly group * words_per_lane words, no lane's word is past its end) and
    narrow: every level fits half a lane (E / 2 bits), so two words' ranges are counted as one;
    profile: the diagnostics build that sums each phase's cycles (PROF_PHASES)."""
    key = (E, NT, lv_shared, pack_shared, chunks_per_lane, group, words_per_lane, exact_rows, narrow, profile)
    if key not in _KERNELS:
        _KERNELS[key] = _build_kernel(*key)
    return _KERNELS[key]


# ----------------------------------------------------------------------------------------------------
# Host side: planning, validation, launch, error reporting
# ----------------------------------------------------------------------------------------------------

class ArenaFullError(ValueError):
    """The records do not fit in the arena; `needed` is the arena size (bytes) they would need.

    Nothing is committed: the caller's `used` stays valid. Grow the arena (keeping its first `used`
    bytes) and call again, or size it beforehand with `max_record_bytes`."""

    def __init__(self, needed: int, capacity: int):
        super().__init__(f"the compressed records need the arena to hold {needed} bytes, it has {capacity}")
        self.needed, self.capacity = needed, capacity


class NonFiniteInputError(ValueError):
    """K or V holds NaN, inf or a value beyond fp16's range: `array` ("k" or "v"), `block`, `head` and
    `token` name the first such element (the lowest in the kernel's order)."""

    def __init__(self, array: str, block: int, head: int, token: int):
        super().__init__(f"{array} has a non-finite or out-of-fp16-range value (NaN, inf or |x| > 65504) at "
                         f"block {block}, head {head}, token {token}")
        self.array, self.block, self.head, self.token = array, block, head, token


class EncodeJob:
    """One encoder launch in flight (BlockEncoder.start). `offsets` (the device int64 [n + 1] array the
    kernel writes) is valid once it has finished; `result()` waits and returns (new_used, offsets on the
    host as int64 [n + 1]) or raises what the launch found (NonFiniteInputError, ArenaFullError,
    RuntimeError for an encoder bug)."""

    def __init__(self, offsets, host: np.ndarray, capacity: int, params: codec.CodecParams, n_kv_heads: int,
                 stream=None, keep=(), event=None):
        self.offsets, self.host, self.capacity = offsets, host, capacity
        self.keep = keep          # the launch's inputs: not freed while it may still run
        self.block, self.H = params.block, n_kv_heads
        self.event = None
        if stream is not None and event is not None:
            self.event = event
            self.event.record(stream)

    @classmethod
    def finished_with(cls, offsets, used: int, params: codec.CodecParams, n_kv_heads: int) -> "EncodeJob":
        """The job of an empty batch: nothing launched, `used` is the end."""
        return cls(offsets, np.array([used, NO_NAN, 0, 0, used], dtype=np.int64), 0, params, n_kv_heads)

    def wait(self) -> None:
        """Wait for the readback and keep a copy of it (the pinned buffer is the encoder's next job's)."""
        if self.event is not None:
            self.event.synchronize()
            self.event, self.host, self.keep = None, self.host.copy(), ()

    def result(self) -> tuple[int, np.ndarray]:
        self.wait()
        end, nan_code, over, internal = (int(x) for x in self.host[:4])
        if nan_code != NO_NAN:
            n = self.host.shape[0] - 5
            kv, code = divmod(nan_code, n * self.H * self.block)
            b, rest = divmod(code, self.H * self.block)
            raise NonFiniteInputError("kv"[kv], b, rest // self.block, rest % self.block)
        if internal:
            raise RuntimeError("packkv GPU encoder: a quantized level exceeded its lane (an encoder bug)")
        if over:
            raise ArenaFullError(end, self.capacity)
        return end, self.host[4:]


def level_bound(rel: float) -> int:
    """An upper bound on any quantized level for relative bound rel (FORMAT.md section 1): the range
    (hi - lo) / step <= 1/rel up to fp32 rounding, plus one for rounding both ends; at least 3 (the
    65504 clamp). The encoder checks it on the device and fails loudly if it were ever exceeded."""
    return codec.max_level(rel)   # the format's one definition


def block_bounds(params: codec.CodecParams, n_blocks: int, rel_k=None, rel_v=None) -> np.ndarray:
    """Each block's (rel_k, rel_v) as float32 [n_blocks, 2], what the kernel quantizes with: the given
    per-block bounds (host sequences of n_blocks numbers), else params' bound for every block. Each must
    be in [2**-12, 1], as CodecParams requires."""
    columns = []
    for name, given, default in (("rel_k", rel_k, params.rel_k), ("rel_v", rel_v, params.rel_v)):
        rel = np.full(n_blocks, default, np.float64) if given is None else np.asarray(given, np.float64)
        if rel.shape != (n_blocks,):
            raise ValueError(f"{name} must hold one bound per block ({n_blocks}), got shape {rel.shape}")
        outside = rel[~((rel >= codec.MIN_REL) & (rel <= 1.0))]
        if outside.size:
            raise ValueError(f"{name} must be in [2**-12, 1] (a relative error bound) for every block, "
                             f"got {outside[0]!r}")
        columns.append(rel.astype(np.float32))
    return np.stack(columns, axis=1)


def sink_columns(n_blocks: int, block: int, sink_tokens=None, sink_rel=None) -> np.ndarray:
    """float32 [n_blocks, 4] (sink rel_k, sink rel_v, n_sink, 0): block b's first sink_tokens[b] tokens are
    encoded at sink_rel (rel_k, rel_v) instead of the block's bounds (a host sequence of n_blocks counts in
    [0, block]; None: none). codec's per-token bounds (encode_block's token_rel) with the first n_sink at
    sink_rel and the rest at the block's give the same record."""
    out = np.zeros((n_blocks, 4), np.float32)
    if sink_tokens is None:
        return out
    n = np.asarray(sink_tokens)
    if n.shape != (n_blocks,) or not np.issubdtype(n.dtype, np.integer) or not ((n >= 0) & (n <= block)).all():
        raise ValueError(f"sink_tokens must hold one count in [0, block={block}] per block ({n_blocks}), got {n!r}")
    if (n > 0).any():
        if sink_rel is None or len(sink_rel) != 2 or not all(codec.MIN_REL <= float(r) <= 1.0 for r in sink_rel):
            raise ValueError(f"sink_rel must be (rel_k, rel_v) in [2**-12, 1] with sink tokens, got {sink_rel!r}")
        out[:, 0], out[:, 1] = float(sink_rel[0]), float(sink_rel[1])
    out[:, 2] = n
    return out


def tightest_bounds(bounds: np.ndarray, sink: np.ndarray) -> np.ndarray:
    """The (rel_k, rel_v) pairs any token of the launch is quantized with (for the lane width and the record
    size): each block's (block_bounds), and the sink bounds of blocks with sink tokens (sink_columns)."""
    return np.concatenate([bounds, sink[sink[:, 2] > 0, :2]])


def _largest_level(params: codec.CodecParams, bounds: np.ndarray | None) -> int:
    """The largest level any block may hold: the tightest bound's (params' bounds without per-block ones)."""
    tightest = (params.rel_k, params.rel_v) if bounds is None or not len(bounds) else bounds.min(axis=0)
    return max(level_bound(rel) for rel in tightest)


def lane_bits(params: codec.CodecParams, bounds: np.ndarray | None = None) -> int:
    """8-bit SWAR lanes when every level is <= 127 (rel >= ~1/126, e.g. the defaults), else 16-bit. With
    per-block bounds (block_bounds), the tightest block decides."""
    return 8 if _largest_level(params, bounds) <= 127 else 16


def narrow_levels(params: codec.CodecParams, bounds: np.ndarray | None = None) -> bool:
    """Whether every level fits half a lane of lane_bits (<= 15 in 8-bit lanes: rel >= ~1/14, e.g. the
    defaults' <= 11): the greedy then counts two words' ranges at once (kernel build option)."""
    return _largest_level(params, bounds).bit_length() <= lane_bits(params, bounds) // 2


def max_record_bytes(params: codec.CodecParams, n_kv_heads: int, head_dim: int,
                     bounds: np.ndarray | None = None) -> int:
    """An upper bound on one record's length for these params (to size an arena so that encoding a
    batch of n blocks never overflows: reserve n * max_record_bytes). With per-block bounds
    (block_bounds), the bound of the tightest block, which holds for all."""
    return _record_bound(params, n_kv_heads, head_dim, _largest_level(params, bounds).bit_length())


def _record_bound(params: codec.CodecParams, H: int, D: int, wmax: int) -> int:
    """An upper bound on a record's length when no pack is wider than wmax bits."""
    T, P = params.block, params.pack
    n_units = 1 if params.granularity == "token-layer" else H
    R = T // P
    tok = 8 + 4 * T + T * 32 // 8 + 3
    sec = 4 + -(-R * D * (5 + 16) // 8) + 3 + P * R * D * wmax // 8 + 3
    total = 12 + 4 * (n_units + 2 * H) + n_units * tok + 2 * H * sec
    return total + 15


def _log2_or(x: int) -> int:
    """log2(x) for a power of two, else -1 (the kernel then divides)."""
    return x.bit_length() - 1 if x > 0 and x & (x - 1) == 0 else -1


def _pow2ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class _Plan:
    """Dimensions, work split and memory layout of one (params, H, D, threads, lane width E) configuration
    (params' bounds play no part: each block's come with the launch)."""

    def __init__(self, params: codec.CodecParams, H: int, D: int, threads: int, E: int, smem_limit: int,
                 force_global: bool = False):
        self.params, self.H, self.D, self.NT = params, H, D, threads
        T, P = params.block, params.pack
        self.E = E
        LPW = 64 // E
        layer = params.granularity == "token-layer"
        n_units = 1 if layer else H
        CU = H * D if layer else D
        WK = -(-CU // LPW)
        WU, W = 2 * WK, n_units * 2 * WK
        R = T // P
        NP = 2 * H * R * D
        NW = threads // 32
        GSQ = min(32, _pow2ceil(CU // 4))
        GS = min(32, _pow2ceil(max(1, WU // 4)))
        # greedy picks: NWU warps per unit (UPR units at a time), lane groups of G lanes per candidate,
        # WPL words of the unit's row per lane (the pack's lo/hi of those words in registers)
        NWU = max(1, NW // n_units)
        UPR = NW // NWU
        self.G = min(32, _pow2ceil(WU))
        self.WPL = -(-WU // self.G)
        UT = n_units * T
        al = lambda n: -(-n // 16) * 16
        regions = {
            "lv": T * W * 8, "pinfo": NP * 4, "poff": NP * 4,
            "mw": W * 8, "nrm": UT * 8, "key": UT * 8, "score": UT * 8,
            "stepk": UT * 4, "stepv": UT * 4, "offk": UT * 4, "offv": UT * 4, "order": UT * 4,
            "rem": UT * 4, "cand": UT * 4, "stale": UT * 4, "best": 2 * NW * 8,
            "box": UPR * 2 * WU * 8 if params.repack == "greedy" else 0,
            "seci": 2 * H * SECI_FIELDS * 4, "toki": n_units * TOKI_FIELDS * 4, "misc": MISC_FIELDS * 8,
            # write: a section's payload, staged (widths <= E - 1 bits: levels < 2**(E-1))
            "stage": 2 * self.stage_words(R * D, P, E) * 4,   # two buffers, sections alternate
            # the record, in global scratch until its arena offset is known (widths < E bits)
            "rec": _record_bound(params, H, D, E - 1),
        }
        # placement: 0 all shared, 1 LV global, 2 LV and PACK* (pack tables, staged payload) global,
        # 3 does not fit
        pack_regions = ("pinfo", "poff", "stage")
        small = sum(al(n) for name, n in regions.items() if name not in ("lv", "rec") and name not in pack_regions)
        lv, pk = al(regions["lv"]), sum(al(regions[name]) for name in pack_regions)
        if not force_global and small + lv + pk <= smem_limit:
            where = 0
        else:
            where = 1 if small + pk <= smem_limit else 2 if small <= smem_limit else 3
        if where == 3:
            raise ValueError(f"the GPU encoder cannot hold a block of {T} tokens x {H} KV heads x head_dim "
                             f"{D} ({params.granularity}) in {smem_limit} bytes of shared memory")
        self.lv_shared, self.pack_shared = where == 0, where <= 1
        offsets, shared_at, global_at = {}, 0, 0
        for name, n in regions.items():
            in_global = (name == "rec" or (name == "lv" and not self.lv_shared)
                         or (name in pack_regions and not self.pack_shared))
            if in_global:
                offsets[name], global_at = global_at, global_at + al(n)
            else:
                offsets[name], shared_at = shared_at, shared_at + al(n)
        self.shared_bytes, self.scratch_bytes = shared_at, global_at
        self.values = dict(n_blocks=0, H=H, T=T, D=D, P=P, R=R, layer=int(layer),
                           repack=codec.REPACK_METHODS.index(params.repack), n_units=n_units, CU=CU, WK=WK,
                           WU=WU, W=W, n_sec=n_units + 2 * H, GSQ=GSQ, GS=GS, NWU=NWU, UPR=UPR,
                           used0=0, cap=0, scr64=global_at // 8,
                           dq_shift=_log2_or(D // 4), d_shift=_log2_or(D), mode=0,
                           SW=self.stage_words(R * D, P, E),
                           **{f"o_{name}": off for name, off in offsets.items()})

    @staticmethod
    def stage_words(packs: int, P: int, E: int) -> int:
        """32-bit words of the largest section payload: `packs` packs of P values of at most E - 1 bits."""
        return -(-packs * P * (E - 1) // 32)

    def meta(self, n_blocks: int, used0: int, cap: int, mode: int = 0) -> np.ndarray:
        values = dict(self.values, n_blocks=n_blocks, used0=used0, cap=cap, mode=mode)
        return np.array([values[name] for name in _META_FIELDS], dtype=np.int64)


def _device_info():
    if SIMULATOR:
        return {"sms": 2, "smem_block": 1 << 30, "smem_sm": 1 << 30}
    dev = cuda.get_current_device()
    return {"sms": dev.MULTIPROCESSOR_COUNT, "smem_block": dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "smem_sm": dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR}


def _as_device(x, name: str):
    """A numba device array (zero-copy for CuPy / CUDA-array-interface arrays)."""
    if SIMULATOR:
        if isinstance(x, np.ndarray):
            return cuda.to_device(x)
        if hasattr(x, "copy_to_host"):
            return x
    elif cuda.is_cuda_array(x):
        return cuda.as_cuda_array(x)
    raise ValueError(f"{name} must be a device array (CuPy, Numba or any CUDA-array-interface array), "
                     f"got {type(x).__name__}")


def _like_cupy(array):
    """A CuPy view of a Numba device array when CuPy is there (zero-copy), else the array itself."""
    if SIMULATOR:
        return array
    try:
        import cupy
    except ImportError:
        return array
    return cupy.asarray(array)


def _stream():
    if SIMULATOR:
        return 0
    try:
        import cupy
        ptr = cupy.cuda.get_current_stream().ptr
    except ImportError:
        ptr = 0
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


class BlockEncoder:
    """Compiles (once per lane width and narrow flag: up to 4 builds) and runs the encoder for one
    (params, n_kv_heads, head_dim) configuration. Each call's lane width follows its tightest block
    bound (8-bit lanes at the default bounds, 16-bit below rel ~1/126), and so does the greedy's narrow
    build (levels of half a lane: rel >= ~1/14 at 8 bits); `plan` and `kernel` are the latest call's."""

    def __init__(self, params: codec.CodecParams, n_kv_heads: int, head_dim: int, threads: int = 512,
                 force_global: bool = False, max_ctas: int | None = None, chunks_per_lane: int = 8,
                 profile: bool = False):
        if not isinstance(params, codec.CodecParams):
            raise ValueError(f"params must be a codec.CodecParams, got {type(params).__name__}")
        if not (1 <= n_kv_heads <= 255):
            raise ValueError(f"n_kv_heads must be in [1, 255], got {n_kv_heads}")
        if head_dim < 4 or head_dim % 4 or head_dim > 65535:
            raise ValueError(f"the GPU encoder needs head_dim to be a multiple of 4 (8-byte fp16 loads), "
                             f"got {head_dim}")
        if threads % 32 or not (32 <= threads <= 1024):
            raise ValueError(f"threads must be a multiple of 32 in [32, 1024], got {threads}")
        self.params, self.H, self.D, self.NT = params, n_kv_heads, head_dim, threads
        self.info = _device_info()
        self.smem_limit, self.force_global = self.info["smem_block"], force_global
        self.qch, self.ctas_asked, self.profile = chunks_per_lane, max_ctas, profile
        self._plans: dict = {}
        self._pinned = self._job = None
        self._device = {}        # buffers kept between launches: scratch, uploads, offsets (_device_buffer)
        self._event = None
        self._use_lanes(lane_bits(params), narrow_levels(params))

    def _use_lanes(self, E: int, narrow: bool) -> None:
        """Make the plan (kept per lane width) and kernel with E-bit lanes (narrow: levels of E / 2 bits)
        the current ones."""
        if E not in self._plans:
            self._plans[E] = _Plan(self.params, self.H, self.D, self.NT, E, self.smem_limit, self.force_global)
        self.plan = p = self._plans[E]
        self.narrow = narrow
        self.kernel = get_kernel(p.E, self.NT, p.lv_shared, p.pack_shared, self.qch, p.G, p.WPL,
                                 p.values["WU"] == p.G * p.WPL, narrow, self.profile)
        per_sm = max(1, min(2048 // self.NT, self.info["smem_sm"] // (p.shared_bytes + 1024)))
        self.max_ctas = self.ctas_asked or self.info["sms"] * per_sm

    # -- the one call ------------------------------------------------------------------------------
    def encode(self, k, v, arena, used: int, rel_k=None, rel_v=None, _phase_mode: int = 0, *, sink_tokens=None,
               sink_rel=None):
        """Compress k, v [n_blocks, n_kv_heads, block, head_dim] (fp16, on the device) into arena
        (uint8, on the device) from byte `used` (a multiple of 16) on.

        rel_k, rel_v: optional per-block bounds (host sequences of n_blocks numbers in [2**-12, 1]) in
        place of params' for every block. Record b is then codec's record of block b encoded with its
        own bounds (records do not store their bounds: the format and decoders are the same).
        sink_tokens, sink_rel: optional per-block counts (host, n_blocks ints in [0, block]) of leading
        tokens encoded at sink_rel = (rel_k, rel_v) instead (a sequence's first tokens, attention sinks):
        record b is then codec's with those per-token bounds (sink_columns).

        Returns (offsets, new_used): offsets is an int64 device array [n_blocks + 1], record b at
        arena[offsets[b]:offsets[b+1]] (offsets[0] == used, offsets[-1] == new_used), the same bytes
        as codec.encode_blocks. Synchronizes once (reads back the end offset and error flags).
        Raises NonFiniteInputError (a ValueError) naming block, head and token for NaN/inf input,
        ArenaFullError when the records do not fit; in both cases nothing is committed (bytes past
        `used` may have changed).
        """
        job = self._start(k, v, arena, used, rel_k, rel_v, _phase_mode, own_offsets=True, sink_tokens=sink_tokens,
                          sink_rel=sink_rel)
        return _like_cupy(job.offsets), job.result()[0]

    def start(self, k, v, arena, used: int, rel_k=None, rel_v=None, _phase_mode: int = 0, *, sink_tokens=None,
              sink_rel=None) -> "EncodeJob":
        """encode without waiting: the launch, then the end offset, error flags and offsets copied into
        pinned host memory behind it on the current stream. The returned job's result() waits for them
        (and raises encode's errors). The encoder keeps one job in flight: a new start waits for the
        previous one (they share the pinned buffer, the scratch and the device buffers: the job's device
        offsets are valid until the next start)."""
        return self._start(k, v, arena, used, rel_k, rel_v, _phase_mode, own_offsets=False, sink_tokens=sink_tokens,
                           sink_rel=sink_rel)

    def _start(self, k, v, arena, used: int, rel_k, rel_v, _phase_mode: int, own_offsets: bool, sink_tokens=None,
               sink_rel=None) -> "EncodeJob":
        """start; own_offsets: the job's device offsets in an array of their own (encode returns them)."""
        params = self.params
        dk, dv = _as_device(k, "k"), _as_device(v, "v")
        for name, x in (("k", dk), ("v", dv)):
            if x.dtype != np.float16:
                raise ValueError(f"{name} must be float16, got {x.dtype}")
            if x.ndim != 4 or tuple(x.shape[1:]) != (self.H, params.block, self.D):
                raise ValueError(f"{name} must have shape [n_blocks, {self.H}, {params.block}, {self.D}], "
                                 f"got {tuple(x.shape)}")
        if tuple(dk.shape) != tuple(dv.shape):
            raise ValueError(f"k and v must have the same shape, got {tuple(dk.shape)} and {tuple(dv.shape)}")
        da = _as_device(arena, "arena")
        if da.dtype != np.uint8 or da.ndim != 1:
            raise ValueError(f"arena must be a 1-D uint8 device array, got {da.dtype} {tuple(da.shape)}")
        used = int(used)
        if used % 16 or not (0 <= used <= da.shape[0]):
            raise ValueError(f"used must be a multiple of 16 within the arena ({da.shape[0]} bytes), got {used}")
        n = int(dk.shape[0])
        bounds = block_bounds(params, n, rel_k, rel_v)
        sink = sink_columns(n, params.block, sink_tokens, sink_rel)
        if self._job is not None:
            self._job.wait()
        stream = _stream()
        offsets = (cuda.device_array(n + 1, dtype=np.int64, stream=stream) if own_offsets
                   else self._device_buffer("offsets", n + 1, stream))
        if n == 0:
            offsets.copy_to_device(np.array([used], dtype=np.int64), stream=stream)
            return EncodeJob.finished_with(offsets, used, params, self.H)
        if not (dk.is_c_contiguous() and dv.is_c_contiguous()):
            raise ValueError("k and v must be C-contiguous")
        tightest = tightest_bounds(bounds, sink)
        self._use_lanes(lane_bits(params, tightest), narrow_levels(params, tightest))
        p = self.plan
        k64, v64 = dk.reshape(-1).view(np.int64), dv.reshape(-1).view(np.int64)
        cap = da.shape[0] // 4 * 4
        arena32 = da[:cap].view(np.uint32)
        grid = min(n, self.max_ctas)
        scratch = self._scratch_views(grid, stream)
        # one upload for the work counters and the blocks' bounds, into buffers kept between launches (an
        # allocating upload cost ~0.2 ms of host time a piece at a decode step's compress event)
        upload = np.zeros(W_STATUS + n + BSTRIDE // 2 * n, dtype=np.int64)
        upload[W_NAN] = NO_NAN
        upload[W_STATUS + n:] = np.concatenate([bounds, sink], axis=1).reshape(-1).view(np.int64)
        uploaded = self._upload("work", upload, stream)
        work = uploaded[:W_STATUS + n]
        block_rel = uploaded[W_STATUS + n:].view(np.float32)   # block b's bounds from BSTRIDE * b (ph_quantize)
        meta = self._upload("meta", p.meta(n, used, cap, _phase_mode), stream)
        try:
            self._launch(grid, stream, (k64, v64, arena32, meta, work, offsets, *scratch, block_rel))
        except Exception as exc:   # the >48 KiB shared-memory opt-in refused: level matrix to global scratch
            if SIMULATOR or p.shared_bytes <= 48 * 1024:
                raise
            import warnings
            warnings.warn(f"packkv GPU encoder: launch with {p.shared_bytes} bytes of shared memory failed "
                          f"({type(exc).__name__}: {exc}); using global scratch for the level matrix")
            self.smem_limit, self.force_global, self._plans = 48 * 1024, True, {}
            self._use_lanes(p.E, self.narrow)
            p = self.plan
            meta = self._upload("meta", p.meta(n, used, cap, _phase_mode), stream)
            scratch = self._scratch_views(grid, stream)
            self._launch(grid, stream, (k64, v64, arena32, meta, work, offsets, *scratch, block_rel))
        if SIMULATOR:
            host = np.concatenate([work[:4].copy_to_host(), offsets.copy_to_host()])
        else:
            host = self._pinned_results(n + 5)
            work[:4].copy_to_host(ary=host[:4], stream=stream)
            offsets.copy_to_host(ary=host[4:], stream=stream)
        self._job = EncodeJob(offsets, host, cap, params, self.H, stream, keep=(dk, dv, da), event=self._reused_event())
        return self._job

    def phase_cycles(self) -> dict:
        """A profile build's (profile=True) cycles per phase (PROF_PHASES), summed over the CTAs, of the
        latest launch (waits for it)."""
        if not self.profile:
            raise ValueError("phase_cycles needs an encoder built with profile=True")
        if self._job is not None:
            self._job.wait()
        sums = self._device["work"][W_PROF:W_PROF + len(PROF_PHASES)].copy_to_host()
        return {name: int(c) for name, c in zip(PROF_PHASES, sums)}

    def _device_buffer(self, name: str, count: int, stream):
        """The first `count` int64 of a device buffer kept between launches (grown by doubling)."""
        held = self._device.get(name)
        if held is None or held.shape[0] < count:
            held = self._device[name] = cuda.device_array(max(count, 2 * (0 if held is None else held.shape[0])),
                                                          dtype=np.int64, stream=stream)
        return held[:count]

    def _upload(self, name: str, values: np.ndarray, stream):
        buffer = self._device_buffer(name, values.shape[0], stream)
        buffer.copy_to_device(values, stream=stream)
        return buffer

    def _reused_event(self):
        """One event for every job (one job is in flight at a time; a new one costs ~0.1 ms of host time)."""
        if SIMULATOR:
            return None
        if self._event is None:
            self._event = cuda.event(timing=False)
        return self._event

    def _launch(self, grid, stream, args):
        config = self.kernel[grid, self.NT, stream, self.plan.shared_bytes]
        self._allow_shared(config, self.plan.shared_bytes)
        config(*args)

    def _scratch_views(self, grid: int, stream):
        scratch = self._device_buffer("scratch", max(16, grid * self.plan.scratch_bytes) // 8, stream)
        return scratch, scratch.view(np.int32)

    def _pinned_results(self, count: int) -> np.ndarray:
        """Page-locked int64 [count] for the readback (a copy into pageable memory would block the host)."""
        held = 0 if self._pinned is None else self._pinned.shape[0]
        if held < count:
            self._pinned = cuda.pinned_array(max(count, 2 * held), dtype=np.int64)
        return self._pinned[:count]

    def _allow_shared(self, config, nbytes: int) -> None:
        """Opt the kernel in to more than 48 KiB of dynamic shared memory (once per launch config)."""
        if SIMULATOR or nbytes <= 48 * 1024 or _set_max_dynamic_shared in config.pre_launch_callbacks:
            return
        config.pre_launch_callbacks.append(_set_max_dynamic_shared)


def _set_max_dynamic_shared(kernel, launch_config) -> None:
    """Numba pre-launch callback: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = the launch's size."""
    from numba.cuda.cudadrv.driver import binding, driver
    cufunc = kernel._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, launch_config.sharedmem, cufunc.handle, cufunc.device.id)


_ENCODERS: dict = {}


def encode_blocks_device(k, v, params: codec.CodecParams, arena, used: int, rel_k=None, rel_v=None,
                         sink_tokens=None, sink_rel=None, **options):
    """Compress blocks k, v [n_blocks, n_kv_heads, block, head_dim] (fp16, device) into arena (uint8,
    device) from byte `used`, each block with params' bounds or its own (rel_k, rel_v: host sequences
    of n_blocks bounds): returns (offsets int64 device [n_blocks + 1], new_used). See
    BlockEncoder.encode (sink_tokens, sink_rel: each block's first tokens at bounds of their own); encoders
    (compiled kernels) are cached per (params, shape, options)."""
    return _encoder(k, params, options).encode(k, v, arena, used, rel_k, rel_v, sink_tokens=sink_tokens,
                                               sink_rel=sink_rel)


def start_blocks_device(k, v, params: codec.CodecParams, arena, used: int, rel_k=None, rel_v=None,
                        sink_tokens=None, sink_rel=None, **options) -> EncodeJob:
    """encode_blocks_device without waiting for the result: an EncodeJob (BlockEncoder.start)."""
    return _encoder(k, params, options).start(k, v, arena, used, rel_k, rel_v, sink_tokens=sink_tokens,
                                              sink_rel=sink_rel)


def _encoder(k, params: codec.CodecParams, options: dict) -> BlockEncoder:
    H, D = int(k.shape[-3]), int(k.shape[-1])
    key = (params, H, D, tuple(sorted(options.items())))
    if key not in _ENCODERS:
        _ENCODERS[key] = BlockEncoder(params, H, D, **options)
    return _ENCODERS[key]
