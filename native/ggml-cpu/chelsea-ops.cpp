// chelsea-gguf: CPU implementation of the Chelsea ops (see native/include/ggml-chelsea.h).

#include "chelsea-ops.h"

#include "ggml-chelsea.h"
#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// Converts n values of a row slice of type `type` to f32.
void slice_to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n*sizeof(float));
        return;
    }
    // the CPU backend's SIMD conversions: the base type traits convert one element at a time
    if (type == GGML_TYPE_F16) {
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, dst, n);
        return;
    }
    if (type == GGML_TYPE_BF16) {
        ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, dst, n);
        return;
    }
    const auto * traits = ggml_get_type_traits(type);
    GGML_ASSERT(traits->to_float != nullptr);
    traits->to_float(src, dst, n);
}

// Converts n f32 values to a row slice of type `type`.
void f32_to_slice(ggml_type type, const float * src, void * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n*sizeof(float));
        return;
    }
    const auto * traits = ggml_get_type_traits_cpu(type);
    GGML_ASSERT(traits->from_float != nullptr);
    traits->from_float(src, dst, n);
}

// byte offset of element e of a row, e a multiple of the type's block size
size_t row_offset(ggml_type type, int64_t e) {
    return (size_t) (e / ggml_blck_size(type)) * ggml_type_size(type);
}

// Per-thread scratch inside params->wdata: slices of CHELSEA_SCRATCH_ALIGN-aligned bytes, so that threads never
// share a cache line. ggml_chelsea_cpu_work_size() sizes wdata with the same layouts.
constexpr size_t CHELSEA_SCRATCH_ALIGN = 64;

size_t aligned(size_t bytes) {
    return (bytes + CHELSEA_SCRATCH_ALIGN - 1) / CHELSEA_SCRATCH_ALIGN * CHELSEA_SCRATCH_ALIGN;
}

// Carves consecutive aligned arrays out of one block of memory; with a null base it only counts the bytes.
class scratch_carver {
public:
    explicit scratch_carver(void * base) : base((char *) base) {}

    template <typename T> T * take(int64_t n) {
        T * p = base ? (T *) (base + used) : nullptr;
        used += aligned((size_t) n*sizeof(T));
        return p;
    }

    size_t bytes() const { return used; }

private:
    char * base;
    size_t used = 0;
};

// A thread's slice of wdata: `per_thread` bytes after a shared block of `shared` bytes.
void * thread_scratch(const ggml_compute_params * params, size_t shared, size_t per_thread) {
    GGML_ASSERT(shared + (size_t) params->nth*per_thread <= params->wsize);
    return (char *) params->wdata + shared + (size_t) params->ith*per_thread;
}

// chunks whose transposed V rows (a row per element, cells along ne0) are converted at once: a chunk's 64 cells of
// 192 rows would touch as many pages for 128 bytes each
constexpr int64_t CHELSEA_MATCH_BLOCK_CHUNKS = 4;

struct match_shape {
    int64_t head_dim, head_dim_v, chunk;
    bool    v_rows; // V holds its cells along ne0 (llama.cpp's transposed V)
};

match_shape match_shape_of(const ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * v = dst->src[1];
    const int32_t n_head = ggml_get_op_params_i32(dst, 0);
    const int32_t v_dim  = ggml_get_op_params_i32(dst, 4);
    return { k->ne[0] / n_head, v ? v->ne[1 - v_dim] / n_head : 0, ggml_get_op_params_i32(dst, 3), v && v_dim == 0 };
}

// One chunk of one head, as the match kernel reads it: element e of the cell at chunk offset i sits at
// [e*len + match_slot(i)], B cells (even offsets) first, so that an A cell's scores against all B cells are
// head_dim multiply-adds of contiguous rows; and each cell's squared norm.
struct match_chunk {
    float  * k, * v;     // [head_dim*chunk], [head_dim_v*chunk]
    float  * v_block;    // transposed V only: one head's rows of a block of chunks, [head_dim_v][block cells]
    float  * row;        // one converted slice: max(head_dim, head_dim_v, chunk)
    float  * score_k, * score_v; // [chunk/2 A cells][chunk/2 + 1 B cells]
    double * norm_k, * norm_v;
};

