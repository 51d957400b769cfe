// dense_attention.cu: attention of one new query token per sequence over an fp16 K/V cache (the dense
// cache's decode step), flash-decoding style, with GQA.
//
//   out[b, h] = softmax_j(q[b, h] . K[b, h / G, j] / sqrt(D)) V[b, h / G, j],  j < length[b]
//
// length[b] = start[b] + extra is read from device memory, and the grid does not depend on it, so the
// launch can be captured in a CUDA graph and replayed as sequences grow.
//
// Thread mapping. dense_attention_split: grid (splits, Hkv, B), 128 threads. A CTA owns the G query
// heads of one KV head and a contiguous span of ceil(length / splits) keys (rounded up to a tile), walked
// in tiles of 32 keys:
//   1. store the K and V tiles [32][D], prefetched into registers (16-byte loads) while the previous tile
//      was computed, in shared memory (rows padded by 2 halves: conflict-free half2 reads);
//   2. scores: thread -> (head g, key j) pairs, a dot of D in fp32 against q (fp32, pre-scaled, in smem);
//   3. online softmax per head (one warp per head): running max m and sum l in smem, a rescale factor;
//   4. thread -> (g, d) pairs accumulate acc = acc * rescale + sum_j p_j V[j, d]
//      in registers (G * D / 128 per thread).
// Every K and V byte of the span is read once per step for all G heads. The partial state (m, l, acc) of
// each (b, kv head, split, g) goes to a workspace; dense_attention_merge (grid (B, Hq), 1024 threads)
// combines the splits with log-sum-exp weights, all splits at once (a chain of pairwise merges over
// ~180 splits cost more than the splits themselves).
// Bytes per step: 2 * length * Hkv * D * 2 (K and V, fp16) + the partials (splits * Hq * (D + 2) * 4).
// Measured: part of the dense decode step in bench/results/generate.json.

#include <cuda_fp16.h>
#include <math_constants.h>
#include "launch.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128          // the launcher compiles one module per head_dim (-DHEAD_DIM=...)
#endif
#define TILE 32
#define THREADS 128
#define MERGE_THREADS 1024
#define MAX_ACC 16            // G * D / THREADS registers per thread: G * D <= 2048

// The online-softmax state of one query head: max score m and sum l of exp(s - m); the caller keeps
// the matching sum of exp(s - m) * v. merge() folds another state in and returns the factors by which
// this state's and the other's accumulators must be scaled.
struct AttentionState {
    float m, l;
    __device__ float2 merge(AttentionState other) {
        float m_new = fmaxf(m, other.m);
        float self_scale = m == -CUDART_INF_F ? 0.f : __expf(m - m_new);
        float other_scale = other.m == -CUDART_INF_F ? 0.f : __expf(other.m - m_new);
        l = l * self_scale + other.l * other_scale;
        m = m_new;
        return make_float2(self_scale, other_scale);
    }
};

// Max or sum over the CTA (blockDim.x == MERGE_THREADS), the result in every thread.
__device__ float block_reduce(float v, bool is_max, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    __syncthreads();                                         // scratch may still be read by a previous call
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < MERGE_THREADS / 32; ++w) v = is_max ? fmaxf(v, scratch[w]) : v + scratch[w];
    return v;
}

