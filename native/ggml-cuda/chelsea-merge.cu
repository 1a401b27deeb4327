// chelsea-gguf: CUDA kernels of GGML_OP_CHELSEA_MERGE (semantics: native/include/ggml-chelsea.h; reference: the CPU kernel in
// native/ggml-cpu/chelsea-ops.cpp).

#include "chelsea.cuh"
#include "chelsea-common.cuh"

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
