/*
packkv_attention.cu: fused decompress-attention for one decode step over a PackKV-compressed KV cache.

What it computes
  out[b, h, :] = softmax(q[b, h] . K^T / sqrt(D)) V over the compressed blocks of sequence b (records of
  the v1 format, docs/FORMAT.md, at arena + block_offsets[b, i], i < n_blocks[b]) and its fp16 window of
  window_len[b] recent tokens, for every query head h of every KV head's GQA group, q fp16 [B, Hq, D].
  Two launches: pk_attention_splits or pk_attention_tiles (flash-decoding: a CTA per (split of the
  blocks, KV head [, group tile of 8 query heads], sequence) writes one softmax state (m, l, o[D]) per
  query head and split) and pk_merge_window (a CTA per (query head, sequence): attention over the window,
  then the log-sum-exp merge of the window and all splits). The grid depends on the table's capacity
  (max_blocks), never on the lengths: a split past a sequence's end writes an empty state (m = -inf,
  l = 0). The two split kernels are one body (packkv_split.cuh) in two modes, chosen by the launcher
  from shapes only (attention_kernels.tile_mode): item mode (pk_attention_splits, a warp decodes whole
  items) for long contexts, tile mode (pk_attention_tiles, the CTA's 4 warps decode each item together
  by 16-channel tiles) when item mode would leave about one item per warp and most SMs idle (SmolLM2
  9/3/64 at 8K tokens: 16 splits x 3 heads = 48 CTAs, each warp decoding ~1 item from start to end,
  ~17.9K cycles by a PK_PROF build). Both write the same states.

Decode math (FORMAT.md section 4): x_hat[t, d] = (level[t, d] + off_t) * step_t, level = pack min + value.
  score_t = step_t * (q . level_t + off_t * sum(q)),   o = sum_t (p_t step_t) level_t + sum_t p_t step_t off_t.
  Levels are small integers, exact in fp16 (up to 2048, i.e. rel >= 1/2047), so q . level and p . level
  run on tensor cores (mma.sync m16n8k16, fp16 x fp16 -> fp32) on levels unpacked in registers.

Thread mapping, item mode (CTA = 4 warps; a warp owns whole "items" of 128 storage tokens = 8 groups of 16)
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
  Staging (warp w takes items w, w+4, w+8, ... of the split; per block of an item two 1-D bulk copies,
  the token-section span and the K+V span of the KV head, completing on the slot's mbarrier): with one
  slot per warp (SLOTS = 1, the default) item it+4's spans are prefetched into L2
  (cp.async.bulk.prefetch.L2) when item it starts and bulk-copied into the slot when it is done, so each
  item waits for one L2 -> shared copy, for the other 11 warps of the SM to cover; with two (SLOTS = 2,
  kept to compare: compressed_decode_attention(slots=2)) item it+4 is copied into the other slot while
  item it is decoded. q's B fragments are the same for the 4 warps: one copy per CTA.
  Splits (attention_kernels.splits_over): one wave of CTAs (3 per SM with one slot, 2 with two), every
  warp of a split the same whole number of items: the 8B shape at 128K x 1, 43 splits x 8 KV heads
  (6 items per warp; 2 slots: 32 splits, 8 per warp), at 32K x 8, 6 splits x 64 (11; 2 slots: 4, 16).
Tile mode (head_dim a multiple of 64; NT = D/64 tiles per warp): per item, once per CTA: staging (warp 0:
  the same bulk copies into the CTA's two slots, all threads wait on the mbarrier) and the token table
  (the last warp, 4 tokens per lane). Warp w decodes K tiles w*NT .. w*NT+NT-1 with the lane mapping above (lane
  (gq, tq): group gq, channels 16kt + 4tq .. +3), so it computes q.level over its channels for all 128
  tokens x 8 heads: 32 partial accumulators per lane, as many as item mode, with NT instead of KT
  tiles of runs and mma. Offsets: a warp scans its own tiles (quad scans as above, relative to its first
  tile) and writes its per-row total; after barrier (A) it adds the totals of the warps before it (the
  bytes of the row's packs in earlier channels) and takes the row total from all four. Partial scores
  -> shared memory; meanwhile the last warp fills the token table and each warp scans the V offsets of its
  tiles for both passes (row totals exchanged the same way); after barrier (B) every warp sums the four
  partials in the same order, scales them (step_k, off_k sum(q)) and runs the same online softmax, so
  m, l, oo and the weights (its own pbuf) are the same in all warps; then it decodes V for its own tiles
  only (disjoint output channels: no reduction). At the end warp w writes o of its channels and warp 0
  m and l into one state. Two barriers per item (128 tokens); warp 0 stages item it+1 after (A) of item
  it (every warp is then done with item it-1's slot); the item pipeline over a split's items is the same.
  Splits: up to 3 CTAs per SM with at least one item per split (8B shape at 4K: 32 splits x 8 heads).
NARROW builds (template flag of both split kernels): the split body without
  the wide unpack path. A pack wider than 4 bits needs a level above 15, which the quantizer cannot
  produce when every bound the records were encoded with is >= 1/14.98 (codec.max_level: levels <=
  1/rel + 1 up to fp32 rounding; the defaults 0.1/0.2 give 11 and 6). NARROW drops pk_run16_slow /
  pk_run8x2_slow and the branch around every run (12 inlined slow copies, ~700 static SASS, and a
  branch that keeps ptxas from interleaving runs) and the F > 16 header branch of pk_fields2/pk_width2
  (F <= 3 + 4 bits). Measured as code size only (nvcc 13.0 -cubin sm_90, /work/notes/split_kernel_study.md,
  item mode D=128 P=16): 4,344 -> 3,592 static SASS, 166 registers, no spills. Measured (H100, `python3
  bench/attention.py`, 65543e9, 8B shape, real K/V): 121.0 us per layer at 128K against 144.4 wide (1.19x;
  SDPA 181.0: 1.50x), 39.8 against 45.0 at 32K; random K/V 170.3 against 253.3 at 128K; SmolLM2's shape
  34.3 against 38.3 at 128K. The 8B decode step at 128K: 9764 us against 10469 (knockout, --narrow both),
  1.60x dense in bench/generate.py. The launcher takes `narrow` from its caller:
  PackkvCache passes cache.narrow (true only when every bound it encodes with, the cache's, each layer's
  and the sink bounds, has codec.max_pack_width <= 4); any other caller gets the wide build by default.
  The K/V GEMVs (packkv_gemv.cu) stay wide: they decode arbitrary arenas for the benchmarks.
Registers (nvcc 13.0 -cubin -arch=sm_90 -Xptxas -v; wide / NARROW build; no spills but NARROW P=32 one
  slot, 8 bytes): item mode with one slot, __launch_bounds__(128, 3): D=128 P=16 164 / 168, P=8 168 / 168,
  P=32 165 / 168, D=64 P=16 165 / 168; with two slots, (128, 2): D=128 P=16 167 / 179, P=8 185 / 198,
  P=32 168 / 181, D=64 165 / 176; tile mode (128, 3): D=128 P=16 145 / 140, P=8 158 / 168, P=32 143 / 142,
  D=64 129 / 137. 32 score accumulators, the decoded runs of one tile pair, softmax state.
Shared memory, item mode (packkv_common.cuh: pk_warp_smem): per CTA the q B-fragments (16 B per channel);
  per warp the staging slot(s) (a span that does not fit what is left of a slot is read from global
  memory instead), tile offsets and o accumulators per 16-channel tile (the tile loops are rolled to keep
  the code small), the fp16 weights (2.2 KB), a per-token table (1 KB), the item's section addresses
  (192 B per slot). One slot: 10,096 B at D=128, 76,800 B per CTA = what 3 CTAs per SM leave (228 KB, 1 KB
  reserved per CTA): 12 warps per SM; a real-K/V item (~7.6 KB) fits, a random one (~10.8 KB) overflows
  a little. Two slots: 9,808 B each, 115,648 B per CTA, 2 CTAs = 8 warps per SM. The CTA merges its
  warps' states in the same memory at the end.
  Tile mode: two slots per CTA (13.8 KB at D=128: a random-data item fits), token table, meta, partial
  scores 16 KB, scan totals; per warp pbuf and NT tiles of q fragments, offsets (K; V's two passes), o:
  62.7 KB at D=128, 45.8 KB at D=64: 3 CTAs = 12 warps per SM.
Bytes per token and layer (8 KV heads x 128, rel 0.1/0.2, token-layer, greedy, pack 16): 421 on the
  8B-shaped real K/V (1.65 bits per element, all bytes counted), 617 on random Gaussian (2.41); fp16: 4096.

Tile mode measured (H100 80GB HBM3): `pytest -m gpu tests/test_kernels_gpu.py` 100 passed, 11 skipped
  (9c737a1). Decode step, `python3 bench/step_profile.py --model smollm2-135m --context 7800 --caches dense
  packkv --pdl on --steps 350` (step_profile_smollm2-135m_tiles.json against _base.json, item mode, same
  session): graph 1125.7 -> 1049.7 us (dense 942.0), 830.8 -> 905.0 tok/s; the 8B shape at 4K
  (step_profile_llama-3.1-8b_tiles.json / _base.json): graph 7076 -> 6599 us, 139.2 -> 150.1 tok/s.
  TILE_ITEMS_PER_WARP (the crossover) is not tuned between the two regimes; at long contexts tile mode loses
  (`python bench/knockout.py --model llama-3.1-8b --kv-data real --tiles both`, knockout_llama-3.1-8b_128k.json
  and _32k_b8.json, 35151e0: this kernel 5784 against 4434 us per step at 128K x 1, 11441 against 9246 at
  32K x 8). Item mode below.
One slot per warp at 3 CTAs per SM, or two at 2: attention_kernels.item_slots takes one slot where its grid
  holds more than 2 CTAs per SM (with at most 2 the one slot adds no warps and loses the second buffer).
  Measured side by side (H100, 8B shape, real K/V, NARROW; `python3 bench/attention.py --slots 1 2` and
  `python3 bench/knockout.py --model llama-3.1-8b --kv-data real --slots both`, 676ebb6): 32K x 1 (256
  CTAs) 43.9 us one slot against 39.8 two; 128K x 1 (344 CTAs) 119.0 against 120.4, random K/V 145.4
  against 171.2 (its items overflow less); 32K x 8 (384 CTAs) the step's split kernel 7451 us against 8335.
Measured (H100 80GB HBM3, `python3 bench/attention.py --slots 1 2`, bench/results/attention.json, 1cc10cc:
  NARROW, item_slots' choice, the token table by 4 tokens per lane, the new window merge; one sequence,
  time per layer as a CUDA graph over layer copies larger than L2):
  32/8/128, 128K tokens: 110.3 us on the real-valued K/V (SDPA fp16 181.2 us: 1.64x; compressed bytes
  at 505 GB/s = 17% of the 3007 GB/s device copy), 135.5 us on random K/V; 32K: 33.0 us (SDPA 52.1:
  1.58x). 9/3/64 SmolLM2 real K/V, 128K: 27.0 us (SDPA 40.9). Below 32K (tile mode) 8.8-27 us against
  SDPA's 8-31. In the 8B decode step (bench/knockout.py, 1cc10cc): this kernel 3279 us at 128K x 1
  (step 9134, dense 15666: 1.72x), 7043 at 32K x 8 (step 13262, dense 25894: 1.95x). Targets (3x SDPA,
  70% of copy bandwidth) are NOT met: the kernel is issue/latency-bound on unpacking (the study: ~6.6
  instructions per element before NARROW and the token table, the integer ALU pipe the ceiling; ncu: IPC
  1.9 per SM with 8 warps, top stall "wait" = dependent ALU chains), not memory-bound.
  (5a886f7, wide build, two slots, before the token table: 145.6 us at 128K, 44.7 at 32K; 65543e9 NARROW:
  121.0 and 39.8.)

Attempts discarded:
  - fully unrolled tile loops with q fragments, offsets and o in registers (255 registers): 230 us; ncu's
    top stall was "no instruction" (3 cycles per issue): 9K+ instructions overflowed the instruction cache.
  - two decoder bodies, ld.shared for staged items / generic loads otherwise: 242 us (code size again).
  - o in registers with the V tile loop unrolled (frees 4 KB/warp so random items fit the slot): 164 us
    real / 308 us random, slower than o in shared memory (5.8K instructions).
  - __launch_bounds__(128, 3) for 12 warps per SM: spills, 292 us (an earlier body; later ones compile to
    <= 168 registers with no spills at 3 CTAs, and the two slots' 115.6 KB of shared memory per CTA was
    what kept it at 2 CTAs until the one-slot layout above). 66 splits instead of 33: 252 us.
  - per-lane 16-byte cp.async staging: 10% of the time in issuing copies; replaced by bulk copies (TMA).
  - pk_merge_window folding the splits' states in one round of loads (a thread per (channel pair, slice of
    the splits) merging online, one barrier instead of five after the wait; shared with dense's merge): the
    8B step at 128K went 10486 -> 10520 us (dense 15745 -> 15719) in graph replays side by side; the merge's
    ~6.8 us per layer (knockout) is its launch and its place in the chain, not its arithmetic.
  - one launch (each split CTA attends to its share of the window as a fifth state; the last split of a
    head tile, found by a counter, merges the states; 14cb4c2): no gain side by side with dense
    (bench/results/*_onelaunch.json: SmolLM2 8K packkv 726.5 vs dense 948.7 tok/s, before 721.0 vs 935.1;
    8B real K/V 128K 93.7 vs 64.1, 1.46x as before): the merge kernel's launch was not the cost.
*/
#include "packkv_split.cuh"
#include "launch.cuh"