extern "C" __global__ void __launch_bounds__(THREADS, 4)    // 4 CTAs (16 warps) per SM: <= 128 registers
dense_attention_split(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                      const int* __restrict__ start, int extra, int Hkv, int G, int capacity,
                      long long batch_stride, float scale, float* __restrict__ partial_acc,
                      float* __restrict__ partial_ml) {
    wait_for_previous_kernel();
    constexpr int D = HEAD_DIM;                              // compile-time: the channel loops unroll
    constexpr int PREFETCH = (TILE * D / 8 + THREADS - 1) / THREADS;   // 16-byte chunks of a K tile per thread
    extern __shared__ float smem[];
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int row = D + 2;                                   // padded smem row, in halves
    float* q_s = smem;                                       // [G][D] fp32
    float* p_s = q_s + G * D;                                // [G][TILE] scores, then probabilities
    float* rescale_s = p_s + G * TILE;                       // [G] factor on acc for this tile
    float* m_s = rescale_s + G;                              // [G] running max
    float* l_s = m_s + G;                                    // [G] running sum
    __half* k_s = (__half*)(l_s + G);                        // [TILE][row] K tile
    __half* v_s = k_s + TILE * row;                          // [TILE][row] V tile

    // ---- which keys: a span of this sequence's keys, tile-aligned --------------------------------
    const int length = start[b] + extra;
    const int span = ((length + splits - 1) / splits + TILE - 1) / TILE * TILE;
    const int begin = split * span, end = min(length, begin + span);
    const int state_index = ((b * Hkv + kvh) * splits + split) * G;
    if (begin >= end) {                                      // idle split: an empty state
        for (int g = threadIdx.x; g < G; g += THREADS) {
            partial_ml[2 * (state_index + g)] = -CUDART_INF_F;
            partial_ml[2 * (state_index + g) + 1] = 0.f;
        }
        return;
    }
    const __half* k_seq = k + (size_t)b * batch_stride + (size_t)kvh * capacity * D;
    const __half* v_seq = v + (size_t)b * batch_stride + (size_t)kvh * capacity * D;
    for (int i = threadIdx.x; i < G * D; i += THREADS)
        q_s[i] = __half2float(q[((size_t)b * Hkv * G + kvh * G) * D + i]) * scale;
    for (int g = threadIdx.x; g < G; g += THREADS) { m_s[g] = -CUDART_INF_F; l_s[g] = 0.f; }

    float acc[MAX_ACC];
    #pragma unroll
    for (int r = 0; r < MAX_ACC; ++r) acc[r] = 0.f;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    // The next tile's K and V wait in registers (16-byte chunks) while this tile is computed, so the
    // global loads of tile i + 1 overlap the arithmetic of tile i.
    const int chunks = D / 8;                                // 16-byte chunks per row
    uint4 k_next[PREFETCH], v_next[PREFETCH];
    auto load_tile = [&](int tile) {
        const int n = min(TILE, end - tile);
        #pragma unroll
        for (int r = 0; r < PREFETCH; ++r) {
            const int i = threadIdx.x + r * THREADS;
            if (i < n * chunks) {
                const size_t at = (size_t)(tile + i / chunks) * D + (i % chunks) * 8;
                k_next[r] = *(const uint4*)(k_seq + at);
                v_next[r] = *(const uint4*)(v_seq + at);
            }
        }
    };
    load_tile(begin);
    for (int tile = begin; tile < end; tile += TILE) {
        const int n = min(TILE, end - tile);
        // ---- 1. the prefetched K and V tiles -> smem (rows padded by 2 halves: conflict-free reads) --
        __syncthreads();
        #pragma unroll
        for (int r = 0; r < PREFETCH; ++r) {
            const int i = threadIdx.x + r * THREADS;
            if (i < n * chunks) {
                unsigned* kd = (unsigned*)(k_s + (i / chunks) * row + (i % chunks) * 8);
                unsigned* vd = (unsigned*)(v_s + (i / chunks) * row + (i % chunks) * 8);
                kd[0] = k_next[r].x; kd[1] = k_next[r].y; kd[2] = k_next[r].z; kd[3] = k_next[r].w;
                vd[0] = v_next[r].x; vd[1] = v_next[r].y; vd[2] = v_next[r].z; vd[3] = v_next[r].w;
            }
        }
        __syncthreads();
        if (tile + TILE < end) load_tile(tile + TILE);
        // ---- 2. scores of G heads x n keys ----------------------------------------------------
        for (int i = threadIdx.x; i < G * TILE; i += THREADS) {
            int g = i / TILE, j = i % TILE;
            float s = -CUDART_INF_F;
            if (j < n) {
                s = 0.f;
                const __half2* kr = (const __half2*)(k_s + j * row);
                const float* qg = q_s + g * D;
                #pragma unroll 16
                for (int c = 0; c < D / 2; ++c) {
                    float2 kf = __half22float2(kr[c]);
                    s += qg[2 * c] * kf.x + qg[2 * c + 1] * kf.y;
                }
            }
            p_s[i] = s;
        }
        __syncthreads();
        // ---- 3. online softmax: warp w handles heads w, w + 4, ...; state of head g in smem ------
        for (int g = warp; g < G; g += THREADS / 32) {
            float s = p_s[g * TILE + lane];
            float tile_max = s;
            for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, o));
            float p = s == -CUDART_INF_F ? 0.f : __expf(s - tile_max);
            float tile_sum = p;
            for (int o = 16; o > 0; o >>= 1) tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, o);
            AttentionState running = {m_s[g], l_s[g]};
            float2 f = running.merge({tile_max, tile_sum});
            p_s[g * TILE + lane] = p * f.y;                  // probabilities on the running scale
            if (lane == 0) { m_s[g] = running.m; l_s[g] = running.l; rescale_s[g] = f.x; }
        }
        __syncthreads();
        // ---- 4. acc = acc * rescale + P V ---------------------------------------------------------
        #pragma unroll
        for (int r = 0; r < MAX_ACC; ++r) {
            int i = threadIdx.x + r * THREADS;
            if (i >= G * D) break;
            int g = i / D, d = i % D;
            float sum = 0.f;
            for (int j = 0; j < n; ++j) sum += p_s[g * TILE + j] * __half2float(v_s[j * row + d]);
            acc[r] = acc[r] * rescale_s[g] + sum;
        }
    }
    // ---- write the partial state ---------------------------------------------------------------
    #pragma unroll
    for (int r = 0; r < MAX_ACC; ++r) {
        int i = threadIdx.x + r * THREADS;
        if (i >= G * D) break;
        partial_acc[(size_t)state_index * D + i] = acc[r];
    }
    for (int g = threadIdx.x; g < G; g += THREADS) {
        partial_ml[2 * (state_index + g)] = m_s[g];
        partial_ml[2 * (state_index + g) + 1] = l_s[g];
    }
}

