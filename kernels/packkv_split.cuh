// packkv_split.cuh: the body of the split kernels (fused decode attention, K-GEMV, V-GEMV), included by
// packkv_attention.cu and packkv_gemv.cu. Read packkv_attention.cu's header first: it describes the
// thread mapping that this file implements.
//
// Token table and K pack widths (/work/notes/split_kernel_study.md proposals 2 and the width-sum part of
// 4; the compressed format and the results are unchanged; measured in the 8B decode step at 32K x 8, real
// K/V, one slot per warp: the split kernel 7451 us without (676ebb6) and 7043 with it (1cc10cc), bench/
// knockout.py in two calls of one session, not side by side):
//   - pk_token_table: a lane fills 4 consecutive tokens of one block (header read once, two 32-bit loads
//     for 4 steps of K and of V, 4 offsets of K and of V from one 64-bit window each, pk_fields4), where
//     each lane of a warp (or of the CTA in tile mode) filled one token per entry with its own header,
//     u16 step and offset-window loads. Tile mode: the last warp fills it alone (was all 4 warps).
//   - pk_group: group -> (block, group in block) by shifts (T < 128 is 16, 32 or 64); the runtime
//     divisions gi / NG, gi % NG of the table, the K phase, the V passes and their scans are gone.
//   - pk_sizes of 4 packs (the K offset scan): pk_width4 sums the 4 widths from one header window (two
//     windows before; the V scan's 2 packs already took one).
//   nvcc 13.0 -cubin -arch=sm_90, static SASS (.text / 16), pk_attention_splits<128, 16>: NARROW 3,608 ->
//   3,168, wide 4,360 -> 4,000 (the table alone 400 -> ~104, all executed once per 128-token item and
//   lane); the other splits instances -7% to -12%, tile mode -1% to -4%. Registers at PK_MINB=2 rise
//   (NARROW 168 -> 179-181, P=8 198 -> 205: still 2 CTAs per SM); at PK_MINB=3 all fit 168, no spills.
//   Estimate: ~500 fewer of ~6,800 dynamic instructions per lane and item (D=128, P=16).
#pragma once
#include "packkv_common.cuh"
#include "launch.cuh"
#pragma nv_diag_suppress 177   // variables of the pack-8 path are unused in other instantiations

#define PK_NEG_INF (-__int_as_float(0x7f800000))
#ifndef PK_MINB
#define PK_MINB 3          // __launch_bounds__ min CTAs per SM of the fused kernel, one staging slot per warp
#endif                     // (<= 168 registers; 76.8 KB of shared memory per CTA)
#ifndef PK_MINB_2SLOTS
#define PK_MINB_2SLOTS 2   // the fused kernel with two slots per warp (double-buffered; smem allows 2)
#endif
#ifndef PK_MINB_TILES
#define PK_MINB_TILES 3    // the fused kernel's tile mode: 3 CTAs = 12 warps per SM (<= 168 registers)
#endif
#ifndef PK_MINB_GEMV
#define PK_MINB_GEMV 3     // the GEMV kernels: 3 CTAs per SM (<= 170 registers; their slots are sized for it)
#endif

// PK_PROF: per-phase clock64() totals of every warp, summed into pk_prof[] (diagnostics only).
#ifdef PK_PROF
__device__ unsigned long long pk_prof[16];
#define PK_TICK(i) do { long long _t = clock64(); prof[i] += _t - prof_last; prof_last = _t; } while (0)
#else
#define PK_TICK(i) do { } while (0)
#endif

__device__ __forceinline__ float2 pk_h2f(u32 x) {
  return make_float2(pk_h2float(u16(x & 0xffffu)), pk_h2float(u16(x >> 16)));
}
__device__ __forceinline__ u32 pk_f2h2(float lo, float hi) {
  return u32(pk_float2h(lo)) | (u32(pk_float2h(hi)) << 16);
}

// One run (16 storage tokens of one channel) of a pack row layout P, fast path when the widths allow.
// NARROW (packkv_attention.cu's header): every pack is at most 4 bits wide (the host guarantees it), so
// only the fast path is compiled: no slow-path copies, no branch around each run.
template <int P, bool NARROW = false>
__device__ __forceinline__ void pk_decode_run(const u8* pa, u32 wa, int ma, const u8* pb, u32 wb, int mb, u32 out[8]) {
  if constexpr (P == 8) {
    if constexpr (NARROW) pk_run8x2_fast(pa, wa, ma, pb, wb, mb, out);
    else if (__builtin_expect(wa <= 4 && wb <= 4, 1)) pk_run8x2_fast(pa, wa, ma, pb, wb, mb, out);
    else pk_run8x2_slow(pa, wa, ma, pb, wb, mb, out);
  } else {
    if constexpr (NARROW) pk_run16_fast(pa, wa, ma, out);
    else if (__builtin_expect(wa <= 4, 1)) pk_run16_fast(pa, wa, ma, out);
    else pk_run16_slow(pa, wa, ma, out);
  }
}

template <bool SH>
__device__ __forceinline__ const u8* pk_at(const u8* smem, u64 v) {
  if constexpr (SH) return smem + u32(v);        // shared window: the compiler emits ld.shared
  else return reinterpret_cast<const u8*>(v);
}

// Group gi (16 storage tokens) of the item -> its block in the item (bs) and its group in that block
// (gib). NG = T/16 groups per block: NG >= 8 (T >= 128) is one block per item; otherwise T is 16, 32 or
// 64 (attention_kernels._check_params), so NG is a power of 2, lgNG = log2(NG): shifts, no division.
__device__ __forceinline__ void pk_group(int gi, int NG, int lgNG, int& bs, int& gib) {
  bs = NG >= 8 ? 0 : gi >> lgNG;
  gib = NG >= 8 ? gi : gi & (NG - 1);
}