// SLOTS: staging slots per warp (header: shared memory): 1, 3 CTAs per SM (the default), or 2, the
// double-buffered pipeline at 2 CTAs per SM (kept to compare the two: compressed_decode_attention(slots=2)).
template <int D, int P, bool NARROW = false, int SLOTS = 1>
__global__ void __launch_bounds__(128, SLOTS == 1 ? PK_MINB : PK_MINB_2SLOTS) pk_attention_splits(
    const u16* __restrict__ q, const u8* const* __restrict__ arena_at, const i64* __restrict__ block_offsets,
    const int* __restrict__ n_blocks, int max_blocks, int Hkv, int G, int T, int token_layer, int n_splits,
    int slot_bytes, float qscale, float* __restrict__ ws) {
  // The arena's address is read from device memory: a captured graph replays after the arena moved.
  // (The body waits for the previous kernel after it has started staging its first item.)
  pk_split_body<D, P, 0, false, NARROW, SLOTS>(q, nullptr, 0, *arena_at, block_offsets, n_blocks, max_blocks, Hkv, G,
                                               T, token_layer, n_splits, slot_bytes, qscale, ws);
}

// Tile mode (short contexts; D a multiple of 64): the same splits and states, the CTA's 4 warps decoding
// each item together by 16-channel tiles (header: thread mapping, tile mode).
template <int D, int P, bool NARROW = false>
__global__ void __launch_bounds__(128, PK_MINB_TILES) pk_attention_tiles(
    const u16* __restrict__ q, const u8* const* __restrict__ arena_at, const i64* __restrict__ block_offsets,
    const int* __restrict__ n_blocks, int max_blocks, int Hkv, int G, int T, int token_layer, int n_splits,
    int slot_bytes, float qscale, float* __restrict__ ws) {
  pk_split_body<D, P, 0, true, NARROW>(q, nullptr, 0, *arena_at, block_offsets, n_blocks, max_blocks, Hkv, G, T,
                               token_layer, n_splits, slot_bytes, qscale, ws);
}