match_chunk carve_match_chunk(scratch_carver & c, const match_shape & m) {
    match_chunk x;
    x.k       = c.take<float>(m.head_dim*m.chunk);
    x.v       = c.take<float>(m.head_dim_v*m.chunk);
    x.v_block = c.take<float>(m.v_rows ? m.head_dim_v*CHELSEA_MATCH_BLOCK_CHUNKS*m.chunk : 0);
    x.row     = c.take<float>(std::max({ m.head_dim, m.head_dim_v, m.chunk }));
    x.score_k = c.take<float>((m.chunk/2)*(m.chunk/2 + 1));
    x.score_v = c.take<float>((m.chunk/2)*(m.chunk/2 + 1));
    x.norm_k  = c.take<double>(m.chunk);
    x.norm_v  = c.take<double>(m.chunk);
    return x;
}

int64_t match_slot(int64_t i, int64_t n_b) {
    return i % 2 == 0 ? i / 2 : n_b + i / 2;
}

// each loaded cell scaled to unit length, its squared norm in `norm` (by slot); `row`: len floats of scratch
void normalize_chunk(float * out, int64_t len, int64_t n, float * row, double * norm) {
    std::fill(norm, norm + len, 0.0);
    for (int64_t e = 0; e < n; ++e) {
        const float * xe = out + e*len;
        for (int64_t i = 0; i < len; ++i) {
            norm[i] += (double) xe[i]*xe[i];
        }
    }
    for (int64_t i = 0; i < len; ++i) {
        row[i] = norm[i] > 0.0 ? (float) (1.0/std::sqrt(norm[i])) : 0.0f;
    }
    for (int64_t e = 0; e < n; ++e) {
        ggml_vec_mul_f32((int) len, out + e*len, out + e*len, row);
    }
}

// Loads head slice [e0, e0 + n) of cells [cell0, cell0 + len) of x (cells along ne1, any type) into `out`
// (match_chunk layout) and scales each cell to unit length, so that cosine similarity becomes a dot product; `norm`
// gets each cell's squared norm, by slot. A zero vector is similar to nothing (scale 0); a non-finite one stays
// non-finite and never wins a comparison (NaN compares false; a finite f32 vector's squared norm cannot overflow a
// double).
void load_chunk(const ggml_tensor * x, int64_t cell0, int64_t len, int64_t e0, int64_t n, float * out, float * row,
        double * norm) {
    const int64_t n_b = (len + 1) / 2;
    for (int64_t i = 0; i < len; ++i) {
        slice_to_f32(x->type, (const char *) x->data + (cell0 + i)*x->nb[1] + row_offset(x->type, e0), row, n);
        const int64_t slot = match_slot(i, n_b);
        for (int64_t e = 0; e < n; ++e) {
            out[e*len + slot] = row[e];
        }
    }
    normalize_chunk(out, len, n, row, norm);
}

// load_chunk for cells along ne0 (llama.cpp's transposed V: a row per element), from n rows already converted to f32,
// `stride` cells apart (a head's rows of a block of chunks)
void load_chunk_from_rows(const float * rows, int64_t stride, int64_t len, int64_t n, float * out, float * row,
        double * norm) {
    const int64_t n_b = (len + 1) / 2;
    for (int64_t e = 0; e < n; ++e) {
        for (int64_t i = 0; i < len; ++i) {
            out[e*len + match_slot(i, n_b)] = rows[e*stride + i];
        }
    }
    normalize_chunk(out, len, n, row, norm);
}

// score[a*n_b + j] = dot(A cell a, B cell j) for all A and B cells of a loaded chunk of n-element slices: a small
// matrix product, in plain loops over contiguous rows that the compiler vectorizes at any n_b (ggml_vec_mad_f32
// leaves a row shorter than its SIMD step to a scalar loop)
void score_a_against_b(const float * x, int64_t n, int64_t len, int64_t n_b, float * GGML_RESTRICT score) {
    const int64_t n_a = len - n_b;
    std::fill(score, score + n_a*n_b, 0.0f);
    for (int64_t e = 0; e < n; ++e) {
        const float * GGML_RESTRICT b = x + e*len;
        for (int64_t a = 0; a < n_a; ++a) {
            const float w = b[n_b + a];
            float * GGML_RESTRICT row = score + a*n_b;
            for (int64_t j = 0; j < n_b; ++j) {
                row[j] += w*b[j];
            }
        }
    }
}

