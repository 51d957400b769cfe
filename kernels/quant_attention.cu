/*
quant_attention.cu: decode attention over the `quant` cache (KIVI-style group quantization, the baseline
packkv is measured against; record layout in packkv/quant.py), decompressing in registers.

What it computes
  The split half of flash-decoding, like pk_attention_splits: a CTA per (split of the blocks, KV head and
  tile of GT query heads of its GQA group, sequence) attends q over its blocks (records at
  arena + block_offsets[b, i]) and writes one softmax state (o[D], m, l) per query head and split, in the
  log2 domain (q pre-multiplied by log2(e) / sqrt(D)). pk_merge_window (packkv_attention.cu) then merges
  the splits with the fp16 window: the two caches share the workspace layout and the merge.

Decode math (K per channel, V per token and group of TB channels; x_hat = code * scale + zero):
  q . k_t = sum_d (q_d scale_d) code[d, t] + sum_d q_d zero_d    (both sums per block, the first per token)
  sum_t p_t v_t[d] = sum_t (p_t vscale_t) code[t, d] + sum_t p_t vzero_t   (a lane's channels share a group)

Thread mapping (CTA = 4 warps; warp w takes blocks first + w, first + w + 4, ... of the split)
  per block: lanes over channels fold the K scales into q (q_d scale_d to shared memory) and sum q . zero;
  K: lane l owns tokens l*TPL .. l*TPL + TPL - 1 (TPL = TB / 32): per channel one 1- or 2-byte load holds
  its TPL codes (a warp reads the channel's row of TB codes, contiguous); GT x TPL scores in registers.
  softmax: per query head a running max and sum (ex2), the block's weights to shared memory.
  V: lane l owns channels l*DPL .. l*DPL + DPL - 1 (DPL = D / 32): per token one load of its DPL codes
  (a warp reads the token's D codes of this KV head, contiguous), the token's scale and zero, GT weights
  from shared memory; fp32 accumulators GT x DPL (codes) + GT (zeros).
  The CTA's four warp states merge through shared memory into one state per query head.
Bytes per token and layer (8 KV heads x 128, 2 bits, group 32): 768 (fp16: 4096; 3 bits per element).

Measured (H100, whole decode steps of the 8B shape with random weights, 2 bits, group 32; bench/generate.py,
bench/results/generate_llama-3.1-8b_b1_quant.json): 53.3 tok/s at 128K tokens (dense fp16 61.2, packkv
67.5 in the same run), 104.7 at 32K (dense 111.9). The baseline's kernel, written for clarity and
coalesced loads; tuned only in its grid: about 8 CTAs per SM (splits_over) instead of packkv's 2 took
128K from 35.2 to 53.3 tok/s (2 CTAs per SM left the loads' latency exposed with 8 warps per SM).
*/
#include "packkv_common.cuh"
#include "launch.cuh"

#define QT_WARPS 4
#define QT_NEG_INF (-__int_as_float(0x7f800000))

// NB consecutive bits of a row of packed codes, those of `lane` (NB in 2, 4, 8, 16), low bits first.
template <int NB>
__device__ __forceinline__ u32 qt_lane_bits(const u8* row, int lane) {
  if constexpr (NB == 16) {
    return *reinterpret_cast<const u16*>(row + 2 * lane);
  } else {
    const u32 bit = u32(lane) * NB;
    return u32(row[bit >> 3]) >> (bit & 7u);
  }
}

__device__ __forceinline__ float qt_warp_sum(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(PK_FULL, v, s);
  return v;
}

__device__ __forceinline__ float qt_warp_max(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(PK_FULL, v, s));
  return v;
}

// The online-softmax state of one query head over some tokens (log2 domain): the largest score m and
// the sum l of exp2(score - m); the weighted values live beside it in registers.
struct QtState {
  float m, l;
};

