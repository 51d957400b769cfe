/*
packkv_attention.cu: fused decompress-attention for one decode step over a PackKV-compressed KV cache.

What it computes
  out[b, h, :] = softmax(q[b, h] . K^T / sqrt(D)) V over the compressed blocks of sequence b (records of
  the v1 format, docs/FORMAT.md, at arena + block_offsets[b, i], i < n_blocks[b]) and its fp16 window of
  window_len[b] recent tokens, for every query head h of every KV head's GQA group, q fp16 [B, Hq, D].
  Two launches: pk_attention_splits (flash-decoding: a CTA per (split of the blocks, KV head [, group
  tile of 8 query heads], sequence) writes one softmax state (m, l, o[D]) per query head and split) and
  pk_merge_window (a CTA per (query head, sequence): attention over the window, then the log-sum-exp
  merge of the window and all splits). The grid depends on the table's capacity (max_blocks), never on
  the lengths: a split past a sequence's end writes an empty state (m = -inf, l = 0).

Decode math (FORMAT.md section 4): x_hat[t, d] = (level[t, d] + off_t) * step_t, level = pack min + value.
  score_t = step_t * (q . level_t + off_t * sum(q)),   o = sum_t (p_t step_t) level_t + sum_t p_t step_t off_t.
  Levels are small integers, exact in fp16 (up to 2048, i.e. rel >= 1/2047), so q . level and p . level
  run on tensor cores (mma.sync m16n8k16, fp16 x fp16 -> fp32) on levels unpacked in registers.

Thread mapping (CTA = 4 warps; a warp owns whole "items" of 128 storage tokens = 8 groups of 16)
  groups: 16 consecutive storage tokens of a block (a pack row for pack 16, half of one for 32, two for 8).
  K, per item: lane (gq = lane/4, tq = lane%4) decodes group gq, channels 16kt + 4tq .. +3 of every
  16-channel tile kt. A run (16 tokens of one channel) unpacks into 8 half2 pairs (token j, token j+8)
  with one funnel shift, two PRMTs and a shift + LOP3 (magic 0x6400) + add.f16x2 (pack min) per pair;
  two PRMTs turn the pairs of adjacent channels into the mma A fragment (rows = tokens j / j+8 of group
  gq, columns = the 4 channels); B = q of the 8 query heads of the tile (n-slot gq); 8 mma per tile give
  the scores of 16 tokens x 2 heads per lane: all query heads of the group at once, so each compressed
  byte is read once per step.
  softmax: per-head running max/sum (log2 domain, ex2.approx), max over the 8 groups by 3 xor-shuffles;
  weights p*step_v as fp16 to shared memory in the B-fragment order of the V mma.
  V, two passes of 4 groups: lane (gq, tq) decodes group 4*pass+tq, channels 16mt + 2gq, +1; the pairs
  (token j, j+8) are directly the mma A fragment (rows = channels, k = tokens), B = the weights; 4 mma
  per 16-channel tile accumulate o[channel, head] in fp32 (a lane: 2 channels x 2 heads per tile).
  Payload offsets: widths of the lane's packs per tile -> exclusive scan across the 4 (K) or 8 (V) lanes
  sharing a pack row (16-bit SIMD, two tiles per shuffle) -> row bases by a scan of row totals.
Registers (163 at D=128): 32 score accumulators, the decoded runs of one tile pair, softmax state.
Shared memory per warp: two staging slots (the item being decoded / the next, each filled by two 1-D
  bulk copies (TMA, cp.async.bulk) per block completing on an mbarrier; a span that does not fit is read
  from global memory instead), q B-fragments, tile offsets and o accumulators per 16-channel tile (the
  tile loops are rolled to keep the code small), the fp16 weights (2.2 KB), a per-token table (1 KB).
  115.6 KB per CTA at D=128 (9 KB slots): 2 CTAs = 8 warps per SM. The CTA merges its warps' states.
Bytes per token and layer (8 KV heads x 128, rel 0.1/0.2, token-layer, greedy, pack 16): 421 on the
  8B-shaped real K/V (1.65 bits per element, all bytes counted), 617 on random Gaussian (2.41); fp16: 4096.

Measured (H100 80GB HBM3, `python3 bench/attention.py`, bench/results/attention.json; one sequence,
  time per layer as a CUDA graph over layer copies larger than L2):
  32/8/128, 128K tokens: 157.5 us on the real-valued K/V (SDPA fp16 181.0 us: 1.15x; compressed bytes
  at 351 GB/s = 12% of the 2976 GB/s device copy), 262 us on random K/V (items overflow the slot, part
  read from global memory); 32K: 51.6 us (SDPA 52.0). 9/3/64 SmolLM2 real K/V, 128K: 56.8 us (SDPA
  41.2). Below 16K a floor of ~15-22 us (two launches, pipeline prologue). Targets (3x SDPA, 70% of copy
  bandwidth) are NOT met: the kernel is issue/latency-bound on unpacking with 8 warps per SM (ncu: IPC
  1.9 per SM before the unroll by 2, top stall "wait" = dependent ALU chains), not memory-bound.

Attempts discarded:
  - fully unrolled tile loops with q fragments, offsets and o in registers (255 registers): 230 us; ncu's
    top stall was "no instruction" (3 cycles per issue): 9K+ instructions overflowed the instruction cache.
  - two decoder bodies, ld.shared for staged items / generic loads otherwise: 242 us (code size again).
  - o in registers with the V tile loop unrolled (frees 4 KB/warp so random items fit the slot): 164 us
    real / 308 us random, slower than o in shared memory (5.8K instructions).
  - __launch_bounds__(128, 3) for 12 warps per SM: spills, 292 us. 66 splits instead of 33: 252 us.
  - per-lane 16-byte cp.async staging: 10% of the time in issuing copies; replaced by bulk copies (TMA).
*/
#include "packkv_split.cuh"