// the same for a chunk of 2*N_B cells: an A cell's N_B scores stay in registers over all n elements (same sums, same
// order)
template <int64_t N_B>
void score_a_against_b_full(const float * x, int64_t n, float * GGML_RESTRICT score) {
    const int64_t len = 2*N_B;
    for (int64_t a = 0; a < N_B; ++a) {
        float acc[N_B] = {};
        for (int64_t e = 0; e < n; ++e) {
            const float * GGML_RESTRICT b = x + e*len;
            const float w = b[N_B + a];
            for (int64_t j = 0; j < N_B; ++j) {
                acc[j] += w*b[j];
            }
        }
        memcpy(score + a*N_B, acc, sizeof(acc));
    }
}

void score_chunk(const float * x, int64_t n, int64_t len, float * score) {
    const int64_t n_b = (len + 1) / 2;
    if (len == 64) {
        score_a_against_b_full<32>(x, n, score);
    } else if (len == 32) {
        score_a_against_b_full<16>(x, n, score);
    } else {
        score_a_against_b(x, n, len, n_b, score);
    }
}

size_t match_thread_bytes(const match_shape & m) {
    scratch_carver c(nullptr);
    carve_match_chunk(c, m);
    return c.bytes();
}

// Per-thread arrays of the plan kernel (one head at a time).
struct plan_candidate {
    float   score;
    int64_t cell;
};

struct plan_scratch {
    plan_candidate * cand;      // [n_region]
    char           * merged;    // [n_region]
    int64_t        * new_index; // [n_span]
    float          * sizes;     // [n_span]
    double         * total;     // [n_out]
};

plan_scratch carve_plan(scratch_carver & c, int64_t n_region, int64_t n_span, int64_t n_out) {
    plan_scratch x;
    x.cand      = c.take<plan_candidate>(n_region);
    x.merged    = c.take<char>(n_region);
    x.new_index = c.take<int64_t>(n_span);
    x.sizes     = c.take<float>(n_span);
    x.total     = c.take<double>(n_out);
    return x;
}

size_t plan_thread_bytes(const ggml_tensor * dst) {
    const ggml_tensor * m = dst->src[0];
    const int64_t n_span = dst->src[1]->ne[0];
    scratch_carver c(nullptr);
    carve_plan(c, m->ne[0], n_span, n_span - ggml_get_op_params_i32(dst, 1));
    return c.bytes();
}

// The merge kernel's gather table, shared by all threads: per head, the sources of destination cell j are
// srcs[offs[j] .. offs[j + 1]) (cells along ne1 only).
struct merge_table {
    int32_t * offs; // [n_head][n_out + 1]
    int32_t * srcs; // [n_head][n_span]
};

merge_table carve_merge_table(scratch_carver & c, int64_t n_head, int64_t n_span, int64_t n_out) {
    merge_table t;
    t.offs = c.take<int32_t>(n_head*(n_out + 1));
    t.srcs = c.take<int32_t>(n_head*n_span);
    return t;
}

struct merge_shape {
    int64_t n_span, n_embd, n_head, head_dim, n_out;
    int32_t cells_dim;
};

merge_shape merge_shape_of(const ggml_tensor * dst) {
    const ggml_tensor * x = dst->src[0];
    const int32_t cells_dim = ggml_get_op_params_i32(dst, 1);
    merge_shape m;
    m.cells_dim = cells_dim;
    m.n_span    = x->ne[cells_dim];
    m.n_embd    = x->ne[1 - cells_dim];
    m.n_head    = dst->src[1]->ne[1];
    m.head_dim  = m.n_embd / m.n_head;
    m.n_out     = m.n_span - ggml_get_op_params_i32(dst, 0);
    return m;
}

size_t merge_shared_bytes(const merge_shape & m) {
    if (m.cells_dim == 0) {
        return 0;
    }
    scratch_carver c(nullptr);
    carve_merge_table(c, m.n_head, m.n_span, m.n_out);
    return c.bytes();
}