// ---------------------------------------------------------------------------------------------------
// Merge: a CTA per (query head, sequence), PK_MERGE_THREADS threads (NW warps). The window's tokens and
// the splits' states are all "parts" of one softmax: a part has a max (a token's own score; a split's m),
// a sum (1; a split's l) and a vector (the token's v; a split's o). Each warp folds its share of the parts
// into one online-softmax state (PkPart), lane l holding the channel pairs l, l + 32, ... of o:
//   A. before the wait for the split kernel (launch.cuh: the kernel two launches back, which wrote q and
//      the step's K/V into the window, has finished by the time this one starts): warp w takes the window
//      tokens w, w + NW, ..., U at a time; per token the lanes load their pairs of k and v (a warp reads
//      the token's 2D bytes of each, coalesced), the score is a warp all-reduce of the lanes' partial dots
//      (the U tokens' reductions interleaved), and the token is folded in;
//   -- wait --
//   B. warp w folds the splits' states w, w + NW, ... (m, l, o[D] each);
//   C. the NW warp states through shared memory (one barrier); a thread per channel pair merges them and
//      writes out = o / L in fp16 (0 when nothing was attended).
// Bytes: the window's K and V once per query head (G reads of a KV head's window, from L2 after the first)
// and each split's state once.
// Measured (H100; 40 registers, 3 CTAs per SM): in the 8B decode step at 32K x 8 (`python3 bench/knockout.py
// --model llama-3.1-8b --context 32768 --batch 8 --kv-data real`, knockout_llama-3.1-8b_32k_b8.json) this
// kernel costs 201 us per step (split+merge knocked out against the split alone), the step 14465 us (dense
// 25911: 1.79x); the version before cost 895 of 15132 (65543e9's run; dense's merge 140). A scratch probe
// side by side (32 launches in a graph, 32/8/128, W window tokens): batch 1 (33 splits) W = 0 / 160: 2.05 /
// 3.19 us, before 2.82 / 6.89; batch 8 (4 splits): 1.66 / 5.20 us, before 4.24 / 17.40. The version before:
// 1024 threads, a thread per token for the scores (128-long dependent FMA chains), weights in shared
// memory, four block reductions, a thread per (channel pair, slice of the tokens) for o; one CTA per SM
// for lack of registers at batch 8.
// (Before that: one thread per channel walking the splits in a chain of dependent merges took 50 us per
// layer for 9/3/64 at 8K tokens with ~170 splits.)
// ---------------------------------------------------------------------------------------------------
#define PK_MERGE_THREADS 512
constexpr int PK_MERGE_WARPS = PK_MERGE_THREADS / 32;
constexpr int PK_MERGE_UNROLL = 4;                       // window tokens in flight per warp

