// packkv_common.cuh: device code shared by the packkv kernels (included, never compiled alone).
//
// What is here, in the order a kernel uses it:
//   1. bit-stream reads of the v1 format (docs/FORMAT.md): LSB-first streams read as 32-bit windows;
//   2. section headers (width_bits, min_bits, min_base) and the (width, min) header field of a pack;
//   3. unpacking one "run" (16 storage tokens of one channel) into 8 half2 registers of exact integer
//      levels, pair j = (level of token j, level of token j+8), with the magic-number trick:
//      (0x6400 | v) is the fp16 number 1024 + v, so one LOP3 turns two w-bit fields into a half2, and one
//      add.f16x2 with (min - 1024) gives min + v exactly (integers up to 2048 are exact in fp16);
//   4. mma.sync m16n8k16 (fp16 in, fp32 accumulate), ex2.approx, mbarriers and 1-D bulk copies (TMA);
//   5. the per-item staging of compressed spans into shared memory (bulk copies into one slot per warp,
//      the next item prefetched into L2, or two slots per warp, or two per CTA in the fused kernel's tile
//      mode).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// fp16 values are handled as their bits (u16); conversions in PTX, so nvrtc needs no header.
__device__ __forceinline__ float pk_h2float(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 pk_float2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 pk_int2h(int i) { u16 h; asm("cvt.rn.f16.s32 %0, %1;" : "=h"(h) : "r"(i)); return h; }

#define PK_FULL 0xffffffffu
#define PK_MAGIC 0x64006400u   // half2(1024, 1024)
#define PK_WARPS 4             // warps per CTA of the split kernels
#define PK_NBMAX 8             // blocks per item at most (block = 16 tokens)

// ---------------------------------------------------------------------------------------------------
// 1. Bit streams
// ---------------------------------------------------------------------------------------------------

// The 32 stream bits starting at bit `bit` of the stream that starts at the 4-aligned `base`.
__device__ __forceinline__ u32 pk_bits32(const u8* base, u32 bit) {
  const u32* w = reinterpret_cast<const u32*>(base) + (bit >> 5);
  return __funnelshift_r(w[0], w[1], bit & 31);
}

// The same for a stream starting at any byte address.
// (Alignment by pointer subtraction, never through an integer: keeps the shared address space visible
// to the compiler, which then emits ld.shared.)
__device__ __forceinline__ u32 pk_bits32_at(const u8* p, u32 bit) {
  const u32 mis = u32(reinterpret_cast<size_t>(p)) & 3u;
  return pk_bits32(p - mis, bit + 8u * mis);
}

__device__ __forceinline__ u32 pk_ld32(const u8* p) { return *reinterpret_cast<const u32*>(p); }

// Four consecutive n-bit fields (n <= 16) from bit `bit` of the stream that starts at the 4-aligned `base`:
// one 64-bit window (3 aligned words, 2 funnel shifts), fields 0-1 from its low word, 2-3 from the 32
// bits at 2n (the clamping funnel shift: 2n = 32 when n = 16). The window may reach up to 12 bytes past
// the last field: the token sections it reads are followed by a record's channel sections.
__device__ __forceinline__ void pk_fields4(const u8* base, u32 bit, u32 n, u32 f[4]) {
  const u32* w = reinterpret_cast<const u32*>(base) + (bit >> 5);
  const u32 w1 = w[1];
  const u32 lo = __funnelshift_r(w[0], w1, bit & 31), hi = __funnelshift_r(w1, w[2], bit & 31);
  const u32 m = (1u << n) - 1u, x2 = __funnelshift_rc(lo, hi, 2u * n);
  f[0] = lo & m;
  f[1] = (lo >> n) & m;
  f[2] = x2 & m;
  f[3] = (x2 >> n) & m;
}

// ---------------------------------------------------------------------------------------------------
// 2. Channel sections: header, pack header fields
// ---------------------------------------------------------------------------------------------------

struct PkSection {
  const u8* hdr;       // bit stream of R*D (width, min - min_base) fields
  const u8* payload;   // payload_start
  u32 WB, F, wmask, mmask;
  int min_base;
};

__device__ __forceinline__ PkSection pk_section(const u8* sec, int R, int D) {
  u32 x = pk_ld32(sec);
  PkSection s;
  s.WB = x & 0xff;
  u32 MB = (x >> 8) & 0xff;
  s.min_base = int(x >> 16);
  s.F = s.WB + MB;
  s.wmask = (1u << s.WB) - 1u;
  s.mmask = (1u << MB) - 1u;
  s.hdr = sec + 4;
  u32 hbytes = (u32(R) * u32(D) * s.F + 7u) >> 3;
  s.payload = sec + 4 + ((hbytes + 3u) & ~3u);
  return s;
}

// Width and min of packs i and i+1 (adjacent channels of one pack row).
// NARROW: the section's packs are at most 4 bits wide and their mins at most 15 (levels <= 15, the
// host's guarantee: attention_kernels.compressed_decode_attention's `narrow`), so width_bits <= 3,
// min_bits <= 4 and F <= 7: both fields are always in one window, no branch.
template <bool NARROW = false>
__device__ __forceinline__ void pk_fields2(const PkSection& s, u32 i, u32& w0, int& m0, u32& w1, int& m1) {
  u32 x0, x1;
  if (NARROW || s.F <= 16) { // both fields in one 32-bit window
    x0 = pk_bits32(s.hdr, i * s.F);
    x1 = x0 >> s.F;
  } else {                   // wide fields (min_bits > 11): one window each
    x0 = pk_bits32(s.hdr, i * s.F);
    x1 = pk_bits32(s.hdr, (i + 1) * s.F);
  }
  w0 = x0 & s.wmask;
  m0 = s.min_base + int((x0 >> s.WB) & s.mmask);
  w1 = x1 & s.wmask;
  m1 = s.min_base + int((x1 >> s.WB) & s.mmask);
}

template <bool NARROW = false>
__device__ __forceinline__ void pk_width2(const PkSection& s, u32 i, u32& w0, u32& w1) {
  u32 x0, x1;
  if (NARROW || s.F <= 16) {
    x0 = pk_bits32(s.hdr, i * s.F);
    x1 = x0 >> s.F;
  } else {
    x0 = pk_bits32(s.hdr, i * s.F);
    x1 = pk_bits32(s.hdr, (i + 1) * s.F);
  }
  w0 = x0 & s.wmask;
  w1 = x1 & s.wmask;
}

// Sum of the widths of packs i .. i+3 (adjacent channels of one pack row). When 4F <= 32 (always under
// NARROW: F <= 7) one window holds the 4 fields: the widths at bits 0 and 2F plus those at F and 3F give
// the pair sums w0 + w1 at bit 0 and w2 + w3 at bit 2F, which cannot overlap (a width is < 2^WB, WB <= F,
// so a pair sum is < 2^(WB+1) <= 2^(2F)); then the two pair sums are added.
template <bool NARROW = false>
__device__ __forceinline__ u32 pk_width4(const PkSection& s, u32 i) {
  if (NARROW || s.F <= 8) {
    const u32 x = pk_bits32(s.hdr, i * s.F);
    const u32 even = s.wmask | (s.wmask << (2u * s.F));   // the width bits of fields 0 and 2
    const u32 y = (x & even) + ((x >> s.F) & even);
    return (y & ((1u << (2u * s.F)) - 1u)) + (y >> (2u * s.F));
  }
  u32 w0, w1, w2, w3;
  pk_width2<NARROW>(s, i, w0, w1);
  pk_width2<NARROW>(s, i + 2, w2, w3);
  return w0 + w1 + w2 + w3;
}

// ---------------------------------------------------------------------------------------------------
// 3. Unpacking runs of 16 storage tokens of one channel -> 8 half2 of exact levels
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 pk_hadd2(u32 a, u32 b) {
  u32 d;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// half2 bits of (lo_min - 1024, hi_min - 1024)
__device__ __forceinline__ u32 pk_minpair(int lo_min, int hi_min) {
  return u32(pk_int2h(lo_min - 1024)) | (u32(pk_int2h(hi_min - 1024)) << 16);
}

__device__ __forceinline__ u32 pk_level_pair(int a, int b) {
  return u32(pk_int2h(a)) | (u32(pk_int2h(b)) << 16);
}

// A run of 16 values of w bits (w <= 4) at byte address a (any alignment), pack min `mn`.
// out[j] = half2(min + v_j, min + v_{j+8}). 64 payload bits from 3 aligned words: values 0..7 in the
// low 8w bits, 8..15 in the next 8w; C1 = (bits 0..15 of each half), C2 = the same shifted by 4w, so
// field k of each half of C1 is value (k, k+8) and of C2 value (k+4, k+12).
__device__ __forceinline__ void pk_run16_fast(const u8* a, u32 w, int mn, u32 out[8]) {
  const u32 mis = u32(reinterpret_cast<size_t>(a)) & 3u;
  const u32* wp = reinterpret_cast<const u32*>(a - mis);
  u32 sh = mis * 8u;
  u32 x0 = wp[0], x1 = wp[1], x2 = wp[2];
  u32 lo = __funnelshift_r(x0, x1, sh), hi = __funnelshift_r(x1, x2, sh);
  u32 bv = __funnelshift_rc(lo, hi, 8u * w);
  u32 c1 = __byte_perm(lo, bv, 0x5410);
  u32 s4 = 4u * w;
  u32 c2 = __byte_perm(lo >> s4, bv >> s4, 0x5410);
  u32 M = ((1u << w) - 1u) * 0x10001u;
  u32 mp = pk_minpair(mn, mn);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = pk_hadd2(((c1 >> (u32(k) * w)) & M) | PK_MAGIC, mp);
    out[k + 4] = pk_hadd2(((c2 >> (u32(k) * w)) & M) | PK_MAGIC, mp);
  }
}

// Any width (w <= 16): one 32-bit window per value, int -> half conversions. Rare (a pack wider than 4
// bits needs rel < ~1/15), so it is kept small: a rolled loop whose results shift through 8 registers.
__device__ __forceinline__ void pk_run16_slow(const u8* a, u32 w, int mn, u32 out[8]) {
  const u32 m = (1u << w) - 1u;
  u32 r0 = 0, r1 = 0, r2 = 0, r3 = 0, r4 = 0, r5 = 0, r6 = 0, r7 = 0;
#pragma unroll 1
  for (u32 j = 0; j < 8; ++j) {
    const int va = int(pk_bits32_at(a, j * w) & m), vb = int(pk_bits32_at(a, (j + 8) * w) & m);
    r0 = r1; r1 = r2; r2 = r3; r3 = r4; r4 = r5; r5 = r6; r6 = r7;
    r7 = pk_level_pair(mn + va, mn + vb);
  }
  out[0] = r0; out[1] = r1; out[2] = r2; out[3] = r3; out[4] = r4; out[5] = r5; out[6] = r6; out[7] = r7;
}

// pack 8: tokens 0..7 are pack row a (8 values of wa bits at pa), tokens 8..15 pack row b.
__device__ __forceinline__ void pk_run8x2_fast(const u8* pa, u32 wa, int ma, const u8* pb, u32 wb, int mb,
                                               u32 out[8]) {
  u32 xa = pk_bits32_at(pa, 0), xb = pk_bits32_at(pb, 0);
  u32 M = ((1u << wa) - 1u) | (((1u << wb) - 1u) << 16);
  u32 mp = pk_minpair(ma, mb);
#pragma unroll
  for (int j = 0; j < 8; ++j)
    out[j] = pk_hadd2((__byte_perm(xa >> (u32(j) * wa), xb >> (u32(j) * wb), 0x5410) & M) | PK_MAGIC, mp);
}

__device__ __forceinline__ void pk_run8x2_slow(const u8* pa, u32 wa, int ma, const u8* pb, u32 wb, int mb,
                                               u32 out[8]) {
  const u32 mka = (1u << wa) - 1u, mkb = (1u << wb) - 1u;
  u32 r0 = 0, r1 = 0, r2 = 0, r3 = 0, r4 = 0, r5 = 0, r6 = 0, r7 = 0;
#pragma unroll 1
  for (u32 j = 0; j < 8; ++j) {
    const int va = int(pk_bits32_at(pa, j * wa) & mka), vb = int(pk_bits32_at(pb, j * wb) & mkb);
    r0 = r1; r1 = r2; r2 = r3; r3 = r4; r4 = r5; r5 = r6; r6 = r7;
    r7 = pk_level_pair(ma + va, mb + vb);
  }
  out[0] = r0; out[1] = r1; out[2] = r2; out[3] = r3; out[4] = r4; out[5] = r5; out[6] = r6; out[7] = r7;
}

// ---------------------------------------------------------------------------------------------------
// 4. Tensor cores, exp2, async copies
// ---------------------------------------------------------------------------------------------------

// D += A * B, m16n8k16, A row-major fp16 (4 regs), B col-major fp16 (2 regs), fp32 accumulators.
__device__ __forceinline__ void pk_mma(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float pk_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ u32 pk_smem_addr(const void* p) {
  u32 s;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(p));
  return s;
}
// mbarrier + 1-D bulk copies (TMA): one instruction moves a whole span, completion counted in bytes.
__device__ __forceinline__ void pk_mbar_init(u64* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(pk_smem_addr(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void pk_mbar_expect(u64* bar, u32 bytes) {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // earlier generic reads of the slot
  asm volatile("{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1; }"
               ::"r"(pk_smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void pk_bulk_copy(void* smem, const void* gmem, u32 bytes, u64* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(pk_smem_addr(smem)), "l"(gmem), "r"(bytes), "r"(pk_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void pk_mbar_inval(u64* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(pk_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void pk_mbar_wait(u64* bar, u32 parity) {
  u32 done = 0, a = pk_smem_addr(bar);
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(a), "r"(parity) : "memory");
}

// ---------------------------------------------------------------------------------------------------
// 5. Staging: which bytes of a record one (KV head, item) needs, copied to the warp's slot
// ---------------------------------------------------------------------------------------------------

// Where one block's sections are (lane k < NB of the warp holds block k of an item).
struct PkBlockMeta {
  const u8* rec;   // record start (global), null when the block is past the split's end
  u32 tok_s, tok_e, k_s, v_s, kv_e;
};

// Reads the section table of record `rec` for KV head h. mode: 0 fused (K and V), 1 K only, 2 V only.
__device__ __forceinline__ PkBlockMeta pk_block_meta(const u8* rec, int h, int H, int token_layer) {
  PkBlockMeta m;
  m.rec = rec;
  if (rec == nullptr) { m.tok_s = m.tok_e = m.k_s = m.v_s = m.kv_e = 0; return m; }
  const u32* tbl = reinterpret_cast<const u32*>(rec + 12);
  int n_units = token_layer ? 1 : H;
  int u = token_layer ? 0 : h;
  m.tok_s = tbl[u];
  m.tok_e = tbl[u + 1];
  m.k_s = tbl[n_units + 2 * h];
  m.v_s = tbl[n_units + 2 * h + 1];
  m.kv_e = (h + 1 < H) ? tbl[n_units + 2 * h + 2] : *reinterpret_cast<const u32*>(rec + 8);
  return m;
}

// Shared memory of the split kernels in item mode (a warp decodes whole items):
//   qbuf[KT][32]          the CTA's q B-fragments (not V-GEMV): the same for all 4 warps, stored once
//   per warp:
//     slot[SLOTS][slot_bytes]  staged record spans: SLOTS = 2 double-buffers (the item being decoded / the
//                              next); SLOTS = 1 holds the item being decoded, the next one is copied in once
//                              it is done (after an L2 prefetch: pk_prefetch_item)
//     pbuf                fp16 weights p*step_v for the V mma, [8 heads][8 groups][16 tokens] (+pad)
//     ttab[128]           per-token (step_k, step_v, off_k, off_v) of the 8 groups being decoded
//     meta[SLOTS][PK_NBMAX][3]  where the token, K and V sections of each block of the item are: byte
//                         offsets from the start of shared memory when the whole item is staged (the
//                         decoder then reads with ld.shared, 32-bit addresses), generic addresses otherwise
//     zero[64]            an all-zero "section" that blocks past the end point at
//     mbarriers           one per slot
//     offbuf[KT][32], obuf[KT][32]   payload offsets and o accumulators of the lane per 16-channel tile
#define PK_PBUF_HEAD 272     // bytes per head in pbuf: 8 groups * 32 bytes + 16 (bank spread)
#define PK_PBUF_BYTES (8 * PK_PBUF_HEAD)
#define PK_TTAB_BYTES (128 * 8)
#define PK_META_SLOT_BYTES (PK_NBMAX * 3 * 8)
#define PK_META_BYTES (2 * PK_META_SLOT_BYTES)   // tile mode: two slots per CTA
#define PK_ZERO_BYTES 64
#define PK_MBAR_BYTES 16     // one mbarrier per slot (two at most)
#define PK_WARP_EXTRA(slots) (PK_PBUF_BYTES + PK_TTAB_BYTES + (slots) * PK_META_SLOT_BYTES + PK_ZERO_BYTES + PK_MBAR_BYTES)

struct PkWarpSmem {
  u8* slot0;
  u8* pbuf;
  uint2* ttab;
  u64* meta;         // [slots][PK_NBMAX][3]
  u8* zero;
  u64* bar;          // [slots]
  uint2* qbuf;       // [KT][32] q B fragments of the lane (tile loops are rolled: no register arrays)
  u32* offbuf;       // [KT][32] payload offsets of the lane's packs per tile
  float4* obuf;      // [KT][32] o accumulators of the lane per 16-channel tile
  float4* part;      // tile mode: [PK_WARPS][8][32] partial scores (acc) of each warp's tiles; else null
  u32* xchg;         // tile mode: [64] the warps' byte totals of their tiles per pack row (K, V); else null
};
// the CTA's q fragments (not V-GEMV) and the per-warp work bytes per 16-channel tile: offsets, o (not K-GEMV)
#define PK_CTA_Q_PER_TILE(mode) ((mode) == 2 ? 0 : 32 * 8)
#define PK_WORK_PER_TILE(mode) (32 * ((mode) == 1 ? 4 : 20))

__device__ __forceinline__ PkWarpSmem pk_warp_smem(u8* smem, int warp, int slot_bytes, int KT, int mode, int slots) {
  PkWarpSmem s;
  u8* base = smem + size_t(KT) * PK_CTA_Q_PER_TILE(mode)
           + size_t(warp) * (size_t(slots) * slot_bytes + PK_WARP_EXTRA(slots) + size_t(KT) * PK_WORK_PER_TILE(mode));
  s.slot0 = base;
  s.pbuf = base + size_t(slots) * slot_bytes;
  s.ttab = reinterpret_cast<uint2*>(s.pbuf + PK_PBUF_BYTES);
  s.meta = reinterpret_cast<u64*>(s.pbuf + PK_PBUF_BYTES + PK_TTAB_BYTES);
  s.zero = s.pbuf + PK_PBUF_BYTES + PK_TTAB_BYTES + slots * PK_META_SLOT_BYTES;
  s.bar = reinterpret_cast<u64*>(s.zero + PK_ZERO_BYTES);
  u8* work = s.pbuf + PK_WARP_EXTRA(slots);                   // 16-aligned: every part a multiple of 16
  s.qbuf = reinterpret_cast<uint2*>(smem);
  s.offbuf = reinterpret_cast<u32*>(work);
  s.obuf = reinterpret_cast<float4*>(work + KT * 128);
  s.part = nullptr;
  s.xchg = nullptr;
  return s;
}

// Tile mode (the fused kernel at short contexts: the CTA's 4 warps share each item, warp w decoding the
// 16-channel tiles w*NT .. w*NT+NT-1, NT = D/64): the staging (slots, meta, zero section, mbarriers), the
// token table, the partial scores and the scan totals belong to the CTA; pbuf (each warp computes the
// same softmax), q fragments, offsets (NT for K, then 2*NT for V's two passes) and o stay per warp.
//   slot[2][slot_bytes] | ttab | meta | zero | mbarriers | part | xchg | per warp: pbuf, work[NT tiles]
#define PK_PART_BYTES (PK_WARPS * 8 * 32 * 16)
#define PK_XCHG_BYTES 256
#define PK_CTA_EXTRA (PK_TTAB_BYTES + PK_META_BYTES + PK_ZERO_BYTES + PK_MBAR_BYTES + PK_PART_BYTES + PK_XCHG_BYTES)
#define PK_TILE_WORK_PER_TILE (32 * 32)   // per lane and tile: q fragment 8 B, offsets 2 x 4 B, o 16 B

__device__ __forceinline__ PkWarpSmem pk_tile_smem(u8* smem, int warp, int slot_bytes, int NT) {
  PkWarpSmem s;
  s.slot0 = smem;
  u8* cta = smem + 2 * size_t(slot_bytes);
  s.ttab = reinterpret_cast<uint2*>(cta);
  s.meta = reinterpret_cast<u64*>(cta + PK_TTAB_BYTES);
  s.zero = cta + PK_TTAB_BYTES + PK_META_BYTES;
  s.bar = reinterpret_cast<u64*>(s.zero + PK_ZERO_BYTES);
  s.part = reinterpret_cast<float4*>(s.zero + PK_ZERO_BYTES + PK_MBAR_BYTES);   // 16-aligned
  s.xchg = reinterpret_cast<u32*>(reinterpret_cast<u8*>(s.part) + PK_PART_BYTES);
  u8* base = cta + PK_CTA_EXTRA + size_t(warp) * (PK_PBUF_BYTES + size_t(NT) * PK_TILE_WORK_PER_TILE);
  s.pbuf = base;
  u8* work = base + PK_PBUF_BYTES;
  s.qbuf = reinterpret_cast<uint2*>(work);
  s.offbuf = reinterpret_cast<u32*>(work + NT * 256);
  s.obuf = reinterpret_cast<float4*>(work + NT * 512);
  return s;
}

// The two spans of one block that an item reads, as byte offsets from the record start rounded out to
// 16 bytes (records are 16-byte aligned): the token section [t0, t1) and the channel sections [k0, k1),
// K and V (mode 0), K only (1) or V only (2).
__device__ __forceinline__ void pk_block_spans(const PkBlockMeta& bm, int mode, u32& t0, u32& t1, u32& k0, u32& k1) {
  t0 = bm.tok_s & ~15u;
  t1 = (bm.tok_e + 15u) & ~15u;
  const u32 c_s = (mode == 2) ? bm.v_s : bm.k_s;
  const u32 c_e = (mode == 1) ? bm.v_s : bm.kv_e;
  k0 = c_s & ~15u;
  k1 = (c_e + 15u) & ~15u;
}

// One slot per warp (item mode, SLOTS = 1): the next item cannot be copied into shared memory while the
// current one is decoded, so its spans are fetched into L2 meanwhile (lanes k < nb: block k), and the bulk
// copy issued when the slot frees reads them from there. Spans too large for the slot, which the decoder
// then reads from global memory, are in L2 as well.
__device__ __forceinline__ void pk_prefetch_item(const PkBlockMeta& bm, int nb, int mode, int lane) {
  if (lane >= nb || bm.rec == nullptr) return;
  u32 t0, t1, k0, k1;
  pk_block_spans(bm, mode, t0, t1, k0, k1);
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(bm.rec + t0), "r"(t1 - t0) : "memory");
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(bm.rec + k0), "r"(k1 - k0) : "memory");
}

// Lanes k < nb hold PkBlockMeta of the item's blocks; the warp copies what fits into `slot` (two bulk
// copies per block, completion on the slot's mbarrier) and records in meta[slot] where each block's
// token/K/V sections are: in the slot, in global memory (span larger than what is left of the slot),
// or the zero section (no block). Returns whether the whole item is in shared memory (warp-uniform).
// mode 0: K and V, 1: K only, 2: V only. Arrives once on the slot's mbarrier (expecting the bytes copied).
__device__ __forceinline__ bool pk_stage_item(const PkWarpSmem& ws, const u8* smem, int slot, int slot_bytes,
                                              const PkBlockMeta& bm, int nb, int mode, int lane,
                                              bool want_offsets = false) {
  u32 t0, t1, k0, k1;
  pk_block_spans(bm, mode, t0, t1, k0, k1);
  bool have = lane < nb && bm.rec != nullptr;
  u32 need = have ? (t1 - t0) + (k1 - k0) : 0u;
  // exclusive prefix of `need` over lanes (only lanes < nb are non-zero)
  u32 incl = need;
#pragma unroll
  for (int d = 1; d < PK_NBMAX; d <<= 1) {
    u32 y = __shfl_up_sync(PK_FULL, incl, d);
    if (lane >= d) incl += y;
  }
  u32 pos = incl - need;
  bool fits = have && incl + 16u <= u32(slot_bytes);   // 16 bytes of slack after the last span
  const bool all = __all_sync(PK_FULL, fits || !have);
  u8* slot_base = ws.slot0 + size_t(slot) * slot_bytes;
  if (lane < nb) {
    const u8* tp; const u8* kp; const u8* vp;
    if (!have) {
      tp = kp = vp = ws.zero;
    } else if (fits) {
      u8* d = slot_base + pos;
      tp = d + (bm.tok_s - t0);
      u8* dk = d + (t1 - t0);
      kp = dk + (bm.k_s - k0);
      vp = dk + (bm.v_s - k0);
    } else {
      tp = bm.rec + bm.tok_s; kp = bm.rec + bm.k_s; vp = bm.rec + bm.v_s;
    }
    u64* m = ws.meta + (slot * PK_NBMAX + lane) * 3;
    if (all && want_offsets) {   // offsets in the shared window (kp of mode 2 / vp of mode 1 are never read)
      m[0] = u64(u32(tp - smem)); m[1] = u64(u32(kp - smem)); m[2] = u64(u32(vp - smem));
    } else {
      m[0] = reinterpret_cast<u64>(tp); m[1] = reinterpret_cast<u64>(kp); m[2] = reinterpret_cast<u64>(vp);
    }
  }
  const u32 bytes = __reduce_add_sync(PK_FULL, fits ? need : 0u);
  if (lane == 0) pk_mbar_expect(ws.bar + slot, bytes);
  __syncwarp();
  if (fits) {
    u8* d = slot_base + pos;
    pk_bulk_copy(d, bm.rec + t0, t1 - t0, ws.bar + slot);
    pk_bulk_copy(d + (t1 - t0), bm.rec + k0, k1 - k0, ws.bar + slot);
  }
  return all;
}