// transposed V: a row of all cells and its merged row; cells as rows: one head slice and its accumulator
size_t merge_thread_bytes(const merge_shape & m) {
    return aligned((m.cells_dim == 0 ? m.n_span + m.n_out : 2*m.head_dim)*sizeof(float));
}

} // namespace

size_t ggml_chelsea_cpu_work_size(const ggml_tensor * op, int n_tasks) {
    switch (op->op) {
        case GGML_OP_CHELSEA_MATCH:
            return (size_t) n_tasks*match_thread_bytes(match_shape_of(op));
        case GGML_OP_CHELSEA_PLAN:
            return (size_t) n_tasks*plan_thread_bytes(op);
        case GGML_OP_CHELSEA_MERGE:
            {
                const merge_shape m = merge_shape_of(op);
                return merge_shared_bytes(m) + (size_t) n_tasks*merge_thread_bytes(m);
            }
        default:
            return 0;
    }
}

void ggml_compute_forward_chelsea_match(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * v = dst->src[1]; // ggml_chelsea_match_kv: values count too

    const int32_t n_head   = ggml_get_op_params_i32(dst, 0);
    const int32_t c0       = ggml_get_op_params_i32(dst, 1);
    const int32_t n_region = ggml_get_op_params_i32(dst, 2);

    const match_shape shape = match_shape_of(dst);
    const int64_t head_dim = shape.head_dim, head_dim_v = shape.head_dim_v, chunk = shape.chunk;

    float * out = (float *) dst->data;
    float * out_score = out;
    float * out_index = out + (int64_t) n_region*n_head;

    scratch_carver carver(thread_scratch(params, 0, match_thread_bytes(shape)));
    const match_chunk x = carve_match_chunk(carver, shape);

    const int64_t block    = CHELSEA_MATCH_BLOCK_CHUNKS*chunk;
    const int64_t n_blocks = (n_region + block - 1) / block;
    // a block of chunks at a time, its heads in turn: a cell's K and V rows hold every head, so the rows a block reads
    // stay in cache across its heads
    for (int64_t item = params->ith; item < n_head*n_blocks; item += params->nth) {
        const int64_t h           = item % n_head;
        const int64_t block_first = (item / n_head)*block;          // relative to c0
        const int64_t block_len   = std::min(block, n_region - block_first);
        if (shape.v_rows) {
            for (int64_t e = 0; e < head_dim_v; ++e) {
                slice_to_f32(v->type, (const char *) v->data + (c0 + block_first)*v->nb[0] + (h*head_dim_v + e)*v->nb[1],
                        x.v_block + e*block, block_len);
            }
        }
        for (int64_t first = block_first; first < block_first + block_len; first += chunk) {
            const int64_t len = std::min<int64_t>(chunk, n_region - first);
            const int64_t n_b = (len + 1) / 2;

            load_chunk(k, c0 + first, len, h*head_dim, head_dim, x.k, x.row, x.norm_k);
            if (shape.v_rows) {
                load_chunk_from_rows(x.v_block + (first - block_first), block, len, head_dim_v, x.v, x.row, x.norm_v);
            } else if (v) {
                load_chunk(v, c0 + first, len, h*head_dim_v, head_dim_v, x.v, x.row, x.norm_v);
            }
            score_chunk(x.k, head_dim, len, x.score_k);
            if (v) {
                score_chunk(x.v, head_dim_v, len, x.score_v);
            }
            auto finite = [&](int64_t i) {
                const int64_t slot = match_slot(i, n_b);
                return std::isfinite(x.norm_k[slot]) && (!v || std::isfinite(x.norm_v[slot]));
            };

            for (int64_t i = 0; i < len; ++i) {
                const int64_t o = h*n_region + first + i;
                if (i % 2 == 0 || !finite(i)) {
                    // a non-finite A cell stays a candidate (each head must remove n_remove cells), ranked last
                    out_score[o] = finite(i) ? GGML_CHELSEA_NO_SCORE : GGML_CHELSEA_NONFINITE;
                    out_index[o] = i % 2 == 0 ? -1.0f : (float) (first + i - 1);
                    continue;
                }
                const float * score_k = x.score_k + (i/2)*n_b;
                const float * score_v = x.score_v + (i/2)*n_b;
                float   best   = GGML_CHELSEA_NO_SCORE;
                int64_t best_j = first + i - 1;
                for (int64_t j = 0; j < n_b; ++j) {
                    float s = score_k[j];
                    if (v) {
                        s = 1.0f - 0.5f*(1.0f - s)*(1.0f - score_v[j]);
                    }
                    if (s > best) {
                        best   = s;
                        best_j = first + 2*j;
                    }
                }
                out_score[o] = best;
                out_index[o] = (float) best_j;
            }
        }
    }
}

