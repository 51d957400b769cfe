// model_ops.cu: the small per-token operations of the Llama forward pass, fused so that one decode step
// is a few launches per layer instead of dozens of CuPy elementwise calls (which, at batch 1, cost far
// more host time than GPU time), and so that positions come from device memory (a captured CUDA graph
// replays with each step's positions without being rebuilt).
//
// NumPy reference twins: model/llama.py (the xp code of rms_norm, rope, silu_mul, norm_linear, linear) and
// packkv/cache.py (DenseCache's slice assignment); tests/test_model_ops_gpu.py checks each against them.
//
//   rms_norm       x fp32 [rows, H], w fp32 [H] -> out fp16 [rows, H].
//                  One CTA per row, ~H/4 threads (up to 1024: a single thread's chain of dependent loads
//                  was the cost, 10 us at H = 4096 with 256 threads); a block-wide sum of squares (warp
//                  shuffles, then one warp over the warps' partials). Bytes per row: 4H read twice (L1), 2H
//                  written.
//   rope_split     qkv fp16 [B*T, (Hq + 2 Hkv) * D] -> q [B, Hq, T, D], k, v [B, Hkv, T, D], fp16;
//                  q and k rotated by RoPE ("rotate half" pairs (i, i + D/2)) at position start[b] + t,
//                  angles from fp32 cos/sin tables [positions, D/2]. One thread per (row, head, pair).
//                  Or k and v written into the cache's fp16 slots instead (at per-sequence offsets read
//                  on the device): RoPE and the K/V append in one launch.
//   silu_mul       gate_up fp16 [rows, 2I] -> act fp16 [rows, I] = silu(gate) * up, in fp32.
//   append_kv      k, v fp16 [B, Hkv, T, D] -> written into cache layer slices [B, Hkv, capacity, D] at token
//                  offset start[b] (device int32): one launch appends K and V of every sequence.
//   linear_rows    y fp16 [rows, out] = x fp16 [rows, in] . W fp16 [out, in]^T (+ bias fp32), rows <= 8,
//                  or added in place to the fp32 residual stream, or SiLU(gate) * up of a fused gate/up W:
//                  the decode-time matmuls (a GEMV per sequence). CuPy refuses cuBLAS calls during stream
//                  capture, and at a handful of rows the product is a pure stream of W anyway. One warp
//                  per output feature; each lane loads 16 bytes (8 weights) per iteration, two iterations
//                  in flight, multiplies them with the same 8 inputs of every row (L1-resident: every warp
//                  reads the same x) in fp32, and the warp reduces by shuffles. Bytes per call: 2 * out * in
//                  (W, read once) + rows * (2 * in (x, L1/L2) + 2 * out (y)).
//   linear_rows_mma the same contract on tensor cores, rows <= 16: at 8 rows the warp-per-feature kernel
//                  spends ~100 instructions per 16 weight bytes (a fp32 FMA per weight and row) and is
//                  issue-bound, while one mma.m16n8k16 multiplies a 16 x 16 weight tile by 8 rows. A CTA
//                  of 8 warps owns 16 output features (and their 16 up rows with swiglu); warp w walks the
//                  32-input steps w, w + 8, ... (split-K), 4 steps' loads in flight (2 with gate/up, whose
//                  steps are twice the bytes; 2 for all before: rows 8 164.9 us per 8B layer against 176.1,
//                  bench/results/linear.json, H100; mma_inputs says why), and the CTA adds
//                  the 8 warps' partial tiles in shared memory. Lane (g, t) = (lane / 4, lane % 4) loads
//                  16 bytes of W rows o0 + g and o0 + g + 8 and of x rows g (and g + 8) at the same 8
//                  inputs, 32s + 8t .. +7: mma's k-slots (2t, 2t+1 | 2t+8, 2t+9) then carry inputs
//                  8t + (0, 1 | 2, 3) in the first mma and 8t + (4, 5 | 6, 7) in the second; A and B
//                  use the same order and a dot product ignores it, so no shuffle is needed. Bytes: as
//                  linear_rows. Measured: bench/results/linear.json.
//   argmax_rows    logits fp32 [rows, n] (row stride ld) -> ids int32 [rows]: the first index of each row's
//                  largest value, NaN above everything (NumPy's argmax). Greedy sampling on the device: a
//                  captured decode step writes the next step's input token itself, so steps chain
//                  without the host. One CTA of 1024 threads per row; each thread scans a strided slice
//                  (ascending indices: its first best is its smallest), then warp shuffles and one warp
//                  over the warps' bests. Bytes: 4n read per row.
//   add_one        counters int32 [n] += 1: a pipelined decode advances the cache's device lengths in
//                  stream order, behind the step that used them.
// Measured: see bench/results/generate.json (these are launch-bound at batch 1; each runs in a few us).
// Every kernel opens with wait_for_previous_kernel() (launch.cuh): in a captured decode step they are
// programmatic dependent launches (kernels/launch.py).
// Tried and dropped: linear_rows with each lane loading 4 chunks of its row (and of the up row) before
// using any, the first batch before the folded norm: 8B shape at 4K lost 154.5 -> 123.6 tok/s (batch 1)
// and 503 -> 314 (batch 8) side by side (H100), and SmolLM2's step did not gain (graph 1124 vs 1126 us).

