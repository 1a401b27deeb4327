// chelsea-gguf: CUDA kernels of the Chelsea KV-clustering ops (semantics: native/include/ggml-chelsea.h,
// reference: the CPU kernels in native/ggml-cpu/chelsea-ops.cpp, which these follow step by step so that
// test-backend-ops can compare the two: same tie-breaking, same NaN handling, the same f32 arithmetic where
// the order of operations can be kept).

#include "chelsea.cuh"

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
static __device__ int chelsea_block_exclusive_scan(const int v, int * smem, int * total) {
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

// --- GGML_OP_CHELSEA_MATCH ------------------------------------------------------------------------------

// one warp per (cell, head): the key slice in f32, scaled to unit length (cosine similarity becomes a dot
// product). As on the CPU: the squared norm is summed in double, a zero key gets scale 0 (similar to nothing)
// and non-finite keys stay non-finite, so they never win a comparison.
template <ggml_type type>
static __global__ void chelsea_match_normalize(
        const char * k, const int64_t nb1, const int c0, const int head_dim, const int n_head,
        const size_t type_size, float * xn) {
    const int64_t i = blockIdx.x;
    const int     h = blockIdx.y;

    const char * slice = k + (c0 + i)*nb1 + chelsea_row_offset((int64_t) h*head_dim, chelsea_type<type>::qk, type_size);
    float * out = xn + (i*n_head + h)*head_dim;

    double sum = 0.0;
    chelsea_for_each<type>(slice, head_dim, threadIdx.x, WARP_SIZE, [&](const int e, const float v) {
        out[e] = v;
        sum += (double) v*v;
    });
    sum = chelsea_warp_reduce_sum(sum);

    const float scale = sum > 0.0 ? (float) (1.0/sqrt(sum)) : 0.0f;

    // every thread rescales exactly the elements it wrote above
    chelsea_for_each<type>(slice, head_dim, threadIdx.x, WARP_SIZE, [&](const int e, const float v) {
        GGML_UNUSED(v);
        out[e] *= scale;
    });
}

// as chelsea_match_normalize, for cells along ne0 (llama.cpp's transposed V, float types only): element e of
// cell i is at x + i*nb0 + e*nb1
template <ggml_type type>
static __global__ void chelsea_match_normalize_t(
        const char * x, const int64_t nb0, const int64_t nb1, const int c0, const int head_dim, const int n_head,
        float * xn) {
    const int64_t i = blockIdx.x;
    const int     h = blockIdx.y;

    const char * cell = x + (c0 + i)*nb0;
    float * out = xn + (i*n_head + h)*head_dim;

    double sum = 0.0;
    for (int e = threadIdx.x; e < head_dim; e += WARP_SIZE) {
        const float v = chelsea_get<type>(cell + ((int64_t) h*head_dim + e)*nb1, 0);
        out[e] = v;
        sum += (double) v*v;
    }
    sum = chelsea_warp_reduce_sum(sum);

    const float scale = sum > 0.0 ? (float) (1.0/sqrt(sum)) : 0.0f;
    for (int e = threadIdx.x; e < head_dim; e += WARP_SIZE) {
        out[e] *= scale;
    }
}

static __device__ __forceinline__ float chelsea_dot_warp(const float * a, const float * b, const int n) {
    float s = 0.0f;
    for (int e = threadIdx.x; e < n; e += WARP_SIZE) {
        s += a[e]*b[e];
    }
    return warp_reduce_sum(s); // butterfly: every lane gets the same sum, so every lane takes the same branch
}

// one warp per (cell, head): an A cell (odd offset in its chunk) picks the B cell (even offset) of its chunk
// with the highest score: the cosine of the keys, or with unit values vn (ggml_chelsea_match_kv)
// 1 - (1 - cos k)(1 - cos v)/2. Strict '>' over increasing j keeps the lowest index on ties, like the CPU.
static __global__ void chelsea_match_best(
        const float * xn, const float * vn, const int n_region, const int chunk, const int head_dim,
        const int head_dim_v, const int n_head, float * dst) {
    const int i = blockIdx.x*blockDim.y + threadIdx.y;
    const int h = blockIdx.y;
    if (i >= n_region) {
        return;
    }

    float * out_score = dst;
    float * out_index = dst + (int64_t) n_region*n_head;
    const int64_t o = (int64_t) h*n_region + i;

    const int first = (i / chunk)*chunk;
    const int len   = min(chunk, n_region - first);

    const float * a  = xn + ((int64_t) i*n_head + h)*head_dim;
    const float * av = vn ? vn + ((int64_t) i*n_head + h)*head_dim_v : nullptr;

    // a unit (or zero) slice is NaN somewhere exactly when the cell's was not finite: its self-product tells
    const bool finite = !isnan(chelsea_dot_warp(a, a, head_dim)) && !(av && isnan(chelsea_dot_warp(av, av, head_dim_v)));
    if ((i - first) % 2 == 0 || !finite) {
        // a non-finite A cell stays a candidate (each head must remove n_remove cells), ranked last
        if (threadIdx.x == 0) {
            out_score[o] = finite ? GGML_CHELSEA_NO_SCORE : GGML_CHELSEA_NONFINITE;
            out_index[o] = (i - first) % 2 == 0 ? -1.0f : (float) (i - 1);
        }
        return;
    }

    float best   = GGML_CHELSEA_NO_SCORE;
    int   best_j = i - 1;
    for (int j = first; j < first + len; j += 2) {
        float s = chelsea_dot_warp(a, xn + ((int64_t) j*n_head + h)*head_dim, head_dim);
        if (av) {
            const float sv = chelsea_dot_warp(av, vn + ((int64_t) j*n_head + h)*head_dim_v, head_dim_v);
            s = 1.0f - 0.5f*(1.0f - s)*(1.0f - sv);
        }
        if (s > best) {
            best   = s;
            best_j = j;
        }
    }

    if (threadIdx.x == 0) {
        out_score[o] = best;
        out_index[o] = (float) best_j;
    }
}

// the unit-length head slices of the region's cells of x (cells along ne1, or along ne0 for cells_dim 0)
template <ggml_type type>
static void chelsea_match_normalize_cuda(const ggml_tensor * x, const int cells_dim, const int c0, const int n_region,
        const int head_dim, const int n_head, float * xn, cudaStream_t stream) {
    const dim3 grid(n_region, n_head, 1);
    if (cells_dim == 1) {
        chelsea_match_normalize<type><<<grid, WARP_SIZE, 0, stream>>>(
            (const char *) x->data, x->nb[1], c0, head_dim, n_head, ggml_type_size(x->type), xn);
    } else if constexpr (chelsea_type<type>::qk == 1) {
        chelsea_match_normalize_t<type><<<grid, WARP_SIZE, 0, stream>>>(
            (const char *) x->data, x->nb[0], x->nb[1], c0, head_dim, n_head, xn);
    } else {
        GGML_ABORT("%s: quantized %s with cells along ne0", __func__, ggml_type_name(x->type));
    }
}

static void chelsea_match_normalize_any(const ggml_tensor * x, const int cells_dim, const int c0, const int n_region,
        const int head_dim, const int n_head, float * xn, cudaStream_t stream) {
    switch (x->type) {
        case GGML_TYPE_F32:    chelsea_match_normalize_cuda<GGML_TYPE_F32>   (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_F16:    chelsea_match_normalize_cuda<GGML_TYPE_F16>   (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_BF16:   chelsea_match_normalize_cuda<GGML_TYPE_BF16>  (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_Q4_0:   chelsea_match_normalize_cuda<GGML_TYPE_Q4_0>  (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_Q4_1:   chelsea_match_normalize_cuda<GGML_TYPE_Q4_1>  (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_Q5_0:   chelsea_match_normalize_cuda<GGML_TYPE_Q5_0>  (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_Q5_1:   chelsea_match_normalize_cuda<GGML_TYPE_Q5_1>  (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_Q8_0:   chelsea_match_normalize_cuda<GGML_TYPE_Q8_0>  (x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        case GGML_TYPE_IQ4_NL: chelsea_match_normalize_cuda<GGML_TYPE_IQ4_NL>(x, cells_dim, c0, n_region, head_dim, n_head, xn, stream); break;
        default:
            GGML_ABORT("%s: unsupported type %s", __func__, ggml_type_name(x->type));
    }
}

void ggml_cuda_op_chelsea_match(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * v = dst->src[1]; // ggml_chelsea_match_kv: values count too

    const int32_t n_head   = ggml_get_op_params_i32(dst, 0);
    const int32_t c0       = ggml_get_op_params_i32(dst, 1);
    const int32_t n_region = ggml_get_op_params_i32(dst, 2);
    const int32_t chunk    = ggml_get_op_params_i32(dst, 3);
    const int32_t v_dim    = ggml_get_op_params_i32(dst, 4);

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));

    if (n_region == 0) {
        return;
    }

    cudaStream_t stream = ctx.stream();

    // the unit-length keys (and values) of the region, read chunk/2 times each by the A cells
    const int head_dim   = k->ne[0] / n_head;
    const int head_dim_v = v ? v->ne[1 - v_dim] / n_head : 0;
    ggml_cuda_pool_alloc<float> xn(ctx.pool(), (size_t) n_region*k->ne[0]);
    ggml_cuda_pool_alloc<float> vn(ctx.pool());
    chelsea_match_normalize_any(k, 1, c0, n_region, head_dim, n_head, xn.get(), stream);
    if (v) {
        vn.alloc((size_t) n_region*n_head*head_dim_v);
        chelsea_match_normalize_any(v, v_dim, c0, n_region, head_dim_v, n_head, vn.get(), stream);
    }

    constexpr int nwarps = 4;
    const dim3 grid_best((n_region + nwarps - 1) / nwarps, n_head, 1);
    const dim3 block_best(WARP_SIZE, nwarps, 1);
    chelsea_match_best<<<grid_best, block_best, 0, stream>>>(xn.get(), v ? vn.get() : nullptr, n_region, chunk,
        head_dim, head_dim_v, n_head, (float *) dst->data);
    CUDA_CHECK(cudaGetLastError());
}

// --- GGML_OP_CHELSEA_PLAN -------------------------------------------------------------------------------

// Candidates are ranked by a 64-bit key whose ascending order is the CPU's order: best score first, then the
// lower cell. Keys are unique (the cell is in the low bits), so the n_remove-th smallest key is a threshold
// that selects exactly n_remove cells, the same ones std::nth_element picks on the CPU.
static __device__ __forceinline__ uint64_t chelsea_plan_key(float score, const int i) {
    if (isnan(score)) {
        score = GGML_CHELSEA_NO_SCORE;
    }
    if (score == 0.0f) {
        score = 0.0f; // -0 and +0 compare equal on the CPU: one key for both
    }
    const uint32_t u = __float_as_uint(score);
    const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t) ~ascending << 32) | (uint32_t) i;
}

// atomicAdd on double through CAS: native double atomics need sm_60 and ggml-cuda builds for older targets;
// the summands are cluster sizes (small whole numbers in practice), so the order of the adds does not matter
static __device__ __forceinline__ void chelsea_atomic_add(double * addr, const double v) {
    unsigned long long int * p = (unsigned long long int *) addr;
    unsigned long long int old = *p;
    unsigned long long int assumed;
    do {
        assumed = old;
        old = atomicCAS(p, assumed, __double_as_longlong(__longlong_as_double(assumed) + v));
    } while (assumed != old);
}

// one block per head; the per-head work is a few passes over n_span cells
static __global__ void __launch_bounds__(1024, 1) chelsea_plan_f32(
        const char * m, const int64_t m_nb0, const int64_t m_nb1, const int64_t m_nb2,
        const char * s, const int64_t s_nb0, const int64_t s_nb1,
        float * dst, const int c0, const int n_remove, const int n_region, const int n_span,
        int * new_index_all, double * total_all) {
    const int h   = blockIdx.x;
    const int tid = threadIdx.x;
    const int nth = blockDim.x;

    const int n_head = gridDim.x;
    const int n_out  = n_span - n_remove;

    const char * m_score = m + h*m_nb1;
    const char * m_index = m + h*m_nb1 + m_nb2;

    int    * new_index = new_index_all + (int64_t) h*n_span;
    double * total     = total_all     + (int64_t) h*n_out;

    float * p_dst    = dst + (int64_t) h*n_span;
    float * p_weight = dst + (int64_t) n_span*n_head   + (int64_t) h*n_span;
    float * p_size   = dst + (int64_t) 2*n_span*n_head + (int64_t) h*n_span;

    __shared__ int      hist[256];
    __shared__ int      scan_smem[WARP_SIZE];
    __shared__ uint64_t sel_prefix;
    __shared__ int      sel_rank;

    // 1. the n_remove-th best candidate: radix select over the keys, 8 bits at a time from the top
    if (tid == 0) {
        sel_prefix = 0;
        sel_rank   = n_remove;
    }
    __syncthreads();
    uint64_t prefix_mask = 0;
    for (int shift = 56; n_remove > 0 && shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += nth) {
            hist[b] = 0;
        }
        __syncthreads();
        const uint64_t prefix = sel_prefix;
        for (int i = tid; i < n_region; i += nth) {
            if (*(const float *) (m_index + i*m_nb0) < 0.0f) {
                continue; // B cell: not a candidate
            }
            const uint64_t key = chelsea_plan_key(*(const float *) (m_score + i*m_nb0), i);
            if ((key & prefix_mask) == prefix) {
                atomicAdd(&hist[(key >> shift) & 0xff], 1);
            }
        }
        __syncthreads();
        if (tid == 0) {
            int rank = sel_rank;
            int b = 0;
            while (b < 255 && hist[b] < rank) {
                rank -= hist[b];
                ++b;
            }
            sel_rank    = rank;
            sel_prefix |= (uint64_t) b << shift;
        }
        prefix_mask |= (uint64_t) 0xff << shift;
        __syncthreads();
    }
    const uint64_t threshold = sel_prefix;

    // 2. survivors packed to the lowest indices, order kept: an exclusive scan over the cells
    int next = 0;
    for (int i0 = 0; i0 < n_span; i0 += nth) {
        const int i = i0 + tid;
        bool keep = i < n_span;
        if (keep && n_remove > 0 && i >= c0 && i < c0 + n_region) {
            const int r = i - c0;
            keep = !(*(const float *) (m_index + r*m_nb0) >= 0.0f &&
                     chelsea_plan_key(*(const float *) (m_score + r*m_nb0), r) <= threshold);
        }
        int n_kept;
        const int pos = chelsea_block_exclusive_scan(keep ? 1 : 0, scan_smem, &n_kept);
        if (i < n_span) {
            new_index[i] = keep ? next + pos : -1;
        }
        next += n_kept;
    }
    __syncthreads();

    // 3. destinations; every destination has exactly one survivor, which starts its total
    for (int i = tid; i < n_span; i += nth) {
        const float size = *(const float *) (s + i*s_nb0 + h*s_nb1);
        const int   ni   = new_index[i];
        if (ni >= 0) {
            p_dst[i] = (float) ni;
            total[ni] = size;
        } else {
            const int j = (int) *(const float *) (m_index + (i - c0)*m_nb0);
            p_dst[i] = (float) new_index[c0 + j];
        }
    }
    __syncthreads();
    for (int i = tid; i < n_span; i += nth) {
        if (new_index[i] < 0) {
            chelsea_atomic_add(&total[(int) p_dst[i]], *(const float *) (s + i*s_nb0 + h*s_nb1));
        }
    }
    __syncthreads();

    // 4. weights in the centroid and new sizes
    for (int i = tid; i < n_span; i += nth) {
        const float size = *(const float *) (s + i*s_nb0 + h*s_nb1);
        p_weight[i] = (float) (size / total[(int) p_dst[i]]);
        p_size[i]   = i < n_out ? (float) total[i] : 1.0f;
    }
}

void ggml_cuda_op_chelsea_plan(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * m = dst->src[0];
    const ggml_tensor * s = dst->src[1];

    const int32_t c0       = ggml_get_op_params_i32(dst, 0);
    const int32_t n_remove = ggml_get_op_params_i32(dst, 1);

    const int64_t n_region = m->ne[0];
    const int64_t n_head   = m->ne[1];
    const int64_t n_span   = s->ne[0];
    const int64_t n_out    = n_span - n_remove;

    GGML_ASSERT(m->type == GGML_TYPE_F32 && s->type == GGML_TYPE_F32);
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));
    GGML_ASSERT(n_span < INT32_MAX);

    if (n_span == 0 || n_head == 0) {
        return;
    }

    cudaStream_t stream = ctx.stream();

    ggml_cuda_pool_alloc<int>    new_index(ctx.pool(), (size_t) n_head*n_span);
    ggml_cuda_pool_alloc<double> total(ctx.pool(), (size_t) n_head*std::max<int64_t>(n_out, 1));

    chelsea_plan_f32<<<n_head, 1024, 0, stream>>>(
        (const char *) m->data, m->nb[0], m->nb[1], m->nb[2],
        (const char *) s->data, s->nb[0], s->nb[1],
        (float *) dst->data, c0, n_remove, (int) n_region, (int) n_span,
        new_index.get(), total.get());
    CUDA_CHECK(cudaGetLastError());
}

// --- GGML_OP_CHELSEA_MERGE ------------------------------------------------------------------------------

// The sources of every destination cell, per head, in increasing order (the CPU's order of accumulation):
// a counting sort (count, scan, scatter) whose scatter order is then fixed by sorting each short list.

static __global__ void chelsea_merge_count(
        const char * p, const int64_t p_nb0, const int64_t p_nb1, const int n_span, const int n_out, int * count) {
    const int i = blockIdx.x*blockDim.x + threadIdx.x;
    const int h = blockIdx.y;
    if (i >= n_span) {
        return;
    }
    const int d = (int) *(const float *) (p + i*p_nb0 + h*p_nb1);
    atomicAdd(&count[(int64_t) h*n_out + d], 1);
}

// one block per head: offs[h][d] = sum of count[h][0..d), offs[h][n_out] = n_span
static __global__ void __launch_bounds__(1024, 1) chelsea_merge_offsets(const int * count, const int n_out, int * offs) {
    const int h = blockIdx.x;
    __shared__ int scan_smem[WARP_SIZE];

    const int * c = count + (int64_t) h*n_out;
    int       * o = offs  + (int64_t) h*(n_out + 1);

    int next = 0;
    for (int d0 = 0; d0 < n_out; d0 += blockDim.x) {
        const int d = d0 + threadIdx.x;
        const int v = d < n_out ? c[d] : 0;
        int sum;
        const int pos = chelsea_block_exclusive_scan(v, scan_smem, &sum);
        if (d < n_out) {
            o[d] = next + pos;
        }
        next += sum;
    }
    if (threadIdx.x == 0) {
        o[n_out] = next;
    }
}

static __global__ void chelsea_merge_scatter(
        const char * p, const int64_t p_nb0, const int64_t p_nb1, const int n_span, const int n_out,
        const int * offs, int * fill, int * srcs) {
    const int i = blockIdx.x*blockDim.x + threadIdx.x;
    const int h = blockIdx.y;
    if (i >= n_span) {
        return;
    }
    const int d = (int) *(const float *) (p + i*p_nb0 + h*p_nb1);
    const int q = atomicAdd(&fill[(int64_t) h*n_out + d], 1);
    srcs[(int64_t) h*n_span + offs[(int64_t) h*(n_out + 1) + d] + q] = i;
}

// insertion sort of each list: lists are short (a survivor and the few cells merged into it)
static __global__ void chelsea_merge_sort(const int n_span, const int n_out, const int * offs, int * srcs) {
    const int d = blockIdx.x*blockDim.x + threadIdx.x;
    const int h = blockIdx.y;
    if (d >= n_out) {
        return;
    }
    const int * o  = offs + (int64_t) h*(n_out + 1);
    int       * ss = srcs + (int64_t) h*n_span;
    for (int a = o[d] + 1; a < o[d + 1]; ++a) {
        const int v = ss[a];
        int b = a - 1;
        while (b >= o[d] && ss[b] > v) {
            ss[b + 1] = ss[b];
            --b;
        }
        ss[b + 1] = v;
    }
}

// cells along ne1 (K, or V with flash attention): one block per (destination cell, head).
// A cell that nothing merged into moves unchanged (bit-exact, even quantized); otherwise the f32 weighted
// sum, accumulated with fmaf in source order like ggml_vec_mad_f32, and converted (quantized) once.
template <ggml_type type>
static __global__ void chelsea_merge_rows(
        const char * x, const int64_t x_nb1, const char * p, const int64_t p_nb0, const int64_t p_nb1,
        const int64_t p_nb2, const int n_span, const int n_out, const int head_dim, const size_t type_size,
        const int * offs, const int * srcs, char * dst, const int64_t dst_nb1) {
    constexpr int qk = chelsea_type<type>::qk;

    const int d = blockIdx.x;
    const int h = blockIdx.y;

    const int * o  = offs + (int64_t) h*(n_out + 1);
    const int * ss = srcs + (int64_t) h*n_span;

    const size_t slice_bytes = chelsea_row_offset(head_dim, qk, type_size);
    char * out = dst + d*dst_nb1 + h*slice_bytes;

    const int q0 = o[d];
    const int q1 = o[d + 1];

    if (q1 - q0 == 1) {
        const char * in = x + (int64_t) ss[q0]*x_nb1 + h*slice_bytes;
        for (size_t b = threadIdx.x; b < slice_bytes; b += blockDim.x) {
            out[b] = in[b];
        }
        return;
    }

    extern __shared__ float acc[]; // head_dim floats

    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        acc[e] = 0.0f;
    }
    // quantized types hand elements to threads in pairs, not in the order of the loop above
    __syncthreads();
    // each thread owns the same elements in every source (same e for every call of chelsea_for_each)
    for (int q = q0; q < q1; ++q) {
        const int   i = ss[q];
        const float w = *(const float *) (p + i*p_nb0 + h*p_nb1 + p_nb2);
        chelsea_for_each<type>(x + (int64_t) i*x_nb1 + h*slice_bytes, head_dim, threadIdx.x, blockDim.x,
            [&](const int e, const float v) {
                acc[e] = fmaf(v, w, acc[e]);
            });
    }

    if constexpr (qk == 1) {
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
            chelsea_set<type>(out, e, acc[e]);
        }
    } else {
        __syncthreads();
        for (int ib = threadIdx.x; ib < head_dim/qk; ib += blockDim.x) {
            chelsea_quantize_block<type>(acc + ib*qk, out + ib*type_size);
        }
    }
}