// Token parameters of the 8 groups (128 storage tokens) of sub-iteration `sub` of the staged item:
// ttab[group * 16 + t] = (step_k | step_v << 16 as fp16 bits, off_k | off_v << 16 as int16).
// One warp fills it: lane l the 4 consecutive tokens 4l .. 4l+3, which lie in one block (blocks are
// multiples of 16 tokens), so the lane reads the block's header once, the 4 K and 4 V steps with two
// 32-bit loads each (the token section is only 4-aligned) and the 4 K and 4 V offsets each from one
// 64-bit window (pk_fields4); two 16-byte stores.
template <bool SH>
__device__ __forceinline__ void pk_token_table(const PkWarpSmem& ws, const u8* smem, int slot, int sub, int T, int NG,
                                               int lgNG, int lane, int blk0, int blk_hi) {
  int bs, gib;
  pk_group(sub * 8 + (lane >> 2), NG, lgNG, bs, gib);
  uint4 e01 = make_uint4(0u, 0u, 0u, 0u), e23 = e01;
  if (blk0 + bs < blk_hi) {
    const u32 tb = u32(gib * 16 + 4 * (lane & 3));   // the first token in the block
    const u8* tok = pk_at<SH>(smem, ws.meta[(slot * PK_NBMAX + bs) * 3 + 0]);
    const u32 hdr0 = pk_ld32(tok), hdr1 = pk_ld32(tok + 4);
    const u32 kb = hdr1 & 0xffu, vb = (hdr1 >> 8) & 0xffu;
    const u8* sk = tok + 8 + 2 * tb;
    const u32 sk01 = pk_ld32(sk), sk23 = pk_ld32(sk + 4), sv01 = pk_ld32(sk + 2 * T), sv23 = pk_ld32(sk + 2 * T + 4);
    // the offset streams, addressed from tok (4-aligned) in bits: K at byte 8 + 4T, V T*kb bits on
    const u32 kbit = 8u * (8u + 4u * u32(T));
    u32 fk[4], fv[4];
    pk_fields4(tok, kbit + tb * kb, kb, fk);
    pk_fields4(tok, kbit + u32(T) * kb + tb * vb, vb, fv);
    // offset = base + field, kept to 16 bits: k from the low half of hdr0 + fk, v from the high half of
    // hdr0 + (fv << 16) (no carry reaches the half that is kept)
    u32 o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = __byte_perm(hdr0 + fk[j], hdr0 + (fv[j] << 16), 0x7610);
    e01 = make_uint4(__byte_perm(sk01, sv01, 0x5410), o[0], __byte_perm(sk01, sv01, 0x7632), o[1]);
    e23 = make_uint4(__byte_perm(sk23, sv23, 0x5410), o[2], __byte_perm(sk23, sv23, 0x7632), o[3]);
  }
  uint4* dst = reinterpret_cast<uint4*>(ws.ttab) + 2 * lane;
  dst[0] = e01;
  dst[1] = e23;
}

// Rows of the pack layout that group `gib` (16 tokens) of a block covers.
template <int P>
__device__ __forceinline__ void pk_rows(int gib, int& ra, int& rb, int& half) {
  if constexpr (P == 8) { ra = 2 * gib; rb = 2 * gib + 1; half = 0; }
  else if constexpr (P == 16) { ra = gib; rb = gib; half = 0; }
  else { ra = gib >> 1; rb = ra; half = gib & 1; }
}

// Sum of payload bytes of NC (2 or 4) adjacent packs starting at channel c0 of row r (P=8: two rows, a | b << 16).
template <int P, int NC, bool NARROW = false>
__device__ __forceinline__ u32 pk_sizes(const PkSection& S, int D, int ra, int rb, u32 c0) {
  static_assert(NC == 2 || NC == 4, "pk_sizes: 2 or 4 packs");
  auto widths = [&](int r) -> u32 {
    const u32 i = u32(r) * D + c0;
    if constexpr (NC == 4) return pk_width4<NARROW>(S, i);
    u32 w0, w1;
    pk_width2<NARROW>(S, i, w0, w1);
    return w0 + w1;
  };
  if constexpr (P == 8) return widths(ra) | (widths(rb) << 16);
  else return widths(ra) * u32(P / 8);
}

template <int P>
__device__ __forceinline__ u32 pk_row_contrib(u32 tot, int gib) {
  u32 ta = tot & 0xffffu, tb = tot >> 16;
  if constexpr (P == 8) return ta + tb;
  else if constexpr (P == 16) return ta;
  else return (gib & 1) ? 0u : ta;
}

template <bool B> struct PkBool { static constexpr bool value = B; };

// The rows and section of one V pass (lane (gq, tq) decodes group 4 * pass + tq of the sub-iteration).
struct PkPass {
  PkSection S;
  int ra, rb, half;
  int gib, blk;      // the group in its block, the block
};

