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
//   1. stage the K tile [32][D] in shared memory (rows padded by 2 halves: conflict-free half2 reads);
//   2. scores: thread -> (head g, key j) pairs, a dot of D in fp32 against q (fp32, pre-scaled, in smem);
//   3. online softmax per head (one warp per head): running max m and sum l in smem, a rescale factor;
//   4. stage the V tile, then thread -> (g, d) pairs accumulate acc = acc * rescale + sum_j p_j V[j, d]
//      in registers (G * D / 128 per thread).
// Every K and V byte of the span is read once per step for all G heads. The partial state (m, l, acc) of
// each (b, kv head, split, g) goes to a workspace; dense_attention_merge (grid (B, Hq), D threads)
// combines the splits with log-sum-exp weights, all splits at once (a chain of pairwise merges over
// ~180 splits cost more than the splits themselves: measured 376 -> see generate.json at 8000 tokens).
// Bytes per step: 2 * length * Hkv * D * 2 (K and V, fp16) + the partials (splits * Hq * (D + 2) * 4).
// Measured: part of the dense decode step in bench/results/generate.json.

#include <cuda_fp16.h>
#include <math_constants.h>

#define TILE 32
#define THREADS 128
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

extern "C" __global__ void __launch_bounds__(THREADS)
dense_attention_split(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                      const int* __restrict__ start, int extra, int Hkv, int G, int D, int capacity,
                      long long batch_stride, float scale, float* __restrict__ partial_acc,
                      float* __restrict__ partial_ml) {
    extern __shared__ float smem[];
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int row = D + 2;                                   // padded smem row, in halves
    float* q_s = smem;                                       // [G][D] fp32
    float* p_s = q_s + G * D;                                // [G][TILE] scores, then probabilities
    float* rescale_s = p_s + G * TILE;                       // [G] factor on acc for this tile
    float* m_s = rescale_s + G;                              // [G] running max
    float* l_s = m_s + G;                                    // [G] running sum
    __half* kv_s = (__half*)(l_s + G);                       // [TILE][row] K tile, then V tile

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

    for (int tile = begin; tile < end; tile += TILE) {
        const int n = min(TILE, end - tile);
        // ---- 1. K tile -> smem (half2 loads: 4 bytes per thread per step) ----------------------
        __syncthreads();
        for (int i = threadIdx.x; i < n * D / 2; i += THREADS) {
            int j = i / (D / 2), c = i % (D / 2);
            ((__half2*)(kv_s + j * row))[c] = ((const __half2*)(k_seq + (size_t)(tile + j) * D))[c];
        }
        __syncthreads();
        // ---- 2. scores of G heads x n keys ----------------------------------------------------
        for (int i = threadIdx.x; i < G * TILE; i += THREADS) {
            int g = i / TILE, j = i % TILE;
            float s = -CUDART_INF_F;
            if (j < n) {
                s = 0.f;
                const __half2* kr = (const __half2*)(kv_s + j * row);
                const float* qg = q_s + g * D;
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
        // ---- 4. V tile -> smem, then acc = acc * rescale + P V ----------------------------------
        for (int i = threadIdx.x; i < n * D / 2; i += THREADS) {
            int j = i / (D / 2), c = i % (D / 2);
            ((__half2*)(kv_s + j * row))[c] = ((const __half2*)(v_seq + (size_t)(tile + j) * D))[c];
        }
        __syncthreads();
        #pragma unroll
        for (int r = 0; r < MAX_ACC; ++r) {
            int i = threadIdx.x + r * THREADS;
            if (i >= G * D) break;
            int g = i / D, d = i % D;
            float sum = 0.f;
            for (int j = 0; j < n; ++j) sum += p_s[g * TILE + j] * __half2float(kv_s[j * row + d]);
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

extern "C" __global__ void dense_attention_merge(const float* __restrict__ partial_acc,
                                                 const float* __restrict__ partial_ml, int splits, int G,
                                                 __half* __restrict__ out) {
    // One CTA per (sequence, query head), one thread per channel d (blockDim.x == D). The splits are
    // folded in parallel, not as a chain of merges: the largest max M first, then each split's weight
    // exp(m_s - M) into shared memory, then every thread sums its channel over the splits.
    extern __shared__ float weight_s[];                     // [splits]
    __shared__ float reduce_s[32];
    const int b = blockIdx.x, h = blockIdx.y, Hq = gridDim.y, kvh = h / G, g = h % G, Hkv = Hq / G;
    const int D = blockDim.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (D + 31) / 32;
    const size_t first = (((size_t)b * Hkv + kvh) * splits) * G + g;      // state of split 0; stride G

    float m = -CUDART_INF_F;
    for (int s = threadIdx.x; s < splits; s += D) m = fmaxf(m, partial_ml[2 * (first + (size_t)s * G)]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    if (lane == 0) reduce_s[warp] = m;
    __syncthreads();
    m = -CUDART_INF_F;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, reduce_s[w]);
    __syncthreads();

    float l = 0.f;
    for (int s = threadIdx.x; s < splits; s += D) {
        size_t index = first + (size_t)s * G;
        float split_m = partial_ml[2 * index], split_l = partial_ml[2 * index + 1];
        float w = split_l > 0.f ? __expf(split_m - m) : 0.f;
        weight_s[s] = w;
        l += w * split_l;
    }
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffff, l, o);
    if (lane == 0) reduce_s[warp] = l;
    __syncthreads();
    l = 0.f;
    for (int w = 0; w < warps; ++w) l += reduce_s[w];

    float acc = 0.f;
    #pragma unroll 4
    for (int s = 0; s < splits; ++s)
        if (weight_s[s] > 0.f) acc += weight_s[s] * partial_acc[(first + (size_t)s * G) * D + threadIdx.x];
    out[((size_t)b * Hq + h) * D + threadIdx.x] = __float2half(acc / l);
}