void ggml_compute_forward_chelsea_plan(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * m = dst->src[0];
    const ggml_tensor * s = dst->src[1];

    const int32_t c0       = ggml_get_op_params_i32(dst, 0);
    const int32_t n_remove = ggml_get_op_params_i32(dst, 1);

    const int64_t n_region = m->ne[0];
    const int64_t n_head   = m->ne[1];
    const int64_t n_span   = s->ne[0];
    const int64_t n_out    = n_span - n_remove;

    const float * m_score = (const float *) m->data;
    const float * m_index = m_score + n_region*n_head;

    float * p_dst    = (float *) dst->data;
    float * p_weight = p_dst    + n_span*n_head;
    float * p_size   = p_weight + n_span*n_head;

    scratch_carver carver(thread_scratch(params, 0, plan_thread_bytes(dst)));
    const plan_scratch x = carve_plan(carver, n_region, n_span, n_out);

    for (int64_t h = params->ith; h < n_head; h += params->nth) {
        const float * sc = m_score + h*n_region;
        const float * ix = m_index + h*n_region;

        int64_t n_cand = 0;
        for (int64_t i = 0; i < n_region; ++i) {
            if (ix[i] >= 0.0f) {
                x.cand[n_cand++] = { std::isnan(sc[i]) ? GGML_CHELSEA_NO_SCORE : sc[i], i };
            }
        }
        GGML_ASSERT(n_cand >= n_remove);
        // best scores first; equal scores: the earlier cell first, so every backend picks the same edges
        auto better = [](const plan_candidate & a, const plan_candidate & b) {
            return a.score > b.score || (a.score == b.score && a.cell < b.cell);
        };
        if (n_remove > 0 && n_remove < n_cand) {
            std::nth_element(x.cand, x.cand + (n_remove - 1), x.cand + n_cand, better);
        }
        std::fill(x.merged, x.merged + n_region, 0);
        for (int64_t r = 0; r < n_remove; ++r) {
            x.merged[x.cand[r].cell] = 1;
        }

        int64_t next = 0;
        for (int64_t i = 0; i < n_span; ++i) {
            const bool gone = i >= c0 && i < c0 + n_region && x.merged[i - c0];
            x.new_index[i] = gone ? -1 : next++;
            x.sizes[i] = *(const float *) ((const char *) s->data + i*s->nb[0] + h*s->nb[1]);
        }
        GGML_ASSERT(next == n_out);

        float * pd = p_dst    + h*n_span;
        float * pw = p_weight + h*n_span;
        float * ps = p_size   + h*n_span;

        std::fill(x.total, x.total + n_out, 0.0);
        for (int64_t i = 0; i < n_span; ++i) {
            const int64_t d = x.new_index[i] >= 0 ? x.new_index[i] : x.new_index[c0 + (int64_t) ix[i - c0]];
            pd[i] = (float) d;
            x.total[d] += x.sizes[i];
        }
        for (int64_t i = 0; i < n_span; ++i) {
            pw[i] = (float) (x.sizes[i] / x.total[(int64_t) pd[i]]);
            ps[i] = i < n_out ? (float) x.total[i] : 1.0f;
        }
    }
}

