// chelsea-gguf: what the CUDA kernels of the Chelsea ops share (chelsea-match.cu, chelsea-plan.cu,
// chelsea-merge.cu): element access per KV type, and block-wide reductions. They follow the CPU kernels in
// native/ggml-cpu/chelsea-ops.cpp step by step so that test-backend-ops can compare the two: same tie-breaking,
// same NaN handling, the same f32 arithmetic where the order of operations can be kept.
#pragma once

#include "common.cuh"
#include "convert.cuh"
#include "cpy-utils.cuh"
#include "dequantize.cuh"

#include "ggml-chelsea.h"

#include <algorithm>
#include <cstdint>

// --- element access per KV type ---------------------------------------------------------------------------

// float types are read and written one element at a time; quantized types are dequantized two elements at a
// time (the layout of ggml-cuda's dequantize_* functions) and quantized one block at a time
template <ggml_type type> struct chelsea_type;

template <> struct chelsea_type<GGML_TYPE_F32>  { static constexpr int qk = 1; static constexpr int qr = 1; typedef float       elem_t; };
template <> struct chelsea_type<GGML_TYPE_F16>  { static constexpr int qk = 1; static constexpr int qr = 1; typedef half        elem_t; };
template <> struct chelsea_type<GGML_TYPE_BF16> { static constexpr int qk = 1; static constexpr int qr = 1; typedef nv_bfloat16 elem_t; };
template <> struct chelsea_type<GGML_TYPE_Q4_0>   { static constexpr int qk = QK4_0;  static constexpr int qr = QR4_0;  typedef block_q4_0   block_t; };
template <> struct chelsea_type<GGML_TYPE_Q4_1>   { static constexpr int qk = QK4_1;  static constexpr int qr = QR4_1;  typedef block_q4_1   block_t; };
template <> struct chelsea_type<GGML_TYPE_Q5_0>   { static constexpr int qk = QK5_0;  static constexpr int qr = QR5_0;  typedef block_q5_0   block_t; };
template <> struct chelsea_type<GGML_TYPE_Q5_1>   { static constexpr int qk = QK5_1;  static constexpr int qr = QR5_1;  typedef block_q5_1   block_t; };
template <> struct chelsea_type<GGML_TYPE_Q8_0>   { static constexpr int qk = QK8_0;  static constexpr int qr = QR8_0;  typedef block_q8_0   block_t; };
template <> struct chelsea_type<GGML_TYPE_IQ4_NL> { static constexpr int qk = QK4_NL; static constexpr int qr = QR4_NL; typedef block_iq4_nl block_t; };

template <ggml_type type>
static __device__ __forceinline__ float chelsea_get(const char * slice, const int e) {
    const typename chelsea_type<type>::elem_t x = ((const typename chelsea_type<type>::elem_t *) slice)[e];
    return ggml_cuda_cast<float>(x);
}

template <ggml_type type>
static __device__ __forceinline__ void chelsea_set(char * slice, const int e, const float v) {
    // round to nearest even, as the CPU's from_float does for f16 and bf16
    ((typename chelsea_type<type>::elem_t *) slice)[e] = ggml_cuda_cast<typename chelsea_type<type>::elem_t>(v);
}

static __device__ __forceinline__ void chelsea_dequantize_iq4_nl(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_iq4_nl * x = (const block_iq4_nl *) vx;

    const float d = x[ib].d;

    v.x = d * kvalues_iq4nl[x[ib].qs[iqs] & 0xf];
    v.y = d * kvalues_iq4nl[x[ib].qs[iqs] >>  4];
}

