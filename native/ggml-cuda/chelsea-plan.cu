// chelsea-gguf: CUDA kernels of GGML_OP_CHELSEA_PLAN (semantics: native/include/ggml-chelsea.h; reference: the CPU kernel in
// native/ggml-cpu/chelsea-ops.cpp).

#include "chelsea.cuh"
#include "chelsea-common.cuh"

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