void ggml_compute_forward_chelsea_merge(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * x = dst->src[0];
    const ggml_tensor * p = dst->src[1];

    const merge_shape shape = merge_shape_of(dst);
    const int64_t n_span = shape.n_span, n_embd = shape.n_embd, n_head = shape.n_head;
    const int64_t head_dim = shape.head_dim, n_out = shape.n_out;

    const float * p_dst    = (const float *) p->data;
    const float * p_weight = p_dst + n_span*n_head;

    const ggml_type type = x->type;

    const size_t shared = merge_shared_bytes(shape);
    float * work = (float *) thread_scratch(params, shared, merge_thread_bytes(shape));

    if (shape.cells_dim == 0) {
        // transposed V: each row is one channel over all cells
        float * row = work;
        float * acc = work + n_span;
        for (int64_t c = params->ith; c < n_embd; c += params->nth) {
            const int64_t h  = c / head_dim;
            const float * pd = p_dst    + h*n_span;
            const float * pw = p_weight + h*n_span;
            slice_to_f32(type, (const char *) x->data + c*x->nb[1], row, n_span);
            std::fill(acc, acc + n_out, 0.0f);
            for (int64_t i = 0; i < n_span; ++i) {
                acc[(int64_t) pd[i]] += pw[i]*row[i];
            }
            f32_to_slice(type, acc, (char *) dst->data + c*dst->nb[1], n_out);
        }
        return;
    }

    // cells are rows: the sources of every destination cell, per head, by a counting sort on the destination (offs[j]
    // ends at the next destination's start, and is shifted back). Heads split across threads; all threads read all
    scratch_carver carver(params->wdata);
    const merge_table table = carve_merge_table(carver, n_head, n_span, n_out);
    for (int64_t h = params->ith; h < n_head; h += params->nth) {
        int32_t * o    = table.offs + h*(n_out + 1);
        int32_t * srcs = table.srcs + h*n_span;
        const float * pd = p_dst + h*n_span;
        std::fill(o, o + n_out + 1, 0);
        for (int64_t i = 0; i < n_span; ++i) {
            o[(int64_t) pd[i] + 1]++;
        }
        for (int64_t j = 0; j < n_out; ++j) {
            o[j + 1] += o[j];
        }
        for (int64_t i = 0; i < n_span; ++i) {
            srcs[o[(int64_t) pd[i]]++] = (int32_t) i;
        }
        for (int64_t j = n_out; j > 0; --j) {
            o[j] = o[j - 1];
        }
        o[0] = 0;
    }
    ggml_barrier(params->threadpool);

    const size_t slice_bytes = row_offset(type, head_dim);
    float * tmp = work;
    float * acc = work + head_dim;

    for (int64_t j = params->ith; j < n_out; j += params->nth) {
        char * out_row = (char *) dst->data + j*dst->nb[1];
        for (int64_t h = 0; h < n_head; ++h) {
            const int32_t * o  = table.offs + h*(n_out + 1);
            const int32_t * ss = table.srcs + h*n_span;
            const float   * pw = p_weight + h*n_span;
            char * out_slice = out_row + h*slice_bytes;
            if (o[j + 1] - o[j] == 1) {
                // a cell that nothing merged into moves unchanged: bit-exact, even for quantized types
                memcpy(out_slice, (const char *) x->data + ss[o[j]]*x->nb[1] + h*slice_bytes, slice_bytes);
                continue;
            }
            std::fill(acc, acc + head_dim, 0.0f);
            for (int32_t q = o[j]; q < o[j + 1]; ++q) {
                const int64_t i = ss[q];
                slice_to_f32(type, (const char *) x->data + i*x->nb[1] + h*slice_bytes, tmp, head_dim);
                ggml_vec_mad_f32((int) head_dim, acc, tmp, pw[i]);
            }
            f32_to_slice(type, acc, out_slice, head_dim);
        }
    }
}

bool ggml_chelsea_cpu_supports_op(const ggml_tensor * op) {
    const ggml_type type = op->src[0]->type;
    switch (op->op) {
        case GGML_OP_CHELSEA_MATCH:
            return type == GGML_TYPE_F32 || ggml_get_type_traits(type)->to_float != nullptr;
        case GGML_OP_CHELSEA_PLAN:
            return true;
        case GGML_OP_CHELSEA_MERGE:
            return (type == GGML_TYPE_F32 || ggml_get_type_traits(type)->to_float != nullptr) &&
                   (type == GGML_TYPE_F32 || ggml_get_type_traits_cpu(type)->from_float != nullptr);
        default:
            return false;
    }
}