// -inf for the class template below: a non-template function, so that nvcc's host pass, which parses the
// template's device code but has no __int_as_float, finds a declaration.
__device__ __forceinline__ float pk_neg_inf() { return PK_NEG_INF; }

// A warp's online-softmax state over the parts it has folded: max m, sum l, o (this lane's channel pairs).
template <int NP>
struct PkPart {
  float m, l;
  float2 o[NP];
  __device__ __forceinline__ PkPart() : m(pk_neg_inf()), l(0.f) {
#pragma unroll
    for (int j = 0; j < NP; ++j) o[j] = make_float2(0.f, 0.f);
  }
  // Fold in a part of max m2, sum l2 and vector o2 (an empty part, m2 = -inf, changes nothing).
  __device__ __forceinline__ void merge(float m2, float l2, const float2 (&o2)[NP]) {
    if (m2 == pk_neg_inf()) return;
    const float M = fmaxf(m, m2), a = pk_exp2(m - M), b = pk_exp2(m2 - M);   // exp2(-inf) = 0
    l = l * a + l2 * b;
#pragma unroll
    for (int j = 0; j < NP; ++j) o[j] = make_float2(o[j].x * a + o2[j].x * b, o[j].y * a + o2[j].y * b);
    m = M;
  }
};

template <int D>
__global__ void __launch_bounds__(PK_MERGE_THREADS) pk_merge_window(
    const u16* __restrict__ q, const u16* __restrict__ wk, const u16* __restrict__ wv,
    const int* __restrict__ window_len, const float* __restrict__ ws, int n_splits, int Hkv, int G, int W_cap,
    float qscale, u16* __restrict__ out) {
  constexpr int PAIRS = D / 2, NP = (PAIRS + 31) / 32, NW = PK_MERGE_WARPS, U = PK_MERGE_UNROLL;
  __shared__ float part_m[NW], part_l[NW];
  __shared__ float2 part_o[NW][PAIRS];
  const int head = blockIdx.x, b = blockIdx.y, kvh = head / G, Hq = Hkv * G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto has = [&](int j) { return lane + 32 * j < PAIRS; };   // this lane's j-th channel pair exists
  float2 qp[NP];
  const u32* qrow = reinterpret_cast<const u32*>(q + (size_t(b) * Hq + head) * D);
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const u32 x = has(j) ? qrow[lane + 32 * j] : 0u;
    qp[j] = make_float2(pk_h2float(u16(x)) * qscale, pk_h2float(u16(x >> 16)) * qscale);
  }
  int W = window_len[b];
  W = W < 0 ? 0 : (W > W_cap ? W_cap : W);
  const size_t kv_base = (size_t(b) * Hkv + kvh) * size_t(W_cap) * PAIRS;
  const u32* k32 = reinterpret_cast<const u32*>(wk) + kv_base;
  const u32* v32 = reinterpret_cast<const u32*>(wv) + kv_base;
  PkPart<NP> part;

  // ---- A. the window's tokens (scores in the log2 domain) -----------------------------------------
  for (int t0 = warp; t0 < W; t0 += NW * U) {
    u32 kx[U][NP], vx[U][NP];                             // all U tokens' loads first: one latency
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * NW;                          // warp-uniform: no divergence at the shuffles
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const bool in = t < W && has(j);
        kx[u][j] = in ? k32[size_t(t) * PAIRS + lane + 32 * j] : 0u;
        vx[u][j] = in ? v32[size_t(t) * PAIRS + lane + 32 * j] : 0u;
      }
    }
    float score[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      score[u] = 0.f;
#pragma unroll
      for (int j = 0; j < NP; ++j)
        score[u] += qp[j].x * pk_h2float(u16(kx[u][j])) + qp[j].y * pk_h2float(u16(kx[u][j] >> 16));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) score[u] += __shfl_xor_sync(PK_FULL, score[u], off);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (t0 + u * NW >= W) break;
      float2 v[NP];
