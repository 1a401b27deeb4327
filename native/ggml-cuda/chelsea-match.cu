// chelsea-gguf: CUDA kernels of GGML_OP_CHELSEA_MATCH (semantics: native/include/ggml-chelsea.h; reference: the CPU kernel in
// native/ggml-cpu/chelsea-ops.cpp).

#include "chelsea.cuh"
#include "chelsea-common.cuh"

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