// MODE 0: fused decode attention -> per-split softmax states; 1: K-GEMV scores; 2: V-GEMV partial sums.
// TILES (tile mode; MODE 0, D a multiple of 64): the CTA's 4 warps decode each item together, warp w the
// 16-channel tiles w*NT .. w*NT+NT-1 (NT = D/64) of K and of V; otherwise a warp decodes whole items.
// NARROW: every pack of every record read is at most 4 bits wide (levels <= 15; the host's guarantee):
// the build without the wide unpack path (pk_decode_run, pk_fields2, pk_width2).
// SLOTS (item mode): staging slots per warp. 2: item it+ISTEP is copied into the other slot while item it
// is decoded. 1: item it+ISTEP is prefetched into L2 while item it is decoded and copied into the slot
// when item it is done (shared memory for 3 CTAs per SM instead of 2). Tile mode: two slots per CTA.
template <int D, int P, int MODE, bool TILES = false, bool NARROW = false, int SLOTS = 2>
__device__ __forceinline__ void pk_split_body(
    const u16* __restrict__ q, const void* __restrict__ pw, int p_half,
    const u8* __restrict__ arena, const i64* __restrict__ block_offsets, const int* __restrict__ n_blocks,
    int max_blocks, int Hkv, int G, int T, int token_layer, int n_splits, int slot_bytes, float qscale,
    float* __restrict__ out) {
  constexpr int KT = D / 16;
  static_assert(!TILES || (MODE == 0 && KT % PK_WARPS == 0), "tile mode: the fused kernel, D a multiple of 64");
  static_assert(SLOTS == 2 || (SLOTS == 1 && !TILES), "one or two slots per warp (item mode), two per CTA (tiles)");
  constexpr bool ONE_SLOT = SLOTS == 1;
  constexpr int NT = TILES ? KT / PK_WARPS : KT;   // the 16-channel tiles a warp decodes
  constexpr int ISTEP = TILES ? 1 : PK_WARPS;      // the CTA's items: all warps on each / a warp on every 4th
  extern __shared__ __align__(16) u8 smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
  const int ntile = (G + 7) >> 3;
  const int split = blockIdx.x, kvh = blockIdx.y / ntile, nt = blockIdx.y % ntile, b = blockIdx.z;
  const int Hq = Hkv * G;
  const int NG = T >> 4, R = T / P;
  const int lgNG = 31 - __clz(NG);             // log2(NG) where NG < 8 (pk_group)
  const int NB = T >= 128 ? 1 : 128 / T;
  const int SUBS = T >= 128 ? T >> 7 : 1;
  int nb = n_blocks[b];
  nb = nb < 0 ? 0 : (nb > max_blocks ? max_blocks : nb);
  int bps = (nb + n_splits - 1) / n_splits;
  bps = (bps + NB - 1) / NB * NB;
  const int blk_lo = split * bps, blk_hi = min(nb, blk_lo + bps);
  const int n_items = blk_hi > blk_lo ? (blk_hi - blk_lo + NB - 1) / NB : 0;
  const int t0 = TILES ? warp * NT : 0;        // the warp's first tile
  const int it0 = TILES ? 0 : warp;            // the warp's first item
  const bool stager = !TILES || warp == 0;     // the warp that stages the items and owns the mbarriers
  const PkWarpSmem ws = TILES ? pk_tile_smem(smem, warp, slot_bytes, NT) : pk_warp_smem(smem, warp, slot_bytes, KT, MODE, SLOTS);
  const int hg = nt * 8 + gq;                  // head (in the KV group) of n-slot gq / B-operand column
  const int hc0 = nt * 8 + 2 * tq;             // heads of the accumulator columns 2tq, 2tq+1
  const i64* offs_b = block_offsets + size_t(b) * max_blocks;

  float m0 = PK_NEG_INF, m1 = PK_NEG_INF, l0 = 0.f, l1 = 0.f, oo0 = 0.f, oo1 = 0.f, oog = 0.f;
  if constexpr (MODE != 1)
    for (int mt = 0; mt < NT; ++mt) ws.obuf[mt * 32 + lane] = make_float4(0.f, 0.f, 0.f, 0.f);

  if (stager) {
    if (lane < PK_ZERO_BYTES / 4) reinterpret_cast<u32*>(ws.zero)[lane] = 0u;
    if (lane == 0) for (int i = 0; i < SLOTS; ++i) pk_mbar_init(ws.bar + i);
  }
  __syncwarp();
#ifdef PK_PROF
  long long prof[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, prof_last = clock64();
#endif

  auto item_rec = [&](int item) -> const u8* {
    int blk = blk_lo + item * NB + lane;
    if (lane >= NB || item >= n_items || blk >= blk_hi) return nullptr;
    return arena + offs_b[blk];
  };

  // ---- Phase 1: prologue of the staging pipeline (item it+ISTEP staged while item it is decoded, or with
  //      one slot prefetched into L2 then and staged after it; the section tables of item it+2*ISTEP and
  //      the block offsets of item it+3*ISTEP are loaded ahead). It runs before the wait for the previous
  //      kernel (launch.cuh): the arena, its offset table and n_blocks change only between graph replays
  //      (compress events), so the first item's bytes are on their way while the previous kernel finishes.
  PkBlockMeta bm{}, bm_next{};
  const u8* rec_pf = nullptr;
  if (stager && it0 < n_items) {
    bm = pk_block_meta(item_rec(it0), kvh, Hkv, token_layer);
    pk_stage_item(ws, smem, 0, slot_bytes, bm, NB, MODE, lane);
    bm_next = pk_block_meta(item_rec(it0 + ISTEP), kvh, Hkv, token_layer);
    rec_pf = item_rec(it0 + 2 * ISTEP);
  }
  wait_for_previous_kernel();                  // q is the previous kernel's output

  // ---- Phase 0: q as mma B fragments (k-slots 2tq..2tq+1 | 2tq+8..9 <-> channels 4tq..4tq+3 of a tile)
  //      of the warp's tiles (item mode: of all tiles, one buffer per CTA, tile kt stored by warp kt % 4);
  //      sum(q) over all channels
  float sumq0 = 0.f, sumq1 = 0.f;
  if constexpr (MODE != 2) {
    float part = 0.f;
    const u16* qrow = q + (size_t(b) * Hq + size_t(kvh) * G + hg) * D;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      uint2 v = make_uint2(0u, 0u);
      if (hg < G) v = *reinterpret_cast<const uint2*>(qrow + 16 * kt + 4 * tq);
      if (TILES ? kt >= t0 && kt < t0 + NT : kt % PK_WARPS == warp) ws.qbuf[(kt - t0) * 32 + lane] = v;
      float2 f0 = pk_h2f(v.x), f1 = pk_h2f(v.y);
      part += (f0.x + f0.y) + (f1.x + f1.y);
    }
    part += __shfl_xor_sync(PK_FULL, part, 1);
    part += __shfl_xor_sync(PK_FULL, part, 2);
    sumq0 = __shfl_sync(PK_FULL, part, (2 * tq) * 4);
    sumq1 = __shfl_sync(PK_FULL, part, (2 * tq + 1) * 4);
  }
  // tile mode: warp 0's mbarrier init, zero section, first item's meta; item mode: the CTA's q fragments
  if constexpr (TILES || MODE != 2) __syncthreads();

  if (it0 < n_items) {
    int k = 0;
    for (int it = it0; it < n_items; it += ISTEP, ++k) {
      const int slot = ONE_SLOT ? 0 : k & 1;
      const int nb_next = (it + ISTEP < n_items) ? NB : 0;
      PK_TICK(0);
      auto stage_next = [&]() {
        pk_stage_item(ws, smem, ONE_SLOT ? 0 : slot ^ 1, slot_bytes, bm_next, nb_next, MODE, lane);
        bm_next = pk_block_meta(rec_pf, kvh, Hkv, token_layer);
        rec_pf = item_rec(it + 3 * ISTEP);
      };
      // two slots: item it+ISTEP into the other slot now (tile mode: warp 0 after barrier (A), when slot^1
      // is free); one slot: into L2 now, into the slot after this item
      if constexpr (ONE_SLOT) pk_prefetch_item(bm_next, nb_next, MODE, lane);
      else if constexpr (!TILES) stage_next();
      PK_TICK(1);
      pk_mbar_wait(ws.bar + slot, ONE_SLOT ? u32(k) & 1u : u32(k >> 1) & 1u);
      __syncwarp();
      PK_TICK(2);
      const u64* meta = ws.meta + slot * PK_NBMAX * 3;
      u32 carryK = 0, carryV = 0;
      // The item's body, compiled twice: SH when every span of the item is in shared memory (ld.shared
      // with 32-bit addresses), generic loads otherwise (a span was read from global memory).
      auto body = [&](auto sh_tag) {
      constexpr bool SH = decltype(sh_tag)::value;
      // V pass vp of sub-iteration sub: lane (gq, tq) decodes group 4vp+tq, channels 16mt + 2gq, +1
      auto v_pass = [&](int sub, int vp) -> PkPass {
        PkPass ps;
        int bsv;
        pk_group(sub * 8 + 4 * vp + tq, NG, lgNG, bsv, ps.gib);
        ps.blk = blk_lo + it * NB + bsv;
        ps.S = pk_section(pk_at<SH>(smem, meta[bsv * 3 + 2]), R, D);
        pk_rows<P>(ps.gib, ps.ra, ps.rb, ps.half);
        return ps;
      };
      // V payload offsets of the lane's packs in the warp's tiles within their row, from the warp's first
      // tile on, to offbuf[ob + mt]: sizes of 2 packs per lane, scan over the 8 lanes (gq) sharing a row.
      // Returns the row's bytes in the warp's tiles (all of the row's bytes but in tile mode).
      auto v_offsets = [&](const PkPass& ps, int ob) -> u32 {
        u32 run = 0;
#pragma unroll 1
        for (int mt = 0; mt < NT; mt += (P == 8 ? 1 : 2)) {
          const u32 c = u32(16 * (t0 + mt) + 2 * gq);
          u32 v = pk_sizes<P, 2, NARROW>(ps.S, D, ps.ra, ps.rb, c);
          if (P != 8 && mt + 1 < NT) v |= pk_sizes<P, 2, NARROW>(ps.S, D, ps.ra, ps.rb, c + 16u) << 16;
          u32 incl = v;
#pragma unroll
          for (int d = 1; d < 8; d <<= 1) {
            u32 y = __shfl_up_sync(PK_FULL, incl, 4 * d);
            if (gq >= d) incl += y;
          }
          u32 tot = __shfl_sync(PK_FULL, incl, 28 + tq), excl = incl - v;
          u32* o = ws.offbuf + (ob + mt) * 32 + lane;
          if constexpr (P == 8) { o[0] = run + excl; run += tot; }
          else {
            o[0] = run + (excl & 0xffffu); run += tot & 0xffffu;
            if (mt + 1 < NT) { o[32] = run + (excl >> 16); run += tot >> 16; }
          }
        }
        return run;
      };
      for (int sub = 0; sub < SUBS; ++sub) {
        float alpha0 = 1.f, alpha1 = 1.f;
        if constexpr (!TILES) {                 // tile mode: the last warp fills it after the K mma
          pk_token_table<SH>(ws, smem, slot, sub, T, NG, lgNG, lane, blk_lo + it * NB, blk_hi);
          __syncwarp();
        }
        PK_TICK(3);

        if constexpr (MODE != 2) {
          // ---- Phase 2 (K): lane (gq, tq) decodes group gq (16 tokens), channels 16kt + 4tq .. +3 of the
          //      warp's tiles kt
          int bs, gib;
          pk_group(sub * 8 + gq, NG, lgNG, bs, gib);
          const bool gvalid = blk_lo + it * NB + bs < blk_hi;
          const PkSection S = pk_section(pk_at<SH>(smem, meta[bs * 3 + 1]), R, D);
          int ra, rb, half;
          pk_rows<P>(gib, ra, rb, half);
          // 2a: payload offsets: sizes of the lane's 4 packs per tile, quad scan, running tile totals
          u32 run = 0;
#pragma unroll 1
          for (int kt = 0; kt < NT; kt += (P == 8 ? 1 : 2)) {
            const u32 c = u32(16 * (t0 + kt) + 4 * tq);
            u32 v = pk_sizes<P, 4, NARROW>(S, D, ra, rb, c);
            if (P != 8 && kt + 1 < NT) v |= pk_sizes<P, 4, NARROW>(S, D, ra, rb, c + 16u) << 16;
            u32 incl = v, y;
            y = __shfl_up_sync(PK_FULL, incl, 1, 4); if (tq >= 1) incl += y;
            y = __shfl_up_sync(PK_FULL, incl, 2, 4); if (tq >= 2) incl += y;
            u32 tot = __shfl_sync(PK_FULL, incl, 3, 4), excl = incl - v;
            if constexpr (P == 8) { ws.offbuf[kt * 32 + lane] = run + excl; run += tot; }
            else {
              ws.offbuf[kt * 32 + lane] = run + (excl & 0xffffu); run += tot & 0xffffu;
              if (kt + 1 < NT) { ws.offbuf[(kt + 1) * 32 + lane] = run + (excl >> 16); run += tot >> 16; }
            }
          }
          // tile mode: the row's bytes before the warp's first tile (koff) and the row total, from every
          // warp's total of its tiles
          u32 koff = 0;
          if constexpr (TILES) {
            if (tq == 0) ws.xchg[warp * 8 + gq] = run;
            __syncthreads();   // (A) the totals; every warp is done with the previous item (slot ^ 1, ttab)
            if (sub == 0 && warp == 0) stage_next();
            run = 0;
#pragma unroll
            for (int w = 0; w < PK_WARPS; ++w) {
              const u32 x = ws.xchg[w * 8 + gq];
              koff += w < warp ? x : 0u;
              run += x;
            }
          }
          // 2b: row bases: exclusive scan of row totals over the groups of the block (quads)
          u32 c = pk_row_contrib<P>(run, gib);
          const int pos = NG >= 8 ? gq : gq & (NG - 1);
          u32 v = c;
#pragma unroll
          for (int d = 1; d < 8; d <<= 1) {
            u32 y = __shfl_up_sync(PK_FULL, v, 4 * d);
            if (pos >= d) v += y;
          }
          const u32 tot_a = run & 0xffffu;
          u32 base_a = v - c + carryK;
          if (NG > 8) carryK += __shfl_sync(PK_FULL, v, 28);
          if (P == 32 && (gib & 1)) base_a -= tot_a;
          const u32 base_b = base_a + tot_a;
          PK_TICK(4);

          // 2c: decode 4 runs per tile into half2 pairs, transpose pairs with PRMT, 8 mma per tile
          float acc[8][4];
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 2
          for (int kt = 0; kt < NT; ++kt) {
            const u32 c0 = u32(16 * (t0 + kt) + 4 * tq);
            const u32 offk = ws.offbuf[kt * 32 + lane] + koff;
            const uint2 qv = ws.qbuf[kt * 32 + lane];
            u32 w[4], wb[4] = {0, 0, 0, 0};
            int mn[4], mnb[4] = {0, 0, 0, 0};
            pk_fields2<NARROW>(S, u32(ra) * D + c0, w[0], mn[0], w[1], mn[1]);
            pk_fields2<NARROW>(S, u32(ra) * D + c0 + 2, w[2], mn[2], w[3], mn[3]);
            if constexpr (P == 8) {
              pk_fields2<NARROW>(S, u32(rb) * D + c0, wb[0], mnb[0], wb[1], mnb[1]);
              pk_fields2<NARROW>(S, u32(rb) * D + c0 + 2, wb[2], mnb[2], wb[3], mnb[3]);
            }
            u32 pr[4][8];
            if constexpr (P == 8) {
              const u8* oa = S.payload + base_a + (offk & 0xffffu);
              const u8* ob = S.payload + base_b + (offk >> 16);
#pragma unroll
              for (int kk = 0; kk < 4; ++kk) {
                pk_decode_run<8, NARROW>(oa, w[kk], mn[kk], ob, wb[kk], mnb[kk], pr[kk]);
                oa += w[kk];
                ob += wb[kk];
              }
            } else {
              const u8* op = S.payload + base_a + offk;
#pragma unroll
              for (int kk = 0; kk < 4; ++kk) {
                pk_decode_run<P, NARROW>(op + (P == 32 ? half * 2 * w[kk] : 0u), w[kk], mn[kk], nullptr, 0, 0, pr[kk]);
                op += (P / 8) * w[kk];
              }
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              u32 a0 = __byte_perm(pr[0][j], pr[1][j], 0x5410), a1 = __byte_perm(pr[0][j], pr[1][j], 0x7632);
              u32 a2 = __byte_perm(pr[2][j], pr[3][j], 0x5410), a3 = __byte_perm(pr[2][j], pr[3][j], 0x7632);
              pk_mma(acc[j], a0, a1, a2, a3, qv.x, qv.y);
            }
          }

          PK_TICK(5);
          if constexpr (TILES) {
            // partial scores (q.level over the warp's channels) -> shared memory; meanwhile the last warp
            // fills the token table and each warp scans the V offsets of its tiles (both passes) and publishes
            // their row totals; after (B) every warp sums the 4 partials in the same order, so that all
            // warps compute the same scores, softmax and weights.
#pragma unroll
            for (int j = 0; j < 8; ++j)
              ws.part[(warp * 8 + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
            if (warp == PK_WARPS - 1)   // the last warp: warp 0 also stages
              pk_token_table<SH>(ws, smem, slot, sub, T, NG, lgNG, lane, blk_lo + it * NB, blk_hi);
#pragma unroll 1
            for (int vp = 0; vp < 2; ++vp) {
              const u32 r = v_offsets(v_pass(sub, vp), vp * NT);
              if (gq == 0) ws.xchg[32 + (vp * PK_WARPS + warp) * 4 + tq] = r;
            }
            __syncthreads();   // (B) partial scores, token table, V totals
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              float4 x = ws.part[j * 32 + lane];
#pragma unroll
              for (int w = 1; w < PK_WARPS; ++w) {
                const float4 y = ws.part[(w * 8 + j) * 32 + lane];
                x.x += y.x; x.y += y.y; x.z += y.z; x.w += y.w;
              }
              acc[j][0] = x.x; acc[j][1] = x.y; acc[j][2] = x.z; acc[j][3] = x.w;
            }
          }
          // 2d: scores = step_k * (q.level + off_k * sum(q)) [* log2(e)/sqrt(D) when fused]
          const uint2* tt = ws.ttab + gq * 16;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const uint2 e0 = tt[j], e8 = tt[j + 8];
            const float a0 = pk_h2f(e0.x).x * qscale, a8 = pk_h2f(e8.x).x * qscale;
            const float b0 = a0 * float(int(short(e0.y & 0xffffu))), b8 = a8 * float(int(short(e8.y & 0xffffu)));
            acc[j][0] = a0 * acc[j][0] + b0 * sumq0;
            acc[j][1] = a0 * acc[j][1] + b0 * sumq1;
            acc[j][2] = a8 * acc[j][2] + b8 * sumq0;
            acc[j][3] = a8 * acc[j][3] + b8 * sumq1;
          }

          if constexpr (MODE == 1) {
            // ---- K-GEMV output: 16 consecutive storage tokens per head, four float4 stores
            if (gvalid) {
              const size_t ntok = size_t(max_blocks) * T;
              const size_t t0 = size_t(blk_lo + it * NB + bs) * T + size_t(gib) * 16;
#pragma unroll
              for (int hs = 0; hs < 2; ++hs) {
                if (hc0 + hs >= G) continue;
                float4* dst = reinterpret_cast<float4*>(out + (size_t(b) * Hq + size_t(kvh) * G + hc0 + hs) * ntok + t0);
                dst[0] = make_float4(acc[0][hs], acc[1][hs], acc[2][hs], acc[3][hs]);
                dst[1] = make_float4(acc[4][hs], acc[5][hs], acc[6][hs], acc[7][hs]);
                dst[2] = make_float4(acc[0][2 + hs], acc[1][2 + hs], acc[2][2 + hs], acc[3][2 + hs]);
                dst[3] = make_float4(acc[4][2 + hs], acc[5][2 + hs], acc[6][2 + hs], acc[7][2 + hs]);
              }
            }
          } else {
            // ---- Phase 3: online softmax (log2 domain) over the 8 groups, weights to pbuf as fp16
            float mx0 = PK_NEG_INF, mx1 = PK_NEG_INF;
            if (gvalid) {
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                mx0 = fmaxf(mx0, fmaxf(acc[j][0], acc[j][2]));
                mx1 = fmaxf(mx1, fmaxf(acc[j][1], acc[j][3]));
              }
            }
#pragma unroll
            for (int d = 4; d < 32; d <<= 1) {
              mx0 = fmaxf(mx0, __shfl_xor_sync(PK_FULL, mx0, d));
              mx1 = fmaxf(mx1, __shfl_xor_sync(PK_FULL, mx1, d));
            }
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float ref0 = mn0 == PK_NEG_INF ? 0.f : mn0, ref1 = mn1 == PK_NEG_INF ? 0.f : mn1;
            const float al0 = pk_exp2(m0 - ref0), al1 = pk_exp2(m1 - ref1);   // exp2(-inf) = 0
            m0 = mn0;
            m1 = mn1;
            float ps0 = 0.f, ps1 = 0.f, po0 = 0.f, po1 = 0.f;
            u32 w0[8], w1[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const uint2 e0 = tt[j], e8 = tt[j + 8];
              const float sv0 = pk_h2f(e0.x).y, sv8 = pk_h2f(e8.x).y;
              const float dv0 = sv0 * float(int(short(e0.y >> 16))), dv8 = sv8 * float(int(short(e8.y >> 16)));
              float p00 = gvalid ? pk_exp2(acc[j][0] - ref0) : 0.f, p01 = gvalid ? pk_exp2(acc[j][1] - ref1) : 0.f;
              float p80 = gvalid ? pk_exp2(acc[j][2] - ref0) : 0.f, p81 = gvalid ? pk_exp2(acc[j][3] - ref1) : 0.f;
              ps0 += p00 + p80;
              ps1 += p01 + p81;
              po0 += p00 * dv0 + p80 * dv8;
              po1 += p01 * dv0 + p81 * dv8;
              w0[j] = pk_f2h2(p00 * sv0, p80 * sv8);
              w1[j] = pk_f2h2(p01 * sv0, p81 * sv8);
            }
            l0 = l0 * al0 + ps0;
            l1 = l1 * al1 + ps1;
            oo0 = oo0 * al0 + po0;
            oo1 = oo1 * al1 + po1;
            alpha0 = al0;   // o is rescaled as the V pass loads it
            alpha1 = al1;
            uint4* d0 = reinterpret_cast<uint4*>(ws.pbuf + (2 * tq) * PK_PBUF_HEAD + gq * 32);
            uint4* d1 = reinterpret_cast<uint4*>(ws.pbuf + (2 * tq + 1) * PK_PBUF_HEAD + gq * 32);
            d0[0] = make_uint4(w0[0], w0[1], w0[2], w0[3]);
            d0[1] = make_uint4(w0[4], w0[5], w0[6], w0[7]);
            d1[0] = make_uint4(w1[0], w1[1], w1[2], w1[3]);
            d1[1] = make_uint4(w1[4], w1[5], w1[6], w1[7]);
            __syncwarp();
          }
        }

        PK_TICK(6);
        if constexpr (MODE != 1) {
          // ---- Phase 4 (V): two passes of 4 groups; lane (gq, tq) decodes group 4vp+tq, channels
          //      16mt + 2gq, +1 (the A operand rows gq, gq+8 of m-tile mt) of the warp's tiles, 4 mma per tile
#pragma unroll 1
          for (int vp = 0; vp < 2; ++vp) {
            const PkPass ps = v_pass(sub, vp);
            const bool vvalid = ps.blk < blk_hi;
            // in-row offsets (tile mode: scanned before (B), plus the row's bytes before the warp's first
            // tile, voff); run = the row total
            u32 run = 0, voff = 0;
            if constexpr (TILES) {
#pragma unroll
              for (int w = 0; w < PK_WARPS; ++w) {
                const u32 x = ws.xchg[32 + (vp * PK_WARPS + w) * 4 + tq];
                voff += w < warp ? x : 0u;
                run += x;
              }
            } else {
              run = v_offsets(ps, 0);
            }
            if (NG < 8 || sub * 8 + 4 * vp == 0) carryV = 0;   // the pass starts a block
            u32 c = pk_row_contrib<P>(run, ps.gib);
            const int posv = NG >= 4 ? tq : tq & (NG - 1);
            u32 v = c, y;
            y = __shfl_up_sync(PK_FULL, v, 1, 4); if (posv >= 1) v += y;
            y = __shfl_up_sync(PK_FULL, v, 2, 4); if (posv >= 2) v += y;
            const u32 tot_a = run & 0xffffu;
            u32 base_a = v - c + carryV;
            if (NG > 4) carryV += __shfl_sync(PK_FULL, v, 3, 4);
            if (P == 32 && (ps.gib & 1)) base_a -= tot_a;
            const u32 base_b = base_a + tot_a;

            // B operand: weights of head n-slot gq for the pass's group 4vp+tq, pairs (2jj, 2jj+8), (2jj+1, 2jj+9)
            u32 bf[8];
            if constexpr (MODE == 0) {
              const uint4* src = reinterpret_cast<const uint4*>(ws.pbuf + gq * PK_PBUF_HEAD + (4 * vp + tq) * 32);
              uint4 u0 = src[0], u1 = src[1];
              bf[0] = u0.x; bf[1] = u0.y; bf[2] = u0.z; bf[3] = u0.w;
              bf[4] = u1.x; bf[5] = u1.y; bf[6] = u1.z; bf[7] = u1.w;
            } else {
              float pv[16];
#pragma unroll
              for (int t = 0; t < 16; ++t) pv[t] = 0.f;
              if (vvalid && hg < G) {
                const size_t ntok = size_t(max_blocks) * T;
                const size_t base = (size_t(b) * Hq + size_t(kvh) * G + hg) * ntok + size_t(ps.blk) * T + size_t(ps.gib) * 16;
                if (p_half) {
                  const uint4* src = reinterpret_cast<const uint4*>(reinterpret_cast<const u16*>(pw) + base);
#pragma unroll
                  for (int i = 0; i < 2; ++i) {
                    uint4 u = src[i];
                    float2 a = pk_h2f(u.x), bq = pk_h2f(u.y), cq = pk_h2f(u.z), dq = pk_h2f(u.w);
                    pv[8 * i + 0] = a.x; pv[8 * i + 1] = a.y; pv[8 * i + 2] = bq.x; pv[8 * i + 3] = bq.y;
                    pv[8 * i + 4] = cq.x; pv[8 * i + 5] = cq.y; pv[8 * i + 6] = dq.x; pv[8 * i + 7] = dq.y;
                  }
                } else {
                  const float4* src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(pw) + base);
#pragma unroll
                  for (int i = 0; i < 4; ++i) {
                    float4 u = src[i];
                    pv[4 * i] = u.x; pv[4 * i + 1] = u.y; pv[4 * i + 2] = u.z; pv[4 * i + 3] = u.w;
                  }
                }
              }
              const uint4* tt = reinterpret_cast<const uint4*>(ws.ttab + (4 * vp + tq) * 16);
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                uint4 u = tt[i];
                float s0 = pk_h2f(u.x).y, s1 = pk_h2f(u.z).y;
                float o0 = float(int(short(u.y >> 16))), o1 = float(int(short(u.w >> 16)));
                pv[2 * i] *= s0;
                pv[2 * i + 1] *= s1;
                oog += pv[2 * i] * o0 + pv[2 * i + 1] * o1;
              }
#pragma unroll
              for (int jj = 0; jj < 4; ++jj) {
                bf[2 * jj] = pk_f2h2(pv[2 * jj], pv[2 * jj + 8]);
                bf[2 * jj + 1] = pk_f2h2(pv[2 * jj + 1], pv[2 * jj + 9]);
              }
            }

            const PkSection& S = ps.S;
            const int ra = ps.ra, rb = ps.rb, half = ps.half;
            const u32* offs = ws.offbuf + (TILES ? vp * NT : 0) * 32 + lane;
#pragma unroll 2
            for (int mt = 0; mt < NT; ++mt) {
              const u32 c0 = u32(16 * (t0 + mt) + 2 * gq);
              const u32 offv = offs[mt * 32] + voff;
              float4 of = ws.obuf[mt * 32 + lane];
              if (MODE == 0 && vp == 0) { of.x *= alpha0; of.y *= alpha1; of.z *= alpha0; of.w *= alpha1; }
              float oc[4] = {of.x, of.y, of.z, of.w};
              u32 w0, w1, w0b = 0, w1b = 0;
              int n0, n1, n0b = 0, n1b = 0;
              pk_fields2<NARROW>(S, u32(ra) * D + c0, w0, n0, w1, n1);
              u32 pr[2][8];
              if constexpr (P == 8) {
                pk_fields2<NARROW>(S, u32(rb) * D + c0, w0b, n0b, w1b, n1b);
                const u8* oa = S.payload + base_a + (offv & 0xffffu);
                const u8* ob = S.payload + base_b + (offv >> 16);
                pk_decode_run<8, NARROW>(oa, w0, n0, ob, w0b, n0b, pr[0]);
                pk_decode_run<8, NARROW>(oa + w0, w1, n1, ob + w0b, w1b, n1b, pr[1]);
              } else {
                const u8* op = S.payload + base_a + offv;
                pk_decode_run<P, NARROW>(op + (P == 32 ? half * 2 * w0 : 0u), w0, n0, nullptr, 0, 0, pr[0]);
                op += (P / 8) * w0;
                pk_decode_run<P, NARROW>(op + (P == 32 ? half * 2 * w1 : 0u), w1, n1, nullptr, 0, 0, pr[1]);
              }
#pragma unroll
              for (int jj = 0; jj < 4; ++jj)
                pk_mma(oc, pr[0][2 * jj], pr[1][2 * jj], pr[0][2 * jj + 1], pr[1][2 * jj + 1], bf[2 * jj], bf[2 * jj + 1]);
              ws.obuf[mt * 32 + lane] = make_float4(oc[0], oc[1], oc[2], oc[3]);
            }
          }
        }
        __syncwarp();
        PK_TICK(7);
      }
      };
      body(PkBool<false>());   // one body: two (shared-only / generic) overflowed the instruction cache
      if constexpr (ONE_SLOT) stage_next();   // the slot is free (the body ends with __syncwarp)
    }
  }