#pragma unroll
      for (int j = 0; j < NP; ++j) v[j] = make_float2(pk_h2float(u16(vx[u][j])), pk_h2float(u16(vx[u][j] >> 16)));
      part.merge(score[u], 1.f, v);
    }
  }

  wait_for_previous_kernel();                         // the splits' states
  // ---- B. the splits' states --------------------------------------------------------------------------
  const float* state = ws + (size_t(b) * Hq + head) * size_t(n_splits) * (D + 2);
  for (int s = warp; s < n_splits; s += NW) {
    const float* st = state + size_t(s) * (D + 2);
    float2 o[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) o[j] = has(j) ? reinterpret_cast<const float2*>(st)[lane + 32 * j] : float2{};
    part.merge(st[D], st[D + 1], o);
  }
  // ---- C. the warps' states -> out --------------------------------------------------------------------
  if (lane == 0) { part_m[warp] = part.m; part_l[warp] = part.l; }
#pragma unroll
  for (int j = 0; j < NP; ++j)
    if (has(j)) part_o[warp][lane + 32 * j] = part.o[j];
  __syncthreads();
  const int pair = threadIdx.x;
  if (pair < PAIRS) {
    float M = PK_NEG_INF;
    for (int w = 0; w < NW; ++w) M = fmaxf(M, part_m[w]);
    float L = 0.f;
    float2 o = make_float2(0.f, 0.f);
    if (M != PK_NEG_INF) {
      for (int w = 0; w < NW; ++w) {
        const float a = pk_exp2(part_m[w] - M);       // 0 for a warp that folded nothing
        L += part_l[w] * a;
        o.x += part_o[w][pair].x * a;
        o.y += part_o[w][pair].y * a;
      }
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    u16* dst = out + (size_t(b) * Hq + head) * D + 2 * pair;
    dst[0] = pk_float2h(o.x * inv);
    dst[1] = pk_float2h(o.y * inv);
  }
}