template <ggml_type type>
static __device__ __forceinline__ void chelsea_dequantize(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    if constexpr (type == GGML_TYPE_Q4_0) {
        dequantize_q4_0(vx, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q4_1) {
        dequantize_q4_1(vx, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q5_0) {
        dequantize_q5_0(vx, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q5_1) {
        dequantize_q5_1(vx, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q8_0) {
        dequantize_q8_0(vx, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_IQ4_NL) {
        chelsea_dequantize_iq4_nl(vx, ib, iqs, v);
    } else {
        static_assert(type == GGML_TYPE_COUNT, "not a quantized KV type");
    }
}

template <ggml_type type>
static __device__ __forceinline__ void chelsea_quantize_block(const float * x, char * y) {
    typedef typename chelsea_type<type>::block_t block_t;
    if constexpr (type == GGML_TYPE_Q4_0) {
        quantize_f32_q4_0_block(x, (block_t *) y);
    } else if constexpr (type == GGML_TYPE_Q4_1) {
        quantize_f32_q4_1_block(x, (block_t *) y);
    } else if constexpr (type == GGML_TYPE_Q5_0) {
        quantize_f32_q5_0_block(x, (block_t *) y);
    } else if constexpr (type == GGML_TYPE_Q5_1) {
        quantize_f32_q5_1_block(x, (block_t *) y);
    } else if constexpr (type == GGML_TYPE_Q8_0) {
        quantize_f32_q8_0_block(x, (block_t *) y);
    } else if constexpr (type == GGML_TYPE_IQ4_NL) {
        quantize_f32_iq4_nl_block(x, (block_t *) y);
    } else {
        static_assert(type == GGML_TYPE_COUNT, "not a quantized KV type");
    }
}

// Calls f(e, value) for every element of a slice of n elements that starts at a block boundary; the threads
// tid, tid + nth, ... share the work. For quantized types, n is a multiple of the block size.
template <ggml_type type, typename F>
static __device__ __forceinline__ void chelsea_for_each(const char * slice, const int n, const int tid, const int nth, F f) {
    constexpr int qk = chelsea_type<type>::qk;
    constexpr int qr = chelsea_type<type>::qr;
    if constexpr (qk == 1) {
        for (int e = tid; e < n; e += nth) {
            f(e, chelsea_get<type>(slice, e));
        }
    } else {
        // pair p holds the elements ib*qk + iqs and ib*qk + iqs + (qr == 1 ? 1 : qk/2), as in getrows.cu
        for (int i = 2*tid; i < n; i += 2*nth) {
            const int ib   = i / qk;
            const int iqs  = (i % qk) / qr;
            const int e0   = ib*qk + iqs;
            const int yoff = qr == 1 ? 1 : qk/2;
            float2 v;
            chelsea_dequantize<type>(slice, ib, iqs, v);
            f(e0,        v.x);
            f(e0 + yoff, v.y);
        }
    }
}

static __device__ __forceinline__ size_t chelsea_row_offset(const int64_t e, const int blck_size, const size_t type_size) {
    return (size_t) (e / blck_size) * type_size;
}

static __device__ __forceinline__ double chelsea_warp_reduce_sum(double x) {
#pragma unroll
    for (int offset = WARP_SIZE/2; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, offset, WARP_SIZE);
    }
    return x;
}

// Exclusive prefix sum of one int per thread over the whole block (blockDim.x a multiple of WARP_SIZE,
// at most WARP_SIZE*WARP_SIZE); *total gets the sum. smem: WARP_SIZE ints.
static inline __device__ int chelsea_block_exclusive_scan(const int v, int * smem, int * total) {
    const int lane   = threadIdx.x % WARP_SIZE;
    const int warp   = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;

    int incl = v;
#pragma unroll
    for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
        const int t = __shfl_up_sync(0xffffffff, incl, offset, WARP_SIZE);
        if (lane >= offset) {
            incl += t;
        }
    }
    if (lane == WARP_SIZE - 1) {
        smem[warp] = incl;
    }
    __syncthreads();
    if (warp == 0) {
        int w = lane < nwarps ? smem[lane] : 0;
#pragma unroll
        for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
            const int t = __shfl_up_sync(0xffffffff, w, offset, WARP_SIZE);
            if (lane >= offset) {
                w += t;
            }
        }
        smem[lane] = w; // inclusive over warps
    }
    __syncthreads();
    const int before = warp > 0 ? smem[warp - 1] : 0;
    *total = smem[nwarps - 1];
    __syncthreads(); // smem may be reused right after
    return before + incl - v;
}