template <int D, int P>
__global__ void __launch_bounds__(128, PK_MINB) pk_attention_splits(
    const u16* __restrict__ q, const u8* __restrict__ arena, const i64* __restrict__ block_offsets,
    const int* __restrict__ n_blocks, int max_blocks, int Hkv, int G, int T, int token_layer, int n_splits,
    int slot_bytes, float qscale, float* __restrict__ ws) {
  pk_split_body<D, P, 0>(q, nullptr, 0, arena, block_offsets, n_blocks, max_blocks, Hkv, G, T, token_layer,
                         n_splits, slot_bytes, qscale, ws);
}

// ---------------------------------------------------------------------------------------------------
// Merge: a CTA per (query head, sequence). Phase 1: attention over the fp16 window in chunks of 256
// tokens (a warp per token dots q with k; thread per channel accumulates p v); phase 2: log-sum-exp merge
// with every split's state; phase 3: out = o / l in fp16 (0 when nothing was attended).
// ---------------------------------------------------------------------------------------------------
#define PK_WCHUNK 256

template <int D>
__global__ void __launch_bounds__(128) pk_merge_window(
    const u16* __restrict__ q, const u16* __restrict__ wk, const u16* __restrict__ wv,
    const int* __restrict__ window_len, const float* __restrict__ ws, int n_splits, int Hkv, int G, int W_cap,
    float qscale, u16* __restrict__ out) {
  constexpr int PER = (D + 127) / 128;
  __shared__ float qs[D];
  __shared__ float sc[PK_WCHUNK];
  const int head = blockIdx.x, b = blockIdx.y, kvh = head / G, Hq = Hkv * G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int d = tid; d < D; d += blockDim.x) qs[d] = pk_h2float(q[(size_t(b) * Hq + head) * D + d]);
  int W = window_len[b];
  W = W < 0 ? 0 : (W > W_cap ? W_cap : W);
  float m = PK_NEG_INF, l = 0.f, o[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) o[i] = 0.f;
  __syncthreads();
  const size_t kv_base = (size_t(b) * Hkv + kvh) * size_t(W_cap) * D;
  for (int c0 = 0; c0 < W; c0 += PK_WCHUNK) {
    const int n = min(PK_WCHUNK, W - c0);
    // phase 1a: scores of the chunk
    for (int t = warp; t < n; t += blockDim.x / 32) {
      const u16* kp = wk + kv_base + size_t(c0 + t) * D;
      float part = 0.f;
      for (int d = lane; d < D; d += 32) part += qs[d] * pk_h2float(kp[d]);
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) part += __shfl_xor_sync(PK_FULL, part, s);
      if (lane == 0) sc[t] = part * qscale;
    }
    __syncthreads();
    // phase 1b: online softmax update (every thread computes the chunk's max and sum: n <= 256)
    float mc = PK_NEG_INF;
    for (int t = 0; t < n; ++t) mc = fmaxf(mc, sc[t]);
    const float mn = fmaxf(m, mc);
    const float al = pk_exp2(m - mn);
    float lc = 0.f;
    for (int t = 0; t < n; ++t) lc += pk_exp2(sc[t] - mn);
    l = l * al + lc;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = tid + 128 * i;
      float acc = o[i] * al;
      if (d < D)
        for (int t = 0; t < n; ++t) acc += pk_exp2(sc[t] - mn) * pk_h2float(wv[kv_base + size_t(c0 + t) * D + d]);
      o[i] = acc;
    }
    m = mn;
    __syncthreads();
  }
  // phase 2: the splits' states
  const float* st = ws + (size_t(b) * Hq + head) * size_t(n_splits) * (D + 2);
  for (int s = 0; s < n_splits; ++s, st += D + 2) {
    const float ms = st[D];
    if (ms == PK_NEG_INF) continue;
    const float mn = fmaxf(m, ms);
    const float a1 = pk_exp2(m - mn), a2 = pk_exp2(ms - mn);
    l = l * a1 + st[D + 1] * a2;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = tid + 128 * i;
      o[i] = o[i] * a1 + (d < D ? st[d] : 0.f) * a2;
    }
    m = mn;
  }
  // phase 3
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = tid + 128 * i;
    if (d < D) out[(size_t(b) * Hq + head) * D + d] = pk_float2h(o[i] * inv);
  }
}

#ifndef __CUDACC_RTC__
// nvcc compile check (tests/test_kernels_compile.py); at run time nvrtc instantiates what is launched.
template __global__ void pk_attention_splits<64, 16>(const u16*, const u8*, const i64*, const int*, int, int, int, int,
                                                     int, int, int, float, float*);
template __global__ void pk_attention_splits<128, 16>(const u16*, const u8*, const i64*, const int*, int, int, int, int,
                                                      int, int, int, float, float*);
template __global__ void pk_attention_splits<128, 8>(const u16*, const u8*, const i64*, const int*, int, int, int, int,
                                                     int, int, int, float, float*);
template __global__ void pk_attention_splits<128, 32>(const u16*, const u8*, const i64*, const int*, int, int, int, int,
                                                      int, int, int, float, float*);
template __global__ void pk_merge_window<128>(const u16*, const u16*, const u16*, const int*, const float*, int, int,
                                              int, int, float, u16*);
#endif