#ifdef PK_PROF
  PK_TICK(8);
  if (lane == 0)
    for (int i = 0; i < 9; ++i) atomicAdd(&pk_prof[i], (unsigned long long)prof[i]);
  if (lane == 0) atomicAdd(&pk_prof[15], 1ull);
#endif

  // ---- Phase 5: per-warp state -> CTA merge in shared memory -> one state per split
  if constexpr (MODE == 1) {
    // zero the scores of blocks past n_blocks that this split owns in a max_blocks partition
    const int zb = (max_blocks + n_splits - 1) / n_splits;
    const int z0 = max(nb, split * zb), z1 = min(max_blocks, (split + 1) * zb);
    if (z1 > z0) {
      const size_t ntok = size_t(max_blocks) * T;
      const int heads = min(8, G - nt * 8);
      const size_t per_head = size_t(z1 - z0) * T;
      for (size_t i = threadIdx.x; i < size_t(heads) * per_head; i += blockDim.x) {
        size_t hh = i / per_head, t = i % per_head;
        out[(size_t(b) * Hq + size_t(kvh) * G + nt * 8 + hh) * ntok + size_t(z0) * T + t] = 0.f;
      }
    }
    return;
  } else {
    if constexpr (MODE == 0) {
#pragma unroll
      for (int d = 4; d < 32; d <<= 1) {
        l0 += __shfl_xor_sync(PK_FULL, l0, d);
        l1 += __shfl_xor_sync(PK_FULL, l1, d);
        oo0 += __shfl_xor_sync(PK_FULL, oo0, d);
        oo1 += __shfl_xor_sync(PK_FULL, oo1, d);
      }
    } else {
      oog += __shfl_xor_sync(PK_FULL, oog, 1);
      oog += __shfl_xor_sync(PK_FULL, oog, 2);
      oo0 = __shfl_sync(PK_FULL, oog, (2 * tq) * 4);
      oo1 = __shfl_sync(PK_FULL, oog, (2 * tq + 1) * 4);
    }
    if (stager && lane == 0) for (int i = 0; i < SLOTS; ++i) pk_mbar_inval(ws.bar + i);
    __syncthreads();   // every warp is done with its slots: reuse shared memory
    // Item mode: a state per warp, merged. Tile mode: the warps' m, l (and oo) are the same and their
    // channels disjoint: one state, each warp writing its channels, warp 0 m and l.
    constexpr int NW = TILES ? 1 : PK_WARPS;
    const int sw = TILES ? 0 : warp;                        // the warp's state
    float* mo = reinterpret_cast<float*>(smem);             // [NW][8 heads][D]
    float* mml = mo + NW * 8 * D;                           // [NW][8 heads][2]: m, l
    float4 ofin[NT];   // this warp's o: read before the merge area (which overlaps it) is written
#pragma unroll
    for (int mt = 0; mt < NT; ++mt) ofin[mt] = ws.obuf[mt * 32 + lane];
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < NT; ++mt) {
      const int ch = 16 * (t0 + mt) + 2 * gq;
      mo[(sw * 8 + 2 * tq) * D + ch] = ofin[mt].x + oo0;
      mo[(sw * 8 + 2 * tq + 1) * D + ch] = ofin[mt].y + oo1;
      mo[(sw * 8 + 2 * tq) * D + ch + 1] = ofin[mt].z + oo0;
      mo[(sw * 8 + 2 * tq + 1) * D + ch + 1] = ofin[mt].w + oo1;
    }
    if (gq == 0 && (!TILES || warp == 0)) {
      mml[(sw * 8 + 2 * tq) * 2] = m0; mml[(sw * 8 + 2 * tq) * 2 + 1] = l0;
      mml[(sw * 8 + 2 * tq + 1) * 2] = m1; mml[(sw * 8 + 2 * tq + 1) * 2 + 1] = l1;
    }
    __syncthreads();
    const int stride = MODE == 0 ? D + 2 : D;
    for (int idx = threadIdx.x; idx < 8 * D; idx += blockDim.x) {
      const int hh = idx / D, d = idx % D;
      if (nt * 8 + hh >= G) continue;
      float* dst = out + ((size_t(b) * Hq + size_t(kvh) * G + nt * 8 + hh) * n_splits + split) * stride;
      if constexpr (MODE == 0) {
        float ms = PK_NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) ms = fmaxf(ms, mml[(w * 8 + hh) * 2]);
        float oa = 0.f, la = 0.f;
        if (ms != PK_NEG_INF) {
#pragma unroll
          for (int w = 0; w < NW; ++w) {
            const float mw = mml[(w * 8 + hh) * 2];
            if (mw == PK_NEG_INF) continue;
            const float f = pk_exp2(mw - ms);
            oa += f * mo[(w * 8 + hh) * D + d];
            la += f * mml[(w * 8 + hh) * 2 + 1];
          }
        }
        dst[d] = oa;
        if (d == 0) { dst[D] = ms; dst[D + 1] = la; }
      } else {
        float oa = 0.f;
#pragma unroll
        for (int w = 0; w < PK_WARPS; ++w) oa += mo[(w * 8 + hh) * D + d];
        dst[d] = oa;
      }
    }
  }
}