#include <cuda_fp16.h>
#include "launch.cuh"

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int n_warps = (blockDim.x + 31) / 32;
    v = lane < n_warps ? partial[lane] : 0.f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}

// out = fp16(w * (row * inv_rms)) for one row of H, by the whole CTA (the rms_norm kernel and the GEMVs
// that fold the norm in share it, so both round exactly alike).
__device__ void rms_norm_row(const float* __restrict__ row, const float* __restrict__ w, float eps, int H,
                             __half* __restrict__ out) {
    float squares = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) squares += row[i] * row[i];
    float inv_rms = 1.f / sqrtf(block_sum(squares) / H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) out[i] = __float2half(w[i] * (row[i] * inv_rms));
}

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    __half* __restrict__ out, int H, float eps) {
    wait_for_previous_kernel();
    rms_norm_row(x + (size_t)blockIdx.x * H, w, eps, H, out + (size_t)blockIdx.x * H);
}

// K and V rows of rope_split go to k/v [B, Hkv, T, D], or, when cache_k is given, straight into the
// cache's layer slices [B, Hkv, capacity, D] (batch stride in halves) at token write_start[b] + t: the
// decode step's K/V append then costs no launch of its own.
extern "C" __global__ void rope_split(const __half* __restrict__ qkv, const int* __restrict__ start,
                                      const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                      __half* __restrict__ q, __half* __restrict__ k, __half* __restrict__ v,
                                      int B, int T, int Hq, int Hkv, int D,
                                      __half* __restrict__ cache_k, __half* __restrict__ cache_v,
                                      const int* __restrict__ write_start, long long batch_stride, int capacity) {
    wait_for_previous_kernel();
    int half_d = D / 2, heads = Hq + 2 * Hkv;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * T * heads * half_d) return;
    int i = idx % half_d;
    int head = (idx / half_d) % heads;
    int row = idx / ((long long)half_d * heads);          // row = b * T + t
    int b = row / T, t = row % T;
    const __half* src = qkv + (size_t)row * heads * D + (size_t)head * D;
    float x1 = __half2float(src[i]), x2 = __half2float(src[i + half_d]);
    __half* dst;
    if (head < Hq) {
        dst = q + (((size_t)b * Hq + head) * T + t) * D;
    } else {
        const int kv_head = (head - Hq) % Hkv;
        const bool is_k = head < Hq + Hkv;
        if (cache_k)
            dst = (is_k ? cache_k : cache_v) + (size_t)b * batch_stride +
                  ((size_t)kv_head * capacity + write_start[b] + t) * D;
        else
            dst = (is_k ? k : v) + (((size_t)b * Hkv + kv_head) * T + t) * D;
        if (!is_k) {                                       // V is not rotated
            dst[i] = src[i];
            dst[i + half_d] = src[i + half_d];
            return;
        }
    }
    int pos = start[b] + t;
    float c = cos_table[(size_t)pos * half_d + i], s = sin_table[(size_t)pos * half_d + i];
    dst[i] = __float2half(x1 * c - x2 * s);
    dst[i + half_d] = __float2half(x2 * c + x1 * s);
}

