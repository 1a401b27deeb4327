// chelsea-gguf: Metal kernels of the Chelsea KV-clustering ops (semantics: native/include/ggml-chelsea.h,
// reference: native/ggml-cpu/chelsea-ops.cpp; the CUDA version, native/ggml-cuda/chelsea.cu, has the same
// structure). CMakeLists.txt copies this file to ggml-metal/kernels/chelsea.metal, where it is one more library
// kind (ggml_patches/0009-metal-chelsea-ops.patch); encoding: native/ggml-metal/chelsea-metal.cpp.
//
// Differences from the CPU that Metal imposes: there is no double, so the squared key norm and the cluster-size
// totals are summed in f32 (exact for whole-number sizes up to 2^24, which is what cluster sizes are).

#include "common.h"
#include "dequantize.h"
#include "quantize.h"

#define CHELSEA_NO_SCORE (-2.0f) // GGML_CHELSEA_NO_SCORE
#define CHELSEA_NONFINITE (-3.0f) // GGML_CHELSEA_NONFINITE

// Keys and values are read in pieces of 16 elements (a float4x4), the way get_rows and mul_mm read them:
// a row slice of type block_q holds head_dim/(16*nl) blocks, piece c is dequantize(x + c/nl, c%nl).

// Exclusive prefix sum of one int per thread over the threadgroup; *total gets the sum. sums: 32 ints.
static inline int chelsea_tg_exclusive_scan(int v, threadgroup int * sums, ushort sgitg, ushort tiisg, ushort nsg, thread int & total) {
    const int incl = simd_prefix_inclusive_sum(v);
    if (tiisg == N_SIMDWIDTH - 1) {
        sums[sgitg] = incl;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sgitg == 0) {
        const int w = tiisg < nsg ? sums[tiisg] : 0;
        sums[tiisg] = simd_prefix_inclusive_sum(w);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int before = sgitg > 0 ? sums[sgitg - 1] : 0;
    total = sums[nsg - 1];
    threadgroup_barrier(mem_flags::mem_threadgroup); // sums is reused by the next call
    return before + incl - v;
}

// float atomics are not on every Metal device: compare-and-swap on the bits
static inline void chelsea_atomic_add_f32(device atomic_uint * p, float v) {
    uint old = atomic_load_explicit(p, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(p, &old, as_type<uint>(as_type<float>(old) + v),
                memory_order_relaxed, memory_order_relaxed)) {
    }
}

//
// GGML_OP_CHELSEA_MATCH
//

// one simdgroup per (cell, head): the key slice in f32, scaled to unit length (cosine similarity becomes a dot
// product); a zero key gets scale 0 (similar to nothing), as on the CPU
template <typename block_q, short nl, void (*dequantize_func)(device const block_q *, short, thread float4x4 &)>
kernel void kernel_chelsea_match_norm(
        constant ggml_metal_kargs_chelsea & args,
        device const char  * src0,
        device       float * xn,
        uint3   tgpig[[threadgroup_position_in_grid]],
        ushort  tiisg[[thread_index_in_simdgroup]]) {
    const int i = tgpig.x;
    const int h = tgpig.y;

    const int n16 = args.head_dim/16;

    device const block_q * x = (device const block_q *) (src0 + (int64_t) (args.c0 + i)*args.nb01) + (int64_t) h*(n16/nl);
    device       float   * o = xn + ((int64_t) i*args.n_head + h)*args.head_dim;

    float sum = 0.0f;
    for (int c = tiisg; c < n16; c += N_SIMDWIDTH) {
        float4x4 t;
        dequantize_func(x + c/nl, c%nl, t);
        for (short r = 0; r < 4; ++r) {
            sum += dot(t[r], t[r]);
            *((device float4 *) (o + 16*c + 4*r)) = t[r];
        }
    }
    sum = simd_sum(sum);

    const float scale = sum > 0.0f ? 1.0f/sqrt(sum) : 0.0f;

    for (int c = tiisg; c < n16; c += N_SIMDWIDTH) {
        for (short r = 0; r < 4; ++r) {
            device float4 * p = (device float4 *) (o + 16*c + 4*r);
            *p = *p*scale;
        }
    }
}

typedef decltype(kernel_chelsea_match_norm<float4x4, 1, dequantize_f32>) kernel_chelsea_match_norm_t;

template [[host_name("kernel_chelsea_match_norm_f32")]]    kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<float4x4,     1, dequantize_f32>;
template [[host_name("kernel_chelsea_match_norm_f16")]]    kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<half4x4,      1, dequantize_f16>;
#if defined(GGML_METAL_HAS_BF16)
template [[host_name("kernel_chelsea_match_norm_bf16")]]   kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<bfloat4x4,    1, dequantize_bf16>;
#endif
template [[host_name("kernel_chelsea_match_norm_q4_0")]]   kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<block_q4_0,   2, dequantize_q4_0>;
template [[host_name("kernel_chelsea_match_norm_q4_1")]]   kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<block_q4_1,   2, dequantize_q4_1>;
template [[host_name("kernel_chelsea_match_norm_q5_0")]]   kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<block_q5_0,   2, dequantize_q5_0>;
template [[host_name("kernel_chelsea_match_norm_q5_1")]]   kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<block_q5_1,   2, dequantize_q5_1>;
template [[host_name("kernel_chelsea_match_norm_q8_0")]]   kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<block_q8_0,   2, dequantize_q8_0>;
template [[host_name("kernel_chelsea_match_norm_iq4_nl")]] kernel kernel_chelsea_match_norm_t kernel_chelsea_match_norm<block_iq4_nl, 2, dequantize_iq4_nl>;

// as kernel_chelsea_match_norm, for cells along ne0 (llama.cpp's transposed V, float types): element e of cell
// i at src0 + i*nb00 + e*nb01
template <typename T>
kernel void kernel_chelsea_match_norm_t(
        constant ggml_metal_kargs_chelsea & args,
        device const char  * src0,
        device       float * xn,
        uint3   tgpig[[threadgroup_position_in_grid]],
        ushort  tiisg[[thread_index_in_simdgroup]]) {
    const int i = tgpig.x;
    const int h = tgpig.y;

    device const char * cell = src0 + (int64_t) (args.c0 + i)*args.nb00;
    device       float * o   = xn + ((int64_t) i*args.n_head + h)*args.head_dim;

    float sum = 0.0f;
    for (int e = tiisg; e < args.head_dim; e += N_SIMDWIDTH) {
        const float v = (float) *((device const T *) (cell + (int64_t) (h*args.head_dim + e)*args.nb01));
        o[e] = v;
        sum += v*v;
    }
    sum = simd_sum(sum);

    const float scale = sum > 0.0f ? 1.0f/sqrt(sum) : 0.0f;

    for (int e = tiisg; e < args.head_dim; e += N_SIMDWIDTH) {
        o[e] *= scale;
    }
}

typedef decltype(kernel_chelsea_match_norm_t<float>) kernel_chelsea_match_norm_t_t;

template [[host_name("kernel_chelsea_match_norm_t_f32")]]  kernel kernel_chelsea_match_norm_t_t kernel_chelsea_match_norm_t<float>;
template [[host_name("kernel_chelsea_match_norm_t_f16")]]  kernel kernel_chelsea_match_norm_t_t kernel_chelsea_match_norm_t<half>;
#if defined(GGML_METAL_HAS_BF16)
template [[host_name("kernel_chelsea_match_norm_t_bf16")]] kernel kernel_chelsea_match_norm_t_t kernel_chelsea_match_norm_t<bfloat>;
#endif

static inline float chelsea_dot_simd(device const float * a, device const float * b, int n, ushort tiisg) {
    float s = 0.0f;
    for (int e = tiisg; e < n; e += N_SIMDWIDTH) {
        s += a[e]*b[e];
    }
    return simd_sum(s); // the same value in every lane: every lane takes the same branch
}

// one simdgroup per (cell, head): an A cell (odd offset in its chunk) picks the B cell (even offset) of its chunk
// with the highest score: the cosine of the keys, or with unit values vn (args.head_dim_v > 0)
// 1 - (1 - cos k)(1 - cos v)/2. Strict '>' over increasing j keeps the lowest index on ties, like the CPU
kernel void kernel_chelsea_match_best(
        constant ggml_metal_kargs_chelsea & args,
        device const float * xn,
        device const float * vn,
        device       float * dst,
        uint3   tgpig[[threadgroup_position_in_grid]],
        ushort  sgitg[[simdgroup_index_in_threadgroup]],
        ushort  tiisg[[thread_index_in_simdgroup]],
        ushort3   ntg[[threads_per_threadgroup]]) {
    const int i = tgpig.x*ntg.y + sgitg;
    const int h = tgpig.y;
    if (i >= args.n_region) {
        return;
    }

    device float * out_score = dst;
    device float * out_index = dst + (int64_t) args.n_region*args.n_head;
    const int64_t o = (int64_t) h*args.n_region + i;

    const int first = (i/args.chunk)*args.chunk;
    const int len   = min(args.chunk, args.n_region - first);

    const int dv = args.head_dim_v;
    device const float * a  = xn + ((int64_t) i*args.n_head + h)*args.head_dim;
    device const float * av = vn + ((int64_t) i*args.n_head + h)*dv;

    // a unit (or zero) slice is NaN somewhere exactly when the cell's was not finite: its self-product tells
    const bool finite = !isnan(chelsea_dot_simd(a, a, args.head_dim, tiisg)) &&
                        !(dv > 0 && isnan(chelsea_dot_simd(av, av, dv, tiisg)));
    if ((i - first) % 2 == 0 || !finite) {
        // a non-finite A cell stays a candidate (each head must remove n_remove cells), ranked last
        if (tiisg == 0) {
            out_score[o] = finite ? CHELSEA_NO_SCORE : CHELSEA_NONFINITE;
            out_index[o] = (i - first) % 2 == 0 ? -1.0f : (float) (i - 1);
        }
        return;
    }

    float best   = CHELSEA_NO_SCORE;
    int   best_j = i - 1;
    for (int j = first; j < first + len; j += 2) {
        float s = chelsea_dot_simd(a, xn + ((int64_t) j*args.n_head + h)*args.head_dim, args.head_dim, tiisg);
        if (dv > 0) {
            const float sv = chelsea_dot_simd(av, vn + ((int64_t) j*args.n_head + h)*dv, dv, tiisg);
            s = 1.0f - 0.5f*(1.0f - s)*(1.0f - sv);
        }
        if (s > best) {
            best   = s;
            best_j = j;
        }
    }

    if (tiisg == 0) {
        out_score[o] = best;
        out_index[o] = (float) best_j;
    }
}

//
// GGML_OP_CHELSEA_PLAN
//

// ascending key order == the CPU's order: best score first, then the lower cell; unique per cell
static inline ulong chelsea_plan_key(float score, int i) {
    if (isnan(score)) {
        score = CHELSEA_NO_SCORE;
    }
    if (score == 0.0f) {
        score = 0.0f; // -0 and +0 compare equal on the CPU
    }
    const uint u = as_type<uint>(score);
    const uint ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((ulong) (~ascending) << 32) | (uint) i;
}

// one threadgroup per head. tmp: new_index [n_head][n_span] int, then total [n_head][n_out] f32.
// shmem: 256 ints (histogram) + 32 ints (scan) + 4 ints (selection state)
kernel void kernel_chelsea_plan(
        constant ggml_metal_kargs_chelsea & args,
        device const char  * m,
        device const char  * s,
        device       float * dst,
        device       char  * tmp,
        threadgroup  int   * shmem [[threadgroup(0)]],
        uint    tgpig[[threadgroup_position_in_grid]],
        ushort  tpitg[[thread_position_in_threadgroup]],
        ushort  sgitg[[simdgroup_index_in_threadgroup]],
        ushort  tiisg[[thread_index_in_simdgroup]],
        ushort    ntg[[threads_per_threadgroup]]) {
    const int h   = tgpig;
    const int nth = ntg;
    const int nsg = (nth + N_SIMDWIDTH - 1)/N_SIMDWIDTH;

    const int n_region = args.n_region;
    const int n_span   = args.n_span;
    const int n_out    = args.n_out;
    const int c0       = args.c0;
    const int n_remove = args.n_remove;

    device const char * m_score = m + h*args.nb01;
    device const char * m_index = m + h*args.nb01 + args.nb02;

    device int        * new_index = (device int *) tmp + (int64_t) h*n_span;
    device atomic_uint * total    = (device atomic_uint *) ((device int *) tmp + (int64_t) args.n_head*n_span) + (int64_t) h*n_out;

    device float * p_dst    = dst + (int64_t) h*n_span;
    device float * p_weight = dst + (int64_t) n_span*args.n_head   + (int64_t) h*n_span;
    device float * p_size   = dst + (int64_t) 2*n_span*args.n_head + (int64_t) h*n_span;

    threadgroup atomic_int * hist = (threadgroup atomic_int *) shmem;
    threadgroup int        * sums = shmem + 256;
    threadgroup uint       * sel  = (threadgroup uint *) (shmem + 256 + 32); // prefix lo, prefix hi, rank

    // 1. the n_remove-th best candidate: radix select over the 64-bit keys, 8 bits at a time from the top
    if (tpitg == 0) {
        sel[0] = 0;
        sel[1] = 0;
        sel[2] = n_remove;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    ulong prefix_mask = 0;
    for (int shift = 56; n_remove > 0 && shift >= 0; shift -= 8) {
        for (int b = tpitg; b < 256; b += nth) {
            atomic_store_explicit(&hist[b], 0, memory_order_relaxed);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const ulong prefix = ((ulong) sel[1] << 32) | sel[0];
        for (int i = tpitg; i < n_region; i += nth) {
            if (*(device const float *) (m_index + i*args.nb00) < 0.0f) {
                continue; // B cell: not a candidate
            }
            const ulong key = chelsea_plan_key(*(device const float *) (m_score + i*args.nb00), i);
            if ((key & prefix_mask) == prefix) {
                atomic_fetch_add_explicit(&hist[(key >> shift) & 0xff], 1, memory_order_relaxed);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (tpitg == 0) {
            int rank = sel[2];
            int b = 0;
            while (b < 255 && atomic_load_explicit(&hist[b], memory_order_relaxed) < rank) {
                rank -= atomic_load_explicit(&hist[b], memory_order_relaxed);
                ++b;
            }
            const ulong p = prefix | ((ulong) b << shift);
            sel[0] = (uint) p;
            sel[1] = (uint) (p >> 32);
            sel[2] = rank;
        }
        prefix_mask |= (ulong) 0xff << shift;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    const ulong threshold = ((ulong) sel[1] << 32) | sel[0];

    // 2. survivors packed to the lowest indices, order kept
    int next = 0;
    for (int i0 = 0; i0 < n_span; i0 += nth) {
        const int i = i0 + tpitg;
        bool keep = i < n_span;
        if (keep && n_remove > 0 && i >= c0 && i < c0 + n_region) {
            const int r = i - c0;
            keep = !(*(device const float *) (m_index + r*args.nb00) >= 0.0f &&
                     chelsea_plan_key(*(device const float *) (m_score + r*args.nb00), r) <= threshold);
        }
        int n_kept;
        const int pos = chelsea_tg_exclusive_scan(keep ? 1 : 0, sums, sgitg, tiisg, nsg, n_kept);
        if (i < n_span) {
            new_index[i] = keep ? next + pos : -1;
        }
        next += n_kept;
    }
    threadgroup_barrier(mem_flags::mem_device);

    // 3. destinations; each destination has one survivor, which starts its total
    for (int i = tpitg; i < n_span; i += nth) {
        const float size = *(device const float *) (s + i*args.nb10 + h*args.nb11);
        const int   ni   = new_index[i];
        if (ni >= 0) {
            p_dst[i] = (float) ni;
            atomic_store_explicit(&total[ni], as_type<uint>(size), memory_order_relaxed);
        } else {
            const int j = (int) *(device const float *) (m_index + (i - c0)*args.nb00);
            p_dst[i] = (float) new_index[c0 + j];
        }
    }
    threadgroup_barrier(mem_flags::mem_device);
    for (int i = tpitg; i < n_span; i += nth) {
        if (new_index[i] < 0) {
            chelsea_atomic_add_f32(&total[(int) p_dst[i]], *(device const float *) (s + i*args.nb10 + h*args.nb11));
        }
    }
    threadgroup_barrier(mem_flags::mem_device);

    // 4. weights in the centroid and new sizes
    for (int i = tpitg; i < n_span; i += nth) {
        const float size = *(device const float *) (s + i*args.nb10 + h*args.nb11);
        p_weight[i] = size / as_type<float>(atomic_load_explicit(&total[(int) p_dst[i]], memory_order_relaxed));
        p_size[i]   = i < n_out ? as_type<float>(atomic_load_explicit(&total[i], memory_order_relaxed)) : 1.0f;
    }
}

//
// GGML_OP_CHELSEA_MERGE
//

// one threadgroup per head: the sources of every destination cell in increasing order (the CPU's order of
// accumulation), by counting sort: count, scan, scatter, then an insertion sort of each (short) list.
// tmp: count [n_head][n_out], fill [n_head][n_out], offs [n_head][n_out + 1], srcs [n_head][n_span], all int
kernel void kernel_chelsea_merge_index(
        constant ggml_metal_kargs_chelsea & args,
        device const char * p,
        device       char * tmp,
        threadgroup  int  * shmem [[threadgroup(0)]],
        uint    tgpig[[threadgroup_position_in_grid]],
        ushort  tpitg[[thread_position_in_threadgroup]],
        ushort  sgitg[[simdgroup_index_in_threadgroup]],
        ushort  tiisg[[thread_index_in_simdgroup]],
        ushort    ntg[[threads_per_threadgroup]]) {
    const int h   = tgpig;
    const int nth = ntg;
    const int nsg = (nth + N_SIMDWIDTH - 1)/N_SIMDWIDTH;

    const int n_span = args.n_span;
    const int n_out  = args.n_out;
    const int n_head = args.n_head;

    device atomic_int * count = (device atomic_int *) tmp + (int64_t) h*n_out;
    device atomic_int * fill  = (device atomic_int *) tmp + (int64_t) n_head*n_out + (int64_t) h*n_out;
    device int        * offs  = (device int *) tmp + (int64_t) 2*n_head*n_out + (int64_t) h*(n_out + 1);
    device int        * srcs  = (device int *) tmp + (int64_t) 2*n_head*n_out + (int64_t) n_head*(n_out + 1) + (int64_t) h*n_span;

    device const char * pd = p + h*args.nb11;

    for (int d = tpitg; d < n_out; d += nth) {
        atomic_store_explicit(&count[d], 0, memory_order_relaxed);
        atomic_store_explicit(&fill[d],  0, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_device);

    for (int i = tpitg; i < n_span; i += nth) {
        atomic_fetch_add_explicit(&count[(int) *(device const float *) (pd + i*args.nb10)], 1, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_device);

    int next = 0;
    for (int d0 = 0; d0 < n_out; d0 += nth) {
        const int d = d0 + tpitg;
        const int v = d < n_out ? atomic_load_explicit(&count[d], memory_order_relaxed) : 0;
        int sum;
        const int pos = chelsea_tg_exclusive_scan(v, shmem, sgitg, tiisg, nsg, sum);
        if (d < n_out) {
            offs[d] = next + pos;
        }
        next += sum;
    }
    if (tpitg == 0) {
        offs[n_out] = next;
    }
    threadgroup_barrier(mem_flags::mem_device);

    for (int i = tpitg; i < n_span; i += nth) {
        const int d = (int) *(device const float *) (pd + i*args.nb10);
        const int q = atomic_fetch_add_explicit(&fill[d], 1, memory_order_relaxed);
        srcs[offs[d] + q] = i;
    }
    threadgroup_barrier(mem_flags::mem_device);

    for (int d = tpitg; d < n_out; d += nth) {
        for (int a = offs[d] + 1; a < offs[d + 1]; ++a) {
            const int v = srcs[a];
            int b = a - 1;
            while (b >= offs[d] && srcs[b] > v) {
                srcs[b + 1] = srcs[b];
                --b;
            }
            srcs[b + 1] = v;
        }
    }
}

// the source list of destination d of head h in the index built above: srcs[q0 .. q1)
static inline device const int * chelsea_merge_sources(constant ggml_metal_kargs_chelsea & args, device const char * tmp,
        int h, int d, thread int & q0, thread int & q1) {
    device const int * offs = (device const int *) tmp + (int64_t) 2*args.n_head*args.n_out + (int64_t) h*(args.n_out + 1);
    q0 = offs[d];
    q1 = offs[d + 1];
    return (device const int *) tmp + (int64_t) 2*args.n_head*args.n_out + (int64_t) args.n_head*(args.n_out + 1) + (int64_t) h*args.n_span;
}

// cells along ne1: one threadgroup per (destination cell, head). A cell that nothing merged into moves unchanged
// (bit-exact); otherwise the f32 weighted sum in source order, written as T (float types) ...
template <typename T, typename block_q, short nl, void (*dequantize_func)(device const block_q *, short, thread float4x4 &)>
kernel void kernel_chelsea_merge_rows_f(
        constant ggml_metal_kargs_chelsea & args,
        device const char * x,
        device const char * p,
        device       char * dst,
        device const char * tmp,
        uint3   tgpig[[threadgroup_position_in_grid]],
        ushort  tpitg[[thread_position_in_threadgroup]],
        ushort    ntg[[threads_per_threadgroup]]) {
    const int d = tgpig.x;
    const int h = tgpig.y;

    int q0, q1;
    device const int * srcs = chelsea_merge_sources(args, tmp, h, d, q0, q1);

    const int    n16         = args.head_dim/16;
    const size_t slice_bytes = (size_t) (n16/nl)*sizeof(block_q);

    device char * out = dst + (int64_t) d*args.nb1 + h*slice_bytes;

    if (q1 - q0 == 1) {
        device const char * in = x + (int64_t) srcs[q0]*args.nb01 + h*slice_bytes;
        for (size_t b = tpitg; b < slice_bytes; b += ntg) {
            out[b] = in[b];
        }
        return;
    }

    for (int c = tpitg; c < n16; c += ntg) {
        float4x4 acc = float4x4(0.0f);
        for (int q = q0; q < q1; ++q) {
            const int   i = srcs[q];
            const float w = *(device const float *) (p + i*args.nb10 + h*args.nb11 + args.nb12);
            float4x4 t;
            dequantize_func((device const block_q *) (x + (int64_t) i*args.nb01 + h*slice_bytes) + c/nl, c%nl, t);
            for (short r = 0; r < 4; ++r) {
                acc[r] = fma(t[r], float4(w), acc[r]);
            }
        }
        device T * o = (device T *) out + 16*c;
        for (short e = 0; e < 16; ++e) {
            o[e] = (T) acc[e/4][e%4];
        }
    }
}

// ... or quantized again from the f32 sum (tmp holds one f32 row per (destination cell, head) after the index)
template <typename block_q, short nl, void (*dequantize_func)(device const block_q *, short, thread float4x4 &),
          void (*quantize_func)(device const float *, device block_q &)>
kernel void kernel_chelsea_merge_rows_q(
        constant ggml_metal_kargs_chelsea & args,
        device const char * x,
        device const char * p,
        device       char * dst,
        device       char * tmp,
        uint3   tgpig[[threadgroup_position_in_grid]],
        ushort  tpitg[[thread_position_in_threadgroup]],
        ushort    ntg[[threads_per_threadgroup]]) {
    const int d = tgpig.x;
    const int h = tgpig.y;

    int q0, q1;
    device const int * srcs = chelsea_merge_sources(args, tmp, h, d, q0, q1);

    const int    n16         = args.head_dim/16;
    const int    n_blocks    = n16/nl;
    const size_t slice_bytes = (size_t) n_blocks*sizeof(block_q);

    device char * out = dst + (int64_t) d*args.nb1 + h*slice_bytes;

    if (q1 - q0 == 1) {
        device const char * in = x + (int64_t) srcs[q0]*args.nb01 + h*slice_bytes;
        for (size_t b = tpitg; b < slice_bytes; b += ntg) {
            out[b] = in[b];
        }
        return;
    }

    device float * acc_row = (device float *) (tmp + args.tmp_acc_offs) + ((int64_t) d*args.n_head + h)*args.head_dim;

    for (int c = tpitg; c < n16; c += ntg) {
        float4x4 acc = float4x4(0.0f);
        for (int q = q0; q < q1; ++q) {
            const int   i = srcs[q];
            const float w = *(device const float *) (p + i*args.nb10 + h*args.nb11 + args.nb12);
            float4x4 t;
            dequantize_func((device const block_q *) (x + (int64_t) i*args.nb01 + h*slice_bytes) + c/nl, c%nl, t);
            for (short r = 0; r < 4; ++r) {
                acc[r] = fma(t[r], float4(w), acc[r]);
            }
        }
        for (short r = 0; r < 4; ++r) {
            *((device float4 *) (acc_row + 16*c + 4*r)) = acc[r];
        }
    }
    threadgroup_barrier(mem_flags::mem_device);

    for (int ib = tpitg; ib < n_blocks; ib += ntg) {
        quantize_func(acc_row + ib*16*nl, ((device block_q *) out)[ib]);
    }
}

typedef decltype(kernel_chelsea_merge_rows_f<float, float4x4, 1, dequantize_f32>) kernel_chelsea_merge_rows_f_t;
typedef decltype(kernel_chelsea_merge_rows_q<block_q8_0, 2, dequantize_q8_0, quantize_q8_0>) kernel_chelsea_merge_rows_q_t;

template [[host_name("kernel_chelsea_merge_rows_f32")]]    kernel kernel_chelsea_merge_rows_f_t kernel_chelsea_merge_rows_f<float,  float4x4,  1, dequantize_f32>;
template [[host_name("kernel_chelsea_merge_rows_f16")]]    kernel kernel_chelsea_merge_rows_f_t kernel_chelsea_merge_rows_f<half,   half4x4,   1, dequantize_f16>;
#if defined(GGML_METAL_HAS_BF16)
template [[host_name("kernel_chelsea_merge_rows_bf16")]]   kernel kernel_chelsea_merge_rows_f_t kernel_chelsea_merge_rows_f<bfloat, bfloat4x4, 1, dequantize_bf16>;
#endif
template [[host_name("kernel_chelsea_merge_rows_q4_0")]]   kernel kernel_chelsea_merge_rows_q_t kernel_chelsea_merge_rows_q<block_q4_0,   2, dequantize_q4_0,   quantize_q4_0>;
template [[host_name("kernel_chelsea_merge_rows_q4_1")]]   kernel kernel_chelsea_merge_rows_q_t kernel_chelsea_merge_rows_q<block_q4_1,   2, dequantize_q4_1,   quantize_q4_1>;
template [[host_name("kernel_chelsea_merge_rows_q5_0")]]   kernel kernel_chelsea_merge_rows_q_t kernel_chelsea_merge_rows_q<block_q5_0,   2, dequantize_q5_0,   quantize_q5_0>;
template [[host_name("kernel_chelsea_merge_rows_q5_1")]]   kernel kernel_chelsea_merge_rows_q_t kernel_chelsea_merge_rows_q<block_q5_1,   2, dequantize_q5_1,   quantize_q5_1>;
template [[host_name("kernel_chelsea_merge_rows_q8_0")]]   kernel kernel_chelsea_merge_rows_q_t kernel_chelsea_merge_rows_q<block_q8_0,   2, dequantize_q8_0,   quantize_q8_0>;
template [[host_name("kernel_chelsea_merge_rows_iq4_nl")]] kernel kernel_chelsea_merge_rows_q_t kernel_chelsea_merge_rows_q<block_iq4_nl, 2, dequantize_iq4_nl, quantize_iq4_nl>;

// cells along ne0 (llama.cpp's transposed V; float types): one thread per (destination cell, channel)
template <typename T>
kernel void kernel_chelsea_merge_cols(
        constant ggml_metal_kargs_chelsea & args,
        device const char * x,
        device const char * p,
        device       char * dst,
        device const char * tmp,
        uint3   tgpig[[threadgroup_position_in_grid]],
        ushort  tpitg[[thread_position_in_threadgroup]],
        ushort    ntg[[threads_per_threadgroup]]) {
    const int d = tgpig.x*ntg + tpitg;
    const int c = tgpig.y;
    if (d >= args.n_out) {
        return;
    }
    const int h = c/args.head_dim;

    int q0, q1;
    device const int * srcs = chelsea_merge_sources(args, tmp, h, d, q0, q1);

    device const T * row = (device const T *) (x + (int64_t) c*args.nb01);

    float acc = 0.0f;
    for (int q = q0; q < q1; ++q) {
        const int   i = srcs[q];
        const float w = *(device const float *) (p + i*args.nb10 + h*args.nb11 + args.nb12);
        acc = fma(w, (float) row[i], acc);
    }
    ((device T *) (dst + (int64_t) c*args.nb1))[d] = (T) acc;
}

typedef decltype(kernel_chelsea_merge_cols<float>) kernel_chelsea_merge_cols_t;

template [[host_name("kernel_chelsea_merge_cols_f32")]]  kernel kernel_chelsea_merge_cols_t kernel_chelsea_merge_cols<float>;
template [[host_name("kernel_chelsea_merge_cols_f16")]]  kernel kernel_chelsea_merge_cols_t kernel_chelsea_merge_cols<half>;
#if defined(GGML_METAL_HAS_BF16)
template [[host_name("kernel_chelsea_merge_cols_bf16")]] kernel kernel_chelsea_merge_cols_t kernel_chelsea_merge_cols<bfloat>;
#endif