extern "C" __global__ void __launch_bounds__(MERGE_THREADS)
dense_attention_merge(const float* __restrict__ partial_acc, const float* __restrict__ partial_ml, int splits,
                      int G, int D, __half* __restrict__ out) {
    wait_for_previous_kernel();
    // One CTA per (sequence, query head). The splits are folded in parallel, never as a chain: the largest
    // max M (block reduction), each split's weight exp(m_s - M) into shared memory and the total L, then a
    // thread per (channel pair, slice of the splits) sums weight * acc with independent loads, and the
    // slices are added through shared memory. (A thread per channel walking all splits took 18 us per
    // layer for 9/3/64 at 8K tokens, with 176 splits: a chain of dependent loads.)
    extern __shared__ float weight_s[];                      // [splits]
    __shared__ float reduce_s[32];
    __shared__ float2 slice_s[MERGE_THREADS];
    const int b = blockIdx.x, h = blockIdx.y, Hq = gridDim.y, kvh = h / G, g = h % G, Hkv = Hq / G;
    const size_t first = (((size_t)b * Hkv + kvh) * splits) * G + g;      // state of split 0; stride G

    float m = -CUDART_INF_F;
    for (int s = threadIdx.x; s < splits; s += MERGE_THREADS) m = fmaxf(m, partial_ml[2 * (first + (size_t)s * G)]);
    m = block_reduce(m, true, reduce_s);
    float l = 0.f;
    for (int s = threadIdx.x; s < splits; s += MERGE_THREADS) {
        size_t index = first + (size_t)s * G;
        float split_m = partial_ml[2 * index], split_l = partial_ml[2 * index + 1];
        float w = split_l > 0.f ? __expf(split_m - m) : 0.f;
        weight_s[s] = w;
        l += w * split_l;
    }
    l = block_reduce(l, false, reduce_s);                    // its barriers also publish weight_s

    const int pairs = D / 2, slices = MERGE_THREADS / pairs;
    const int pair = threadIdx.x % pairs, slice = threadIdx.x / pairs;
    float2 acc = make_float2(0.f, 0.f);
    if (slice < slices) {
        #pragma unroll 4
        for (int s = slice; s < splits; s += slices) {
            const float w = weight_s[s];
            if (w > 0.f) {
                const float2 x = ((const float2*)(partial_acc + (first + (size_t)s * G) * D))[pair];
                acc.x += w * x.x;
                acc.y += w * x.y;
            }
        }
    }
    slice_s[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < pairs) {
        for (int i = 1; i < slices; ++i) { acc.x += slice_s[i * pairs + threadIdx.x].x; acc.y += slice_s[i * pairs + threadIdx.x].y; }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        ((__half2*)(out + ((size_t)b * Hq + h) * D))[threadIdx.x] = __floats2half2_rn(acc.x * inv, acc.y * inv);
    }
}