// cells along ne0 (llama.cpp's transposed V; float types only): one thread per (destination cell, channel)
template <ggml_type type>
static __global__ void chelsea_merge_cols(
        const char * x, const int64_t x_nb1, const char * p, const int64_t p_nb0, const int64_t p_nb1,
        const int64_t p_nb2, const int n_span, const int n_out, const int head_dim,
        const int * offs, const int * srcs, char * dst, const int64_t dst_nb1) {
    const int d = blockIdx.x*blockDim.x + threadIdx.x;
    const int c = blockIdx.y;
    if (d >= n_out) {
        return;
    }
    const int h = c / head_dim;

    const int * o  = offs + (int64_t) h*(n_out + 1);
    const int * ss = srcs + (int64_t) h*n_span;

    const char * row = x + (int64_t) c*x_nb1;

    float acc = 0.0f;
    for (int q = o[d]; q < o[d + 1]; ++q) {
        const int   i = ss[q];
        const float w = *(const float *) (p + i*p_nb0 + h*p_nb1 + p_nb2);
        acc = fmaf(w, chelsea_get<type>(row, i), acc);
    }
    chelsea_set<type>(dst + (int64_t) c*dst_nb1, d, acc);
}

template <ggml_type type>
static void chelsea_merge_cuda(const ggml_tensor * x, const ggml_tensor * p, ggml_tensor * dst, const int cells_dim,
        const int n_span, const int n_out, const int n_embd, const int head_dim, const int * offs, const int * srcs,
        cudaStream_t stream) {
    const int64_t n_head = p->ne[1];
    if (cells_dim == 1) {
        const dim3 grid(n_out, n_head, 1);
        const int  nth = std::min(128, std::max(WARP_SIZE, (head_dim + WARP_SIZE - 1) / WARP_SIZE * WARP_SIZE));
        chelsea_merge_rows<type><<<grid, nth, head_dim*sizeof(float), stream>>>(
            (const char *) x->data, x->nb[1], (const char *) p->data, p->nb[0], p->nb[1], p->nb[2],
            n_span, n_out, head_dim, ggml_type_size(type), offs, srcs, (char *) dst->data, dst->nb[1]);
    } else {
        if constexpr (chelsea_type<type>::qk == 1) {
            constexpr int nth = 256;
            const dim3 grid((n_out + nth - 1) / nth, n_embd, 1);
            chelsea_merge_cols<type><<<grid, nth, 0, stream>>>(
                (const char *) x->data, x->nb[1], (const char *) p->data, p->nb[0], p->nb[1], p->nb[2],
                n_span, n_out, head_dim, offs, srcs, (char *) dst->data, dst->nb[1]);
        } else {
            GGML_ABORT("%s: cells along ne0 need a float type", __func__);
        }
    }
}

