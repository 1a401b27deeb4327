// chelsea-gguf: CPU implementation of the Chelsea ops (see native/include/ggml-chelsea.h).

#include "chelsea-ops.h"

#include "ggml-chelsea.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Converts n values of a row slice of type `type` to f32.
void slice_to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n*sizeof(float));
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

// Head slice [e0, e0 + n) of cell `cell` of x in f32: x holds cells along ne1 (cells_dim 1, any type) or along
// ne0 (cells_dim 0, llama.cpp's transposed V: F32/F16/BF16, one element per row).
void cell_slice_to_f32(const ggml_tensor * x, int cells_dim, int64_t cell, int64_t e0, int64_t n, float * out) {
    if (cells_dim == 1) {
        slice_to_f32(x->type, (const char *) x->data + cell*x->nb[1] + row_offset(x->type, e0), out, n);
        return;
    }
    const auto * traits = ggml_get_type_traits(x->type);
    for (int64_t e = 0; e < n; ++e) {
        const char * q = (const char *) x->data + cell*x->nb[0] + (e0 + e)*x->nb[1];
        if (x->type == GGML_TYPE_F32) {
            out[e] = *(const float *) q;
        } else {
            traits->to_float(q, out + e, 1);
        }
    }
}

// Scales x to unit length, so that cosine similarity becomes a dot product. A zero vector is similar to
// nothing (scale 0); non-finite values stay non-finite and never win a comparison (NaN compares false).
// Returns whether x is finite (a finite f32 vector's squared norm cannot overflow a double).
bool normalize(float * x, int64_t n) {
    ggml_float sum = 0.0;
    for (int64_t e = 0; e < n; ++e) {
        sum += (ggml_float) x[e]*x[e];
    }
    const float scale = sum > 0.0 ? (float) (1.0/std::sqrt(sum)) : 0.0f;
    for (int64_t e = 0; e < n; ++e) {
        x[e] *= scale;
    }
    return std::isfinite(sum);
}

} // namespace