template <int D, int BITS, int GT, int TB>
__global__ void __launch_bounds__(QT_WARPS * 32) qt_attention_splits(
    const u16* __restrict__ q, const u8* const* __restrict__ arena_at, const i64* __restrict__ block_offsets,
    const int* __restrict__ n_blocks, int max_blocks, int Hkv, int G, int n_splits, float qscale,
    float* __restrict__ ws) {
  wait_for_previous_kernel();
  constexpr int TPL = TB / 32, DPL = D / 32, MASK = (1 << BITS) - 1;
  static_assert(TPL * BITS <= 16 && DPL * BITS <= 16, "a lane's codes must fit one 16-bit load");
  extern __shared__ float smem[];
  float* q_tile = smem;                                   // [GT][D] q * qscale
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* q_scaled = smem + GT * D + warp * GT * (D + TB);  // [GT][D] q * k scale, this warp's block
  float* weight = q_scaled + GT * D;                      // [GT][TB] softmax weights of this warp's block
  __shared__ float warp_m[QT_WARPS][GT], warp_l[QT_WARPS][GT];

  const int tiles = (G + GT - 1) / GT, kvh = blockIdx.y / tiles, h0 = (blockIdx.y % tiles) * GT;
  const int b = blockIdx.z, split = blockIdx.x, Hq = Hkv * G, C = Hkv * D;
  const u8* arena = *arena_at;   // read from device memory: a captured graph survives the arena moving
  // the record's fields (packkv/quant.py): k_scale, k_zero [C]; v_scale, v_zero [TB][C / TB]; codes
  const int k_codes_at = 8 * C, v_codes_at = 8 * C + C * TB * BITS / 8;
  const int k_row_bytes = TB * BITS / 8, v_row_bytes = C * BITS / 8, groups = C / TB;

  for (int i = threadIdx.x; i < GT * D; i += QT_WARPS * 32) {
    const int g = i / D, head = kvh * G + h0 + g;
    q_tile[i] = h0 + g < G ? pk_h2float(q[(size_t(b) * Hq + head) * D + i % D]) * qscale : 0.f;
  }
  __syncthreads();

  const int per_split = (max_blocks + n_splits - 1) / n_splits, first = split * per_split;
  const int last = min(first + per_split, n_blocks[b]);
  QtState st[GT];
  float o_code[GT][DPL], o_zero[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    st[g] = {QT_NEG_INF, 0.f};
    o_zero[g] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) o_code[g][i] = 0.f;
  }

  for (int blk = first + warp; blk < last; blk += QT_WARPS) {
    const u8* rec = arena + block_offsets[size_t(b) * max_blocks + blk];
    const u16* k_scale = reinterpret_cast<const u16*>(rec) + kvh * D;
    const u16* k_zero = reinterpret_cast<const u16*>(rec + 2 * C) + kvh * D;

    // ---- 1. fold the K scales into q; q . zero ----------------------------------------------------
    float qz[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) qz[g] = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float s = pk_h2float(k_scale[d]), z = pk_h2float(k_zero[d]);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        q_scaled[g * D + d] = q_tile[g * D + d] * s;
        qz[g] += q_tile[g * D + d] * z;
      }
    }
#pragma unroll
    for (int g = 0; g < GT; ++g) qz[g] = qt_warp_sum(qz[g]);
    __syncwarp();

    // ---- 2. scores of the lane's TPL tokens: a row of codes per channel ----------------------------
    float s[GT][TPL];
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int j = 0; j < TPL; ++j) s[g][j] = qz[g];
    const u8* k_rows = rec + k_codes_at + size_t(kvh) * D * k_row_bytes;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      const u32 bits = qt_lane_bits<TPL * BITS>(k_rows + d * k_row_bytes, lane);