#ifndef __CUDACC_RTC__
// nvcc compile check (tests/test_kernels_compile.py); at run time nvrtc instantiates what is launched.
// Both modes of the split kernel, wide and NARROW builds, for each (head_dim, pack) the tests launch.
#define PK_INSTANTIATE_SPLITS(D, P, N)                                                                         \
  template __global__ void pk_attention_splits<D, P, N>(const u16*, const u8* const*, const i64*, const int*, \
                                                        int, int, int, int, int, int, int, float, float*);   \
  template __global__ void pk_attention_splits<D, P, N, 2>(const u16*, const u8* const*, const i64*,          \
                                                           const int*, int, int, int, int, int, int, int, float, \
                                                           float*);                                            \
  template __global__ void pk_attention_tiles<D, P, N>(const u16*, const u8* const*, const i64*, const int*,  \
                                                       int, int, int, int, int, int, int, float, float*);
PK_INSTANTIATE_SPLITS(64, 16, false)
PK_INSTANTIATE_SPLITS(128, 16, false)
PK_INSTANTIATE_SPLITS(128, 8, false)
PK_INSTANTIATE_SPLITS(128, 32, false)
PK_INSTANTIATE_SPLITS(64, 16, true)
PK_INSTANTIATE_SPLITS(128, 16, true)
PK_INSTANTIATE_SPLITS(128, 8, true)
PK_INSTANTIATE_SPLITS(128, 32, true)
template __global__ void pk_merge_window<64>(const u16*, const u16*, const u16*, const int*, const float*, int, int,
                                             int, int, float, u16*);
template __global__ void pk_merge_window<128>(const u16*, const u16*, const u16*, const int*, const float*, int, int,
                                              int, int, float, u16*);
#endif
