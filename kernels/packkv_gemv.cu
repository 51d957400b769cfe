/*
packkv_gemv.cu: the PackKV paper's standalone decompress-GEMV kernels, over compressed blocks in storage
order (no softmax), with GQA: every compressed byte is read once for all query heads of its KV group.

What they compute
  pk_k_gemv:  scores[b, h, t] = q[b, h] . K_hat[b, kv(h), t]          fp32 [B, Hq, max_blocks * block]
              (t = block index * block + storage token; blocks >= n_blocks[b] score 0)
  pk_v_gemv:  partial sums over splits of  p[b, h, :] . V_hat[b, kv(h), :, d]; pk_v_reduce adds the
              splits: out fp32 [B, Hq, D]. p is fp16 or fp32 [B, Hq, max_blocks * block].
Both are the fused kernel's halves (packkv_split.cuh; thread mapping in packkv_attention.cu's header):
  K-GEMV: lane (gq, tq) decodes 16 storage tokens x 4 channels per 16-channel tile, PRMT to the mma A
  layout, mma with q (fp16 x fp16 -> fp32); scores = step * (q.level + off * sum(q)) stored as four
  float4 per head and lane (16 consecutive tokens: full 64-byte segments).
  V-GEMV: lane (gq, tq) reads p of 16 tokens (its group) for head n-slot gq, scales by step_v to fp16,
  decodes 16 tokens x 2 channels per tile straight into the mma A layout, accumulates o in fp32.
Staging, offsets and shared memory as in packkv_attention.cu's item mode with two slots per warp (q's
fragments once per CTA); only the K (or V) sections and the token section are staged. Bytes per token (8 KV heads x 128, defaults): ~300 compressed bytes read per token,
plus the fp32 scores written (K-GEMV: 4 bytes per query head) or p read (V-GEMV: 2 or 4 bytes per head).

Registers: K-GEMV 157, V-GEMV 108-109 (nvcc 13.0 sm_90 -Xptxas -v, D=64/128; launch bounds for 3 CTAs =
12 warps per SM; slots sized for it: 6,992 B (K) and 5,200 B (V) at D=128).

Measured (H100 80GB HBM3, `python3 bench/attention.py`, bench/results/attention.json, CUDA graphs over
  layer copies larger than L2), 32/8/128 at 128K tokens, real-valued K/V: K-GEMV 78.3 us (cupy.matmul
  fp16 K.q^T 929 us: 11.9x), V-GEMV 98.2 us (cupy.matmul fp16 p.V 4704 us: 47.9x); random K/V: 148.5 us
  (6.3x) and 142.4 us (33x). SmolLM2 9/3/64 real, 128K: 22.3 us and 31.2 us. cuBLAS is timed without a
  graph (capture failed), so below ~16K its numbers are launch overhead.
*/
#include "packkv_split.cuh"

template <int D, int P>
__global__ void __launch_bounds__(128, PK_MINB_GEMV) pk_k_gemv(
    const u16* __restrict__ q, const u8* __restrict__ arena, const i64* __restrict__ block_offsets,
    const int* __restrict__ n_blocks, int max_blocks, int Hkv, int G, int T, int token_layer, int n_splits,
    int slot_bytes, float* __restrict__ scores) {
  pk_split_body<D, P, 1>(q, nullptr, 0, arena, block_offsets, n_blocks, max_blocks, Hkv, G, T, token_layer,
                         n_splits, slot_bytes, 1.0f, scores);
}

template <int D, int P>
__global__ void __launch_bounds__(128, PK_MINB_GEMV) pk_v_gemv(
    const void* __restrict__ p, int p_half, const u8* __restrict__ arena, const i64* __restrict__ block_offsets,
    const int* __restrict__ n_blocks, int max_blocks, int Hkv, int G, int T, int token_layer, int n_splits,
    int slot_bytes, float* __restrict__ ws) {
  pk_split_body<D, P, 2>(nullptr, p, p_half, arena, block_offsets, n_blocks, max_blocks, Hkv, G, T, token_layer,
                         n_splits, slot_bytes, 1.0f, ws);
}

// out[b, h, d] = sum over splits of ws[b, h, split, d]; a thread per (b, h, d).
__global__ void pk_v_reduce(const float* __restrict__ ws, int n_splits, int D, int total, float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int bh = i / D, d = i % D;
  const float* src = ws + size_t(bh) * n_splits * D + d;
  float acc = 0.f;
  for (int s = 0; s < n_splits; ++s) acc += src[size_t(s) * D];
  out[i] = acc;
}

#ifndef __CUDACC_RTC__
template __global__ void pk_k_gemv<128, 16>(const u16*, const u8*, const i64*, const int*, int, int, int, int, int, int,
                                            int, float*);
template __global__ void pk_v_gemv<128, 16>(const void*, int, const u8*, const i64*, const int*, int, int, int, int, int,
                                            int, int, float*);
template __global__ void pk_k_gemv<64, 16>(const u16*, const u8*, const i64*, const int*, int, int, int, int, int, int,
                                           int, float*);
template __global__ void pk_v_gemv<64, 16>(const void*, int, const u8*, const i64*, const int*, int, int, int, int, int,
                                           int, int, float*);
#endif