extern "C" __global__ void silu_mul(const __half* __restrict__ gate_up, __half* __restrict__ act,
                                    int rows, int I) {
    wait_for_previous_kernel();
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * I) return;
    int row = idx / I, j = idx % I;
    float g = __half2float(gate_up[(size_t)row * 2 * I + j]);
    float u = __half2float(gate_up[(size_t)row * 2 * I + I + j]);
    act[idx] = __float2half(g / (1.f + expf(-g)) * u);
}

extern "C" __global__ void append_kv(const __half* __restrict__ k, const __half* __restrict__ v,
                                     __half* __restrict__ cache_k, __half* __restrict__ cache_v,
                                     const int* __restrict__ start, int B, int Hkv, int T, int D,
                                     long long batch_stride, int capacity) {
    wait_for_previous_kernel();
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * Hkv * T * D) return;
    int d = idx % D;
    int t = (idx / D) % T;
    int h = (idx / ((long long)D * T)) % Hkv;
    int b = idx / ((long long)D * T * Hkv);
    size_t dst = (size_t)b * batch_stride + ((size_t)h * capacity + start[b] + t) * D + d;
    cache_k[dst] = k[idx];
    cache_v[dst] = v[idx];
}

#define MAX_ROWS 8

__device__ __forceinline__ void fma8(float& acc, uint4 w, uint4 x) {
    const __half2* wh = (const __half2*)&w;
    const __half2* xh = (const __half2*)&x;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 wf = __half22float2(wh[i]), xf = __half22float2(xh[i]);
        acc += wf.x * xf.x + wf.y * xf.y;
    }
}

// acc[r] += W[o, :] . x[r, :] over this lane's 16-byte chunks (the warp's lanes together cover the row).
// x is in global or shared memory (generic loads).
__device__ __forceinline__ void dot_rows(const uint4* __restrict__ w_row, const uint4* __restrict__ x_rows,
                                        int rows, int chunks, int lane, float* acc) {
    int c = lane;
    for (; c + 32 < chunks; c += 64) {                       // two 16-byte weight loads in flight per lane
        uint4 w0 = __ldg(w_row + c), w1 = __ldg(w_row + c + 32);
        #pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r)
            if (r < rows) {
                fma8(acc[r], w0, x_rows[(size_t)r * chunks + c]);
                fma8(acc[r], w1, x_rows[(size_t)r * chunks + c + 32]);
            }
    }
    for (; c < chunks; c += 32) {
        uint4 w0 = __ldg(w_row + c);
        #pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r)
            if (r < rows) fma8(acc[r], w0, x_rows[(size_t)r * chunks + c]);
    }
    #pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r)
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffff, acc[r], off);
}

// RMSNorm folded in (norm_w != null; small hidden sizes): x is then the fp32 residual stream, and every
// CTA normalises the rows itself into shared memory, fp16(norm_w * (x * inv_rms)) exactly as rms_norm
// does, before the product: for a hidden size of ~1K that costs the CTA a few KB from L2, less than the
// launch it saves.
__device__ void rms_norm_rows_to_shared(const float* __restrict__ x, const float* __restrict__ norm_w, float eps,
                                        int rows, int in, __half* xs) {
    for (int r = 0; r < rows; ++r) {
        rms_norm_row(x + (size_t)r * in, norm_w, eps, in, xs + (size_t)r * in);
        __syncthreads();                                     // block_sum's scratch is reused by the next row
    }
}