void ggml_cuda_op_chelsea_merge(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * x = dst->src[0];
    const ggml_tensor * p = dst->src[1];

    const int32_t n_remove  = ggml_get_op_params_i32(dst, 0);
    const int32_t cells_dim = ggml_get_op_params_i32(dst, 1);

    const int64_t n_span   = x->ne[cells_dim];
    const int64_t n_embd   = x->ne[1 - cells_dim];
    const int64_t n_head   = p->ne[1];
    const int64_t head_dim = n_embd / n_head;
    const int64_t n_out    = n_span - n_remove;

    GGML_ASSERT(p->type == GGML_TYPE_F32);
    GGML_ASSERT(dst->type == x->type && ggml_is_contiguous(dst));
    GGML_ASSERT(n_span < INT32_MAX);
    GGML_ASSERT(cells_dim == 1 || n_embd < 65536); // channels are grid.y

    if (n_out == 0 || n_embd == 0) {
        return;
    }

    cudaStream_t stream = ctx.stream();

    ggml_cuda_pool_alloc<int> count(ctx.pool(), (size_t) n_head*n_out);
    ggml_cuda_pool_alloc<int> fill (ctx.pool(), (size_t) n_head*n_out);
    ggml_cuda_pool_alloc<int> offs (ctx.pool(), (size_t) n_head*(n_out + 1));
    ggml_cuda_pool_alloc<int> srcs (ctx.pool(), (size_t) n_head*n_span);

    CUDA_CHECK(cudaMemsetAsync(count.get(), 0, n_head*n_out*sizeof(int), stream));
    CUDA_CHECK(cudaMemsetAsync(fill.get(),  0, n_head*n_out*sizeof(int), stream));

    constexpr int nth = 256;
    const dim3 grid_span((n_span + nth - 1) / nth, n_head, 1);
    const dim3 grid_out ((n_out  + nth - 1) / nth, n_head, 1);
    chelsea_merge_count<<<grid_span, nth, 0, stream>>>(
        (const char *) p->data, p->nb[0], p->nb[1], n_span, n_out, count.get());
    chelsea_merge_offsets<<<n_head, 1024, 0, stream>>>(count.get(), n_out, offs.get());
    chelsea_merge_scatter<<<grid_span, nth, 0, stream>>>(
        (const char *) p->data, p->nb[0], p->nb[1], n_span, n_out, offs.get(), fill.get(), srcs.get());
    chelsea_merge_sort<<<grid_out, nth, 0, stream>>>(n_span, n_out, offs.get(), srcs.get());

    switch (x->type) {
        case GGML_TYPE_F32:    chelsea_merge_cuda<GGML_TYPE_F32>   (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_F16:    chelsea_merge_cuda<GGML_TYPE_F16>   (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_BF16:   chelsea_merge_cuda<GGML_TYPE_BF16>  (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_Q4_0:   chelsea_merge_cuda<GGML_TYPE_Q4_0>  (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_Q4_1:   chelsea_merge_cuda<GGML_TYPE_Q4_1>  (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_Q5_0:   chelsea_merge_cuda<GGML_TYPE_Q5_0>  (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_Q5_1:   chelsea_merge_cuda<GGML_TYPE_Q5_1>  (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_Q8_0:   chelsea_merge_cuda<GGML_TYPE_Q8_0>  (x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        case GGML_TYPE_IQ4_NL: chelsea_merge_cuda<GGML_TYPE_IQ4_NL>(x, p, dst, cells_dim, n_span, n_out, n_embd, head_dim, offs.get(), srcs.get(), stream); break;
        default:
            GGML_ABORT("%s: unsupported type %s", __func__, ggml_type_name(x->type));
    }
    CUDA_CHECK(cudaGetLastError());
}

// --- supports_op ----------------------------------------------------------------------------------------

// the KV cache types llama.cpp accepts (-ctk/-ctv); all of them have a CPU to_float and from_float, so this is
// the CPU backend's set restricted to types a KV cache can have
static bool chelsea_cuda_kv_type(const ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_IQ4_NL:
            return true;
        default:
            return false;
    }
}

bool ggml_cuda_chelsea_supports_op(const ggml_tensor * op) {
    const ggml_tensor * src0 = op->src[0];
    switch (op->op) {
        case GGML_OP_CHELSEA_MATCH: {
            // elements of a row are read as one run (rows themselves may be strided)
            const ggml_tensor * v = op->src[1];
            const bool v_ok = v == nullptr || (ggml_get_op_params_i32(op, 4) == 1
                ? chelsea_cuda_kv_type(v->type) && v->nb[0] == ggml_type_size(v->type)
                : v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_BF16);
            return chelsea_cuda_kv_type(src0->type) && src0->nb[0] == ggml_type_size(src0->type) && v_ok;
        }
        case GGML_OP_CHELSEA_PLAN:
            return src0->type == GGML_TYPE_F32 && op->src[1]->type == GGML_TYPE_F32;
        case GGML_OP_CHELSEA_MERGE:
            return chelsea_cuda_kv_type(src0->type) && src0->nb[0] == ggml_type_size(src0->type) &&
                   op->src[1]->type == GGML_TYPE_F32;
        default:
            return false;
    }
}
