/*
packkv_decompress.cu: decompress records of the v1 format (docs/FORMAT.md) to fp16 K and V.

What it computes
  k[n, h, t, d], v[n, h, t, d] = (level + off_t) * step_t in fp32, rounded to fp16, tokens in storage
  order, for the records at arena + offsets[n] (any order, any repetition). Used by the cache for prefill
  chunks (dense attention over a few tokens' worth of compressed history) and by tests as the plain,
  obviously-correct GPU reading of the format.
Thread mapping: a CTA per (record, KV head, K|V), 256 threads. Phase 1: per-token step and offset of
  the section's unit into shared memory. Phase 2, per pack row: each thread reads the (width, min) header
  fields of up to 4 adjacent channels, a block-wide exclusive scan (warp shuffles + shared warp totals)
  of their payload bytes gives every pack's offset; then thread i decodes values i, i+256, ... of the
  row (channel-fastest, so the fp16 stores are coalesced), one 32-bit window per value.
Shared memory: 8 bytes per token, 12 bytes per channel. Not the fast path: it exists to be simple.
*/
#include "packkv_common.cuh"

template <int P>
__global__ void __launch_bounds__(256) pk_decompress(
    const u8* __restrict__ arena, const i64* __restrict__ offsets, int H, int T, int D, int token_layer,
    u16* __restrict__ k_out, u16* __restrict__ v_out) {
  extern __shared__ __align__(16) u8 smem[];
  float* step = reinterpret_cast<float*>(smem);              // [T]
  int* off = reinterpret_cast<int*>(step + T);               // [T]
  u32* poff = reinterpret_cast<u32*>(off + T);               // [D] payload offset of each pack of the row
  u32* pw = poff + D;                                        // [D] width
  int* pm = reinterpret_cast<int*>(pw + D);                  // [D] min
  __shared__ u32 warp_tot[8];
  const int n = blockIdx.x, h = blockIdx.y, kv = blockIdx.z, tid = threadIdx.x;
  const u8* rec = arena + offsets[n];
  const u32* tbl = reinterpret_cast<const u32*>(rec + 12);
  const int n_units = token_layer ? 1 : H;
  const u8* tok = rec + tbl[token_layer ? 0 : h];
  const u8* sec = rec + tbl[n_units + 2 * h + kv];

  // phase 1: token parameters
  {
    const u32 hdr0 = pk_ld32(tok), hdr1 = pk_ld32(tok + 4);
    const int kbase = int(short(hdr0 & 0xffffu)), vbase = int(short(hdr0 >> 16));
    const u32 kb = hdr1 & 0xffu, vb = (hdr1 >> 8) & 0xffu;
    const u8* kstream = tok + 8 + 4 * T;
    const u8* vstream = kstream + (u32(T) * kb) / 8u;
    for (int t = tid; t < T; t += blockDim.x) {
      step[t] = pk_h2float(*reinterpret_cast<const u16*>(tok + 8 + 2 * (kv * T + t)));
      off[t] = kv == 0 ? kbase + int(pk_bits32_at(kstream, u32(t) * kb) & ((1u << kb) - 1u))
                       : vbase + int(pk_bits32_at(vstream, u32(t) * vb) & ((1u << vb) - 1u));
    }
  }
  const int R = T / P;
  const PkSection S = pk_section(sec, R, D);
  u16* out = (kv == 0 ? k_out : v_out) + (size_t(n) * H + h) * size_t(T) * D;
  const int lane = tid & 31, warp = tid >> 5;
  u32 row_base = 0;
  for (int r = 0; r < R; ++r) {
    // phase 2a: this thread's channels c0 .. c0+3 of row r: widths, mins, payload bytes
    const int c0 = 4 * tid;
    u32 mine = 0;
    u32 w[4] = {0, 0, 0, 0};
    int mn[4] = {0, 0, 0, 0};
    for (int k = 0; k < 4; ++k) {
      if (c0 + k < D) {
        const u32 x = pk_bits32(S.hdr, (u32(r) * D + c0 + k) * S.F);
        w[k] = x & S.wmask;
        mn[k] = S.min_base + int((x >> S.WB) & S.mmask);
        mine += u32(P / 8) * w[k];
      }
    }
    u32 incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const u32 y = __shfl_up_sync(PK_FULL, incl, d);
      if (lane >= d) incl += y;
    }
    __syncthreads();   // previous row done with poff/pw/pm and warp_tot
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    u32 before = 0, row_total = 0;
    for (int i = 0; i < int(blockDim.x / 32); ++i) {
      if (i < warp) before += warp_tot[i];
      row_total += warp_tot[i];
    }
    u32 o = row_base + before + incl - mine;
    for (int k = 0; k < 4; ++k) {
      if (c0 + k < D) { poff[c0 + k] = o; pw[c0 + k] = w[k]; pm[c0 + k] = mn[k]; o += u32(P / 8) * w[k]; }
    }
    __syncthreads();
    // phase 2b: values of the row, channel-fastest
    for (int i = tid; i < P * D; i += blockDim.x) {
      const int j = i / D, c = i % D, t = r * P + j;
      const u32 wc = pw[c];
      const u32 v = pk_bits32_at(S.payload + poff[c], u32(j) * wc) & ((1u << wc) - 1u);
      const int level = pm[c] + int(v);
      out[size_t(t) * D + c] = pk_float2h(float(level + off[t]) * step[t]);
    }
    row_base += row_total;
  }
}

#ifndef __CUDACC_RTC__
template __global__ void pk_decompress<8>(const u8*, const i64*, int, int, int, int, u16*, u16*);
template __global__ void pk_decompress<16>(const u8*, const i64*, int, int, int, int, u16*, u16*);
template __global__ void pk_decompress<32>(const u8*, const i64*, int, int, int, int, u16*, u16*);
#endif