// The three epilogues of both GEMV kernels, so that no activation makes an extra trip, for row r and
// output feature o of the dot products v = W[o] . x[r] and (swiglu) u = W[out + o] . x[r]:
//   plain:    y[r, o] = v (+ bias[o])                                            (fp16)
//   residual: residual[r, o] += v (+ bias[o])                                    (fp32, in place; y unused)
//   swiglu:   y[r, o] = silu(g) * up, g = v (+ bias[o]), up = u (+ bias[out + o])
//             (W holds gate then up, [2 out, in]: the kernel reads both rows, so SiLU * up costs no launch)
__device__ __forceinline__ void store_output(float v, float u, int r, int o, int out, int swiglu,
                                             const float* __restrict__ bias, __half* __restrict__ y,
                                             float* __restrict__ residual) {
    if (bias) v += bias[o];
    if (swiglu) {
        if (bias) u += bias[out + o];
        y[(size_t)r * out + o] = __float2half(v / (1.f + expf(-v)) * u);
    } else if (residual) {
        residual[(size_t)r * out + o] += v;
    } else {
        y[(size_t)r * out + o] = __float2half(v);
    }
}

// The weights are constants, not a previous kernel's output: a GEMV starts pulling its weight bytes into
// L2 before wait_for_previous_kernel(), overlapping the previous kernel's tail. Whole rows up to 4 KB
// (hidden sizes up to 2048; SmolLM2's 576 and 1536), else the first two chunks per lane. Measured side by
// side (H100, graph replays of the decode step, random weights): SmolLM2 at 7.8K tokens 939 -> 908 us
// (dense) and 1067 -> 1028 us (packkv) against the first two chunks only; prefetching the 8B shape's whole
// rows (8 KB and more) instead cost 6295 -> 7610 us per step (dense, 4K tokens).
#define PREFETCH_ROW_BYTES 4096
__device__ __forceinline__ void prefetch_weights(const __half* W, int row, int in, int chunk) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"((const uint4*)(W + (size_t)row * in) + chunk));
}

// One warp per output feature o < out.
extern "C" __global__ void linear_rows(const void* __restrict__ x_in, const float* __restrict__ norm_w, float eps,
                                       const __half* __restrict__ W, const float* __restrict__ bias,
                                       __half* __restrict__ y, float* __restrict__ residual, int swiglu, int rows,
                                       int in, int out) {
    {   // this lane's chunks of its feature's row (and up row), as dot_rows loads them: all of them for rows
        // of up to PREFETCH_ROW_BYTES, else the first two
        const int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
        const int chunks = 2 * in <= PREFETCH_ROW_BYTES ? in / 8 : min(in / 8, 64);
        for (int part = 0; part <= swiglu && o < out; ++part)
            for (int c = lane; c < chunks; c += 32) prefetch_weights(W, o + part * out, in, c);
    }
    wait_for_previous_kernel();
    extern __shared__ __half x_normed[];                     // [rows, in] when norm_w
    const __half* x = (const __half*)x_in;
    if (norm_w) {
        rms_norm_rows_to_shared((const float*)x_in, norm_w, eps, rows, in, x_normed);
        x = x_normed;
    }
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    const int o = blockIdx.x * warps + threadIdx.x / 32;
    if (o >= out) return;
    const int chunks = in / 8;                               // 8 halves = 16 bytes per chunk
    float acc[MAX_ROWS], up[MAX_ROWS];
    #pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) acc[r] = up[r] = 0.f;
    dot_rows((const uint4*)(W + (size_t)o * in), (const uint4*)x, rows, chunks, lane, acc);
    if (swiglu) dot_rows((const uint4*)(W + (size_t)(out + o) * in), (const uint4*)x, rows, chunks, lane, up);
    if (lane != 0) return;
    #pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) {
        if (r >= rows) break;
        store_output(acc[r], up[r], r, o, out, swiglu, bias, y, residual);
    }
}

#define MMA_ROWS 16          // x rows: two 8-column n-tiles
#define MMA_WARPS 8          // warps per CTA, splitting the inputs