#pragma unroll
      for (int j = 0; j < TPL; ++j) {
        const float code = float((bits >> (j * BITS)) & MASK);
#pragma unroll
        for (int g = 0; g < GT; ++g) s[g][j] += q_scaled[g * D + d] * code;
      }
    }

    // ---- 3. online softmax: rescale what the warp holds, the block's weights to shared memory ------
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mx = s[g][0];
#pragma unroll
      for (int j = 1; j < TPL; ++j) mx = fmaxf(mx, s[g][j]);
      const float m_new = fmaxf(st[g].m, qt_warp_max(mx));
      const float correction = pk_exp2(st[g].m - m_new);   // 0 for the first block (m = -inf)
      st[g].m = m_new;
      st[g].l *= correction;                               // a lane's partial sum, reduced at the end
      o_zero[g] *= correction;
#pragma unroll
      for (int i = 0; i < DPL; ++i) o_code[g][i] *= correction;
#pragma unroll
      for (int j = 0; j < TPL; ++j) {
        const float p = pk_exp2(s[g][j] - m_new);
        st[g].l += p;
        weight[g * TB + lane * TPL + j] = p;
      }
    }
    __syncwarp();

    // ---- 4. values: a token's codes of this head, its scale and zero (one group per lane) ----------
    const int channel = kvh * D + lane * DPL, group = channel / TB;
    const u16* v_scale = reinterpret_cast<const u16*>(rec + 4 * C) + group;
    const u16* v_zero = reinterpret_cast<const u16*>(rec + 6 * C) + group;
    const u8* v_rows = rec + v_codes_at + size_t(kvh) * D * BITS / 8;
#pragma unroll 4
    for (int t = 0; t < TB; ++t) {
      const u32 bits = qt_lane_bits<DPL * BITS>(v_rows + size_t(t) * v_row_bytes, lane);
      const float vs = pk_h2float(v_scale[t * groups]), vz = pk_h2float(v_zero[t * groups]);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float p = weight[g * TB + t], ps = p * vs;
        o_zero[g] += p * vz;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o_code[g][i] += ps * float((bits >> (i * BITS)) & MASK);
      }
    }
    __syncwarp();   // the next block overwrites q_scaled and weight
  }

  // ---- 5. merge the four warps' states into one per query head; write it -------------------------
  __syncthreads();                                      // every warp is done with its q_scaled
  float* warp_o = smem + GT * D + warp * GT * (D + TB);  // reuses q_scaled: [GT][D] this warp's o
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const float l = qt_warp_sum(st[g].l);
#pragma unroll
    for (int i = 0; i < DPL; ++i) warp_o[g * D + lane * DPL + i] = o_code[g][i] + o_zero[g];
    if (lane == 0) { warp_m[warp][g] = st[g].m; warp_l[warp][g] = l; }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < GT * (D + 2); i += QT_WARPS * 32) {
    const int g = i / (D + 2), d = i % (D + 2);
    if (h0 + g >= G) continue;
    float M = QT_NEG_INF;
#pragma unroll
    for (int w = 0; w < QT_WARPS; ++w) M = fmaxf(M, warp_m[w][g]);
    float value = d == D ? M : 0.f;
    if (d != D && M != QT_NEG_INF) {
#pragma unroll
      for (int w = 0; w < QT_WARPS; ++w) {
        const float scale = warp_m[w][g] == QT_NEG_INF ? 0.f : pk_exp2(warp_m[w][g] - M);
        value += scale * (d < D ? smem[GT * D + w * GT * (D + TB) + g * D + d] : warp_l[w][g]);
      }
    }
    const int head = kvh * G + h0 + g;
    ws[((size_t(b) * Hq + head) * n_splits + split) * (D + 2) + d] = value;
  }
}

#ifndef __CUDACC_RTC__
// nvcc compile check (tests/test_kernels_compile.py); at run time nvrtc instantiates what is launched.
template __global__ void qt_attention_splits<128, 2, 4, 32>(const u16*, const u8* const*, const i64*, const int*, int,
                                                            int, int, int, float, float*);
template __global__ void qt_attention_splits<64, 4, 4, 128>(const u16*, const u8* const*, const i64*, const int*, int,
                                                            int, int, int, float, float*);
#endif