void ggml_compute_forward_chelsea_match(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * v = dst->src[1]; // ggml_chelsea_match_kv: values count too

    const int32_t n_head   = ggml_get_op_params_i32(dst, 0);
    const int32_t c0       = ggml_get_op_params_i32(dst, 1);
    const int32_t n_region = ggml_get_op_params_i32(dst, 2);
    const int32_t chunk    = ggml_get_op_params_i32(dst, 3);
    const int32_t v_dim    = ggml_get_op_params_i32(dst, 4);

    const int64_t head_dim = k->ne[0] / n_head;
    const int64_t head_dim_v = v ? v->ne[1 - v_dim] / n_head : 0;
    const int64_t n_chunks = (n_region + chunk - 1) / chunk;

    float * out = (float *) dst->data;
    float * out_score = out;
    float * out_index = out + (int64_t) n_region*n_head;

    std::vector<float> rows((size_t) chunk*head_dim);
    std::vector<float> rows_v((size_t) chunk*head_dim_v);
    std::vector<char>  finite((size_t) chunk);

    for (int64_t item = params->ith; item < n_head*n_chunks; item += params->nth) {
        const int64_t h     = item / n_chunks;
        const int64_t ch    = item % n_chunks;
        const int64_t first = ch*chunk;                              // relative to c0
        const int64_t len   = std::min<int64_t>(chunk, n_region - first);

        for (int64_t i = 0; i < len; ++i) {
            float * x = rows.data() + i*head_dim;
            cell_slice_to_f32(k, 1, c0 + first + i, h*head_dim, head_dim, x);
            finite[i] = normalize(x, head_dim);
            if (v) {
                float * y = rows_v.data() + i*head_dim_v;
                cell_slice_to_f32(v, v_dim, c0 + first + i, h*head_dim_v, head_dim_v, y);
                finite[i] = normalize(y, head_dim_v) && finite[i];
            }
        }

        for (int64_t i = 0; i < len; ++i) {
            const int64_t o = h*n_region + first + i;
            if (i % 2 == 0 || !finite[i]) {
                // a non-finite A cell stays a candidate (each head must remove n_remove cells), ranked last
                out_score[o] = finite[i] ? GGML_CHELSEA_NO_SCORE : GGML_CHELSEA_NONFINITE;
                out_index[o] = i % 2 == 0 ? -1.0f : (float) (first + i - 1);
                continue;
            }
            float   best   = GGML_CHELSEA_NO_SCORE;
            int64_t best_j = first + i - 1;
            for (int64_t j = 0; j < len; j += 2) {
                float s;
                ggml_vec_dot_f32((int) head_dim, &s, 0, rows.data() + i*head_dim, 0, rows.data() + j*head_dim, 0, 1);
                if (v) {
                    float sv;
                    ggml_vec_dot_f32((int) head_dim_v, &sv, 0, rows_v.data() + i*head_dim_v, 0, rows_v.data() + j*head_dim_v, 0, 1);
                    s = 1.0f - 0.5f*(1.0f - s)*(1.0f - sv);
                }
                if (s > best) {
                    best   = s;
                    best_j = first + j;
                }
            }
            out_score[o] = best;
            out_index[o] = (float) best_j;
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

    std::vector<std::pair<float, int64_t>> cand;
    std::vector<char>    merged(n_region);
    std::vector<int64_t> new_index(n_span);
    std::vector<float>   sizes(n_span);
    std::vector<double>  total(n_out);

    for (int64_t h = params->ith; h < n_head; h += params->nth) {
        const float * sc = m_score + h*n_region;
        const float * ix = m_index + h*n_region;

        cand.clear();
        for (int64_t i = 0; i < n_region; ++i) {
            if (ix[i] >= 0.0f) {
                cand.emplace_back(std::isnan(sc[i]) ? GGML_CHELSEA_NO_SCORE : sc[i], i);
            }
        }
        GGML_ASSERT((int64_t) cand.size() >= n_remove);
        // best scores first; equal scores: the earlier cell first, so every backend picks the same edges
        auto better = [](const std::pair<float, int64_t> & a, const std::pair<float, int64_t> & b) {
            return a.first > b.first || (a.first == b.first && a.second < b.second);
        };
        if (n_remove > 0 && n_remove < (int64_t) cand.size()) {
            std::nth_element(cand.begin(), cand.begin() + (n_remove - 1), cand.end(), better);
        }
        std::fill(merged.begin(), merged.end(), 0);
        for (int64_t r = 0; r < n_remove; ++r) {
            merged[cand[r].second] = 1;
        }

        int64_t next = 0;
        for (int64_t i = 0; i < n_span; ++i) {
            const bool gone = i >= c0 && i < c0 + n_region && merged[i - c0];
            new_index[i] = gone ? -1 : next++;
            sizes[i] = *(const float *) ((const char *) s->data + i*s->nb[0] + h*s->nb[1]);
        }
        GGML_ASSERT(next == n_out);

        float * pd = p_dst    + h*n_span;
        float * pw = p_weight + h*n_span;
        float * ps = p_size   + h*n_span;

        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t i = 0; i < n_span; ++i) {
            const int64_t d = new_index[i] >= 0 ? new_index[i] : new_index[c0 + (int64_t) ix[i - c0]];
            pd[i] = (float) d;
            total[d] += sizes[i];
        }
        for (int64_t i = 0; i < n_span; ++i) {
            pw[i] = (float) (sizes[i] / total[(int64_t) pd[i]]);
            ps[i] = i < n_out ? (float) total[i] : 1.0f;
        }
    }
}

void ggml_compute_forward_chelsea_merge(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * x = dst->src[0];
    const ggml_tensor * p = dst->src[1];

    const int32_t n_remove  = ggml_get_op_params_i32(dst, 0);
    const int32_t cells_dim = ggml_get_op_params_i32(dst, 1);

    const int64_t n_span   = x->ne[cells_dim];
    const int64_t n_embd   = x->ne[1 - cells_dim];
    const int64_t n_head   = p->ne[1];
    const int64_t head_dim = n_embd / n_head;
    const int64_t n_out    = n_span - n_remove;

    const float * p_dst    = (const float *) p->data;
    const float * p_weight = p_dst + n_span*n_head;

    const ggml_type type = x->type;

    if (cells_dim == 0) {
        // transposed V: each row is one channel over all cells
        std::vector<float> row(n_span);
        std::vector<float> acc(n_out);
        for (int64_t c = params->ith; c < n_embd; c += params->nth) {
            const int64_t h  = c / head_dim;
            const float * pd = p_dst    + h*n_span;
            const float * pw = p_weight + h*n_span;
            slice_to_f32(type, (const char *) x->data + c*x->nb[1], row.data(), n_span);
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t i = 0; i < n_span; ++i) {
                acc[(int64_t) pd[i]] += pw[i]*row[i];
            }
            f32_to_slice(type, acc.data(), (char *) dst->data + c*dst->nb[1], n_out);
        }
        return;
    }

    // cells are rows: gather the sources of every destination cell, per head
    std::vector<int64_t> offs((size_t) (n_out + 1)*n_head, 0);
    std::vector<int64_t> srcs((size_t) n_span*n_head);
    for (int64_t h = 0; h < n_head; ++h) {
        int64_t * o = offs.data() + h*(n_out + 1);
        const float * pd = p_dst + h*n_span;
        for (int64_t i = 0; i < n_span; ++i) {
            o[(int64_t) pd[i] + 1]++;
        }
        for (int64_t j = 0; j < n_out; ++j) {
            o[j + 1] += o[j];
        }
        std::vector<int64_t> fill(o, o + n_out);
        for (int64_t i = 0; i < n_span; ++i) {
            srcs[h*n_span + fill[(int64_t) pd[i]]++] = i;
        }
    }

    const size_t slice_bytes = row_offset(type, head_dim);
    std::vector<float> tmp(head_dim);
    std::vector<float> acc(head_dim);

    for (int64_t j = params->ith; j < n_out; j += params->nth) {
        char * out_row = (char *) dst->data + j*dst->nb[1];
        for (int64_t h = 0; h < n_head; ++h) {
            const int64_t * o  = offs.data() + h*(n_out + 1);
            const int64_t * ss = srcs.data() + h*n_span;
            const float   * pw = p_weight + h*n_span;
            char * out_slice = out_row + h*slice_bytes;
            if (o[j + 1] - o[j] == 1) {
                // a cell that nothing merged into moves unchanged: bit-exact, even for quantized types
                memcpy(out_slice, (const char *) x->data + ss[o[j]]*x->nb[1] + h*slice_bytes, slice_bytes);
                continue;
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t q = o[j]; q < o[j + 1]; ++q) {
                const int64_t i = ss[q];
                slice_to_f32(type, (const char *) x->data + i*x->nb[1] + h*slice_bytes, tmp.data(), head_dim);
                ggml_vec_mad_f32((int) head_dim, acc.data(), tmp.data(), pw[i]);
            }
            f32_to_slice(type, acc.data(), out_slice, head_dim);
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