__device__ __forceinline__ void mma_16x8x16(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                            unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// acc += W rows (g, g + 8) . x row n over one lane's 8 inputs, as two k16 mma (see the header).
__device__ __forceinline__ void mma_32_inputs(float acc[4], uint4 w_g, uint4 w_g8, uint4 x_n) {
    mma_16x8x16(acc, w_g.x, w_g8.x, w_g.y, w_g8.y, x_n.x, x_n.y);
    mma_16x8x16(acc, w_g.z, w_g8.z, w_g.w, w_g8.w, x_n.z, x_n.w);
}

// One 32-input step's loads for one lane: W rows o0 + g, o0 + g + 8 (gate) and out + ... (up), x rows g
// and g + 8; zeros past the ends, so the tails need no other branch.
struct MmaStep {
    uint4 w[2][2], x[2];     // w[gate | up][row g | g + 8], x[row g | g + 8]
};

template <bool SWIGLU>
__device__ __forceinline__ MmaStep load_step(const uint4* __restrict__ W, const uint4* __restrict__ x, int chunk,
                                             int chunks, int o0, int g, int rows, int out) {
    MmaStep s;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const bool in_range = chunk < chunks;
    #pragma unroll
    for (int part = 0; part < 2; ++part)
        #pragma unroll
        for (int half = 0; half < 2; ++half) {
            int o = o0 + g + 8 * half;
            bool ok = in_range && o < out && (part == 0 || SWIGLU);
            s.w[part][half] = ok ? __ldg(W + (size_t)(o + part * out) * chunks + chunk) : zero;
        }
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        int r = g + 8 * half;
        s.x[half] = in_range && r < rows ? x[(size_t)r * chunks + chunk] : zero;
    }
    return s;
}

template <bool SWIGLU>
__device__ __forceinline__ void mma_step(float acc[2][2][4], const MmaStep& s, int rows) {
    #pragma unroll
    for (int part = 0; part < 2; ++part) {
        if (part == 1 && !SWIGLU) break;
        mma_32_inputs(acc[part][0], s.w[part][0], s.w[part][1], s.x[0]);
        if (rows > 8) mma_32_inputs(acc[part][1], s.w[part][0], s.w[part][1], s.x[1]);
    }
}

// Phase 1 of linear_rows_mma: the warp's 32-input steps warp, warp + MMA_WARPS, ..., DEPTH steps' loads in flight
// before the first is multiplied. A step is 1 KB of weights per warp (2 KB with gate/up), and an SM holding one or
// two of these CTAs (the normalised rows take 64 KB of shared memory at in = 4096) needs ~40 KB in flight to cover
// the memory's latency at its share of the bandwidth: gate/up keeps 2 steps (4 KB per warp), the others 4 (2 for all before:
// the layer's four products at 8 rows 176.1 -> 164.9 us, bench/linear.py, H100; timed one by one on cold weights in
// a scratch probe, o, down and qkv had streamed at 69-77% of the device copy, gate/up at ~96%).
template <bool SWIGLU, int DEPTH>
__device__ __forceinline__ void mma_inputs(float acc[2][2][4], const uint4* __restrict__ Wc, const uint4* __restrict__ xc,
                                           int warp, int steps, int chunks, int o0, int g, int t, int rows, int out) {
    int s = warp;
    for (; s + (DEPTH - 1) * MMA_WARPS < steps; s += DEPTH * MMA_WARPS) {
        MmaStep step[DEPTH];
        #pragma unroll
        for (int i = 0; i < DEPTH; ++i)
            step[i] = load_step<SWIGLU>(Wc, xc, 4 * (s + i * MMA_WARPS) + t, chunks, o0, g, rows, out);
        #pragma unroll
        for (int i = 0; i < DEPTH; ++i) mma_step<SWIGLU>(acc, step[i], rows);
    }
    for (; s < steps; s += MMA_WARPS) mma_step<SWIGLU>(acc, load_step<SWIGLU>(Wc, xc, 4 * s + t, chunks, o0, g, rows, out), rows);
}

extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)
linear_rows_mma(const void* __restrict__ x_in, const float* __restrict__ norm_w, float eps,
                const __half* __restrict__ W, const float* __restrict__ bias, __half* __restrict__ y,
                float* __restrict__ residual, int swiglu, int rows, int in, int out) {
    {   // this lane's first step of weights (rows o0 + lane / 4, + 8), as the loop below loads them
        const int o = blockIdx.x * 16 + (threadIdx.x % 32) / 4, chunk = 4 * (threadIdx.x / 32) + threadIdx.x % 4;
        for (int part = 0; part <= swiglu && chunk < in / 8; ++part)
            for (int half = 0; half < 2; ++half)
                if (o + 8 * half < out) prefetch_weights(W, o + 8 * half + part * out, in, chunk);
    }
    wait_for_previous_kernel();
    extern __shared__ __half x_normed[];                     // [rows, in] when norm_w
    __shared__ float partial[2][MMA_WARPS][16][MMA_ROWS];    // [gate | up][warp][feature][row]
    const __half* x = (const __half*)x_in;
    if (norm_w) {
        rms_norm_rows_to_shared((const float*)x_in, norm_w, eps, rows, in, x_normed);
        x = x_normed;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int o0 = blockIdx.x * 16, chunks = in / 8, steps = (chunks + 3) / 4;
    const uint4* Wc = (const uint4*)W;
    const uint4* xc = (const uint4*)x;
    float acc[2][2][4] = {};                                 // [gate | up][n-tile][mma C fragment]
    // Phase 1: this warp's share of the inputs, several steps' loads issued before any is multiplied (mma_inputs).
    if (swiglu) mma_inputs<true, 2>(acc, Wc, xc, warp, steps, chunks, o0, g, t, rows, out);
    else mma_inputs<false, 4>(acc, Wc, xc, warp, steps, chunks, o0, g, t, rows, out);
    // Phase 2: the C fragments (feature g | g + 8, rows 2t, 2t + 1 of each n-tile) into shared memory.
    #pragma unroll
    for (int part = 0; part < 2; ++part)
        #pragma unroll
        for (int tile = 0; tile < 2; ++tile)
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                partial[part][warp][g + 8 * (i / 2)][8 * tile + 2 * t + i % 2] = acc[part][tile][i];
    __syncthreads();
    // Phase 3: thread (row r, feature f) adds the warps' partials; 16 consecutive features per row store.
    const int f = threadIdx.x % 16, r = threadIdx.x / 16, o = o0 + f;
    if (r >= rows || o >= out) return;
    float v = 0.f, u = 0.f;
    #pragma unroll
    for (int w = 0; w < MMA_WARPS; ++w) {
        v += partial[0][w][f][r];
        u += partial[1][w][f][r];
    }
    store_output(v, u, r, o, out, swiglu, bias, y, residual);
}

// (value, index) a beats (value, index) b: NaN first, then larger, then the smaller index; index -1 is
// "nothing seen" and loses to everything.
__device__ __forceinline__ bool argmax_beats(float a, int ia, float b, int ib) {
    if (ib < 0) return ia >= 0;
    if (ia < 0) return false;
    bool nan_a = a != a, nan_b = b != b;
    if (nan_a != nan_b) return nan_a;
    if (!nan_a && a != b) return a > b;
    return ia < ib;
}

extern "C" __global__ void argmax_rows(const float* __restrict__ x, long long ld, int n, int* __restrict__ ids) {
    wait_for_previous_kernel();
    __shared__ float best_value[32];
    __shared__ int best_index[32];
    const float* row = x + (size_t)blockIdx.x * ld;
    float best = 0.f;
    int index = -1;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (argmax_beats(row[i], i, best, index)) { best = row[i]; index = i; }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = (blockDim.x + 31) / 32;
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, best, o);
        int other_index = __shfl_xor_sync(0xffffffff, index, o);
        if (argmax_beats(other, other_index, best, index)) { best = other; index = other_index; }
    }
    if (lane == 0) { best_value[warp] = best; best_index[warp] = index; }
    __syncthreads();
    if (warp != 0) return;
    best = lane < n_warps ? best_value[lane] : 0.f;
    index = lane < n_warps ? best_index[lane] : -1;
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, best, o);
        int other_index = __shfl_xor_sync(0xffffffff, index, o);
        if (argmax_beats(other, other_index, best, index)) { best = other; index = other_index; }
    }
    if (lane == 0) ids[blockIdx.x] = index < 0 ? 0 : index;
}

extern "C" __global__ void add_one(int* __restrict__ counters, int n) {
    wait_for_previous_kernel();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) counters[i] += 1;
}
