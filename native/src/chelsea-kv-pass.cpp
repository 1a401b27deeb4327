// chelsea-gguf: compression of a clustered llama_kv_cache. chelsea_schedule() decides, before a batch, which
// sequences are due; chelsea_update() (from update(), where llama.cpp runs the K-shift) runs passes over each until it
// reaches its target; chelsea_run_pass() builds one pass as a ggml graph over every layer and runs it on the backend
// that holds the cache.
//
// A sequence's cells, in position order, are [sinks | mergeable region | recent]. A pass merges, per (layer, KV head),
// the best-matching A cells of each chunk of the region into their B cells (size-weighted means of K and V), removes
// the same number of cells from every head, and packs the survivors into the sequence's first cells. A sequence alone
// in its stream stays packed from cell 0, so the attended span n_kv shrinks with the cell count; one whose cells
// interleave with other sequences' (a unified stream) is gathered into a packed span for the pass and scattered back.

#include "chelsea-kv.h"

#include "ggml-chelsea.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

// the share of a pass by which the last pass of a compression may grow to take the remainder (pass_size)
static constexpr float CHELSEA_PASS_SLACK = 0.1f;

// cells on each side of a cell whose attention share it takes (attention_share)
static constexpr int CHELSEA_ATTN_POOL = 8;

namespace {

// the random_pairs baseline's stand-in for a ggml_chelsea_match result, laid out as the op's: per head, each A cell
// (odd offset in its chunk) gets a uniform score in [0, 1) and a uniformly drawn B cell of its chunk, so plan
// merges a random share of the A cells into random partners
std::vector<float> draw_random_pairs(std::mt19937 & rng, int64_t n_head, int64_t n_region, int64_t chunk) {
    std::vector<float> out((size_t) (2*n_head*n_region));
    float * score = out.data();
    float * index = out.data() + n_head*n_region;
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    for (int64_t h = 0; h < n_head; ++h) {
        for (int64_t first = 0; first < n_region; first += chunk) {
            const int64_t len = std::min<int64_t>(chunk, n_region - first);
            std::uniform_int_distribution<int64_t> partner(0, (len - 1)/2);
            for (int64_t i = 0; i < len; ++i) {
                const int64_t o = h*n_region + first + i;
                const bool is_a = i % 2 == 1;
                score[o] = is_a ? std::min(uniform(rng), 0.999999f) : GGML_CHELSEA_NO_SCORE;
                index[o] = is_a ? (float) (first + 2*partner(rng)) : -1.0f;
            }
        }
    }
    return out;
}

// The cells a compression pass works on, in one stream of the cache's tensors: cells [0, n) in place when the
// sequence is packed from cell 0, else the sequence's cells (chelsea_pass::cells, by position),
// gathered into a packed f32 span and scattered back. A tensor holds its cells along ne1 (K; V with flash
// attention) or along ne0 in rows of kv_size elements (llama.cpp's transposed V: n_embd_v rows; cluster sizes:
// n_head_kv rows).
class pass_span {
public:
    pass_span(ggml_context * ctx, const std::vector<uint32_t> & cells, uint32_t kv_size, uint32_t strm)
        : ctx(ctx), cells(cells), kv_size(kv_size), strm(strm) {}

    // [ne0, n] of x, cells along ne1
    ggml_tensor * rows(ggml_tensor * x, uint32_t n) {
        if (cells.empty()) {
            return ggml_view_2d(ctx, x, x->ne[0], n, x->nb[1], strm*x->nb[2]);
        }
        return ggml_get_rows(ctx, stream_rows(x), index(1, n));
    }

    // y ([ne0, n]) into the first n cells of x, cells along ne1
    ggml_tensor * set_rows(ggml_tensor * x, ggml_tensor * y) {
        const uint32_t n = y->ne[1];
        if (cells.empty()) {
            return ggml_cpy(ctx, y, ggml_view_2d(ctx, x, x->ne[0], n, x->nb[1], strm*x->nb[2]));
        }
        return ggml_set_rows(ctx, stream_rows(x), y, index(1, n));
    }

    // [n, n_rows] of x, cells along ne0
    ggml_tensor * cols(ggml_tensor * x, int64_t n_rows, uint32_t n) {
        if (cells.empty()) {
            return ggml_view_2d(ctx, x, n, n_rows, ggml_row_size(x->type, kv_size), strm*x->nb[2]);
        }
        return ggml_reshape_2d(ctx, ggml_get_rows(ctx, stream_elements(x, n_rows), index(n_rows, n)), n, n_rows);
    }

    // y ([n, n_rows], contiguous) into the first n cells of x, cells along ne0
    ggml_tensor * set_cols(ggml_tensor * x, ggml_tensor * y) {
        const uint32_t n = y->ne[0];
        const int64_t n_rows = y->ne[1];
        if (cells.empty()) {
            return ggml_cpy(ctx, y, ggml_view_2d(ctx, x, n, n_rows, ggml_row_size(x->type, kv_size), strm*x->nb[2]));
        }
        return ggml_set_rows(ctx, stream_elements(x, n_rows), ggml_reshape_2d(ctx, y, 1, n*n_rows), index(n_rows, n));
    }

    // the gather indices, once the graph is allocated
    void set_inputs() const {
        for (const auto & [key, t] : made) {
            const auto [n_rows, n] = key;
            std::vector<int32_t> idx((size_t) n_rows*n);
            for (int64_t r = 0; r < n_rows; ++r) {
                for (uint32_t c = 0; c < n; ++c) {
                    idx[r*n + c] = (int32_t) (r*kv_size + cells[c]);
                }
            }
            ggml_backend_tensor_set(t, idx.data(), 0, idx.size()*sizeof(int32_t));
        }
    }

    // the indices are int32 (ggml_get_rows): the largest stream they can address
    static bool fits(uint32_t kv_size, int64_t n_rows) {
        return (int64_t) kv_size*n_rows <= std::numeric_limits<int32_t>::max();
    }

private:
    ggml_tensor * stream_rows(ggml_tensor * x) const {
        return ggml_view_2d(ctx, x, x->ne[0], kv_size, x->nb[1], strm*x->nb[2]);
    }

    // the stream as kv_size*n_rows rows of one element each
    ggml_tensor * stream_elements(ggml_tensor * x, int64_t n_rows) const {
        return ggml_view_2d(ctx, x, 1, kv_size*n_rows, ggml_type_size(x->type), strm*x->nb[2]);
    }

    // element (r, c) of the first n cells, row-major: cells[c] of row r; with n_rows 1, the cells
    ggml_tensor * index(int64_t n_rows, uint32_t n) {
        ggml_tensor *& t = made[{ n_rows, n }];
        if (t == nullptr) {
            t = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_rows*n);
            ggml_set_input(t);
        }
        return t;
    }

    ggml_context * ctx;
    const std::vector<uint32_t> & cells;
    const uint32_t kv_size;
    const uint32_t strm;
    std::map<std::pair<int64_t, uint32_t>, ggml_tensor *> made;
};

// (1 - cos(key, the head's mean key))/2 per cell and head, [n, n_head] (cells along ne0): KeyDiff's distinctiveness,
// with the mean taken over the normalized keys of all n cells of the sequence, as kvpress's KeyDiffPress does
ggml_tensor * key_distinctiveness(ggml_context * ctx, ggml_tensor * k, int64_t n_head, uint32_t n) {
    const int64_t head_dim = k->ne[0]/n_head;
    ggml_tensor * kf = k->type == GGML_TYPE_F32 ? ggml_cont(ctx, k) : ggml_cast(ctx, k, GGML_TYPE_F32);
    // rms-normalized rows have norm sqrt(head_dim): their dot product is head_dim * cos
    ggml_tensor * kn = ggml_rms_norm(ctx, ggml_reshape_3d(ctx, kf, head_dim, n_head, n), 1e-6f);
    // the sum over cells points where the mean does, and the norm below drops the length: repeat_back sums over the
    // cells without moving them to ne0 first
    ggml_tensor * shape = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_head, 1);
    ggml_tensor * mean = ggml_rms_norm(ctx, ggml_repeat_back(ctx, kn, shape), 1e-6f);
    // per head, the mean against every cell: a matrix-vector product (a sum over rows of 64 would add in doubles,
    // one element at a time), with the cells along ne0 as the result needs them
    ggml_tensor * dot = ggml_mul_mat(ctx, ggml_permute(ctx, mean, 0, 2, 1, 3),
            ggml_permute(ctx, kn, 0, 2, 1, 3));                                          // [1, n, n_head]
    ggml_tensor * d = ggml_scale_bias(ctx, dot, -0.5f/(float) head_dim, 0.5f);
    return ggml_reshape_2d(ctx, d, n, n_head);
}

// (1 - cos(value of A, value of the B cell it matched))/2 per region cell and KV head, [n_region, n_head]: how much
// of the two values a merge averages away. v: [n_embd_v, n] (cells along ne1), or llama.cpp's transposed V, [n,
// n_embd_v]; rows: the matched B cell of each region cell (B cells: any valid row, discarded by the caller)
ggml_tensor * value_distance(ggml_context * ctx, ggml_tensor * v, bool v_trans, ggml_tensor * rows, int64_t n_head,
        const chelsea_pass & pass) {
    ggml_tensor * vf = v_trans ? ggml_transpose(ctx, v) : v;
    vf = vf->type == GGML_TYPE_F32 ? ggml_cont(ctx, vf) : ggml_cast(ctx, ggml_cont(ctx, vf), GGML_TYPE_F32);
    const int64_t head_dim = vf->ne[0]/n_head, n_region = pass.n_region;
    ggml_tensor * vn = ggml_rms_norm(ctx, ggml_reshape_3d(ctx, vf, head_dim, n_head, pass.n), 1e-6f);
    ggml_tensor * region = ggml_view_3d(ctx, vn, head_dim, n_head, n_region, vn->nb[1], vn->nb[2], pass.c0*vn->nb[2]);
    ggml_tensor * v_a = ggml_cont(ctx, ggml_permute(ctx, region, 0, 2, 1, 3));             // [head_dim, n_region, n_head]
    ggml_tensor * v_b = ggml_get_rows(ctx, v_a, rows);
    ggml_tensor * dot = ggml_sum_rows(ctx, ggml_mul(ctx, v_a, v_b));                        // [1, n_region, n_head]
    return ggml_reshape_2d(ctx, ggml_scale_bias(ctx, dot, -0.5f/(float) head_dim, 0.5f), n_region, n_head);
}

// max(x of A, x of the B cell A matched) per region cell and KV head, [n_region, n_head]; x_region: [n_region, n_head]
// (cells along ne0); rows: the matched B cell of each region cell
ggml_tensor * pair_max(ggml_context * ctx, ggml_tensor * x_region, ggml_tensor * rows) {
    const int64_t n_region = x_region->ne[0], n_head = x_region->ne[1];
    ggml_tensor * x_b = ggml_get_rows(ctx, ggml_reshape_3d(ctx, x_region, 1, n_region, n_head), rows);
    x_b = ggml_reshape_2d(ctx, x_b, n_region, n_head);
    return ggml_add(ctx, x_region, ggml_relu(ctx, ggml_sub(ctx, x_b, x_region)));
}

// the attention the sequence's last prompt queries pay each region cell, summed over the queries and the Q heads of a
// KV head, as a multiple of a uniform share of the region's: [n_region, n_head_kv]. k: [n_embd_k, n] (cells along
// ne1); q: [head_dim*n_head, rows] f32, post-RoPE as K; scale: the KQ scale attention used
ggml_tensor * attention_share(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q, float scale, int64_t n_head_kv,
        const chelsea_pass & pass) {
    const int64_t head_dim = k->ne[0]/n_head_kv, n_head = q->ne[0]/head_dim, rows = q->ne[1];
    ggml_tensor * k3 = ggml_view_3d(ctx, k, head_dim, n_head_kv, pass.n, ggml_row_size(k->type, head_dim), k->nb[1], 0);
    k3 = ggml_permute(ctx, k3, 0, 2, 1, 3);                                                // [head_dim, n, n_head_kv]
    ggml_tensor * q3 = ggml_permute(ctx, ggml_reshape_3d(ctx, q, head_dim, n_head, rows), 0, 2, 1, 3);
    // Q head h reads KV head h/(n_head/n_head_kv), as attention does: mul_mat broadcasts k3 over q3's heads so.
    // ggml's tiled GEMM takes a multiple of 4 cells only (else a dot product per cell and query): the up to 3 cells
    // past the last multiple go on their own
    const int64_t n4 = pass.n & ~(int64_t) 3;
    ggml_tensor * kq = ggml_mul_mat(ctx, n4 > 0 ? ggml_view_3d(ctx, k3, head_dim, n4, n_head_kv, k3->nb[1], k3->nb[2], 0) : k3, q3);
    if (n4 > 0 && n4 < (int64_t) pass.n) {
        ggml_tensor * tail = ggml_view_3d(ctx, k3, head_dim, pass.n - n4, n_head_kv, k3->nb[1], k3->nb[2], n4*k3->nb[1]);
        kq = ggml_concat(ctx, kq, ggml_mul_mat(ctx, tail, q3), 0);
    }
    kq = ggml_soft_max_ext(ctx, kq, nullptr, scale, 0.0f);                                 // [n, rows, n_head]
    kq = ggml_reshape_4d(ctx, kq, pass.n, rows, n_head/n_head_kv, n_head_kv);
    ggml_tensor * shape = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, pass.n, 1, 1, n_head_kv);
    ggml_tensor * paid = ggml_reshape_2d(ctx, ggml_repeat_back(ctx, kq, shape), pass.n, n_head_kv);
    ggml_tensor * region = ggml_cont(ctx, ggml_view_2d(ctx, paid, pass.n_region, n_head_kv, paid->nb[1], pass.c0*paid->nb[0]));
    ggml_tensor * mean = ggml_scale_bias(ctx, ggml_sum_rows(ctx, region), 1.0f/(float) pass.n_region, 1e-20f);
    // a question's queries find the words that lead to an answer ("the number is"), and the answer follows them:
    // each cell takes the largest share of the cells within CHELSEA_ATTN_POOL of it, as SnapKV pools its scores
    ggml_tensor * pooled = ggml_pool_1d(ctx, region, GGML_OP_POOL_MAX, 2*CHELSEA_ATTN_POOL + 1, 1, CHELSEA_ATTN_POOL);
    return ggml_div(ctx, pooled, mean);
}

// the match result with each candidate's score lowered by distinct_weight * max(distinctiveness of A, of its B),
// size_weight * tanh(log size of A) (below 0: raised by -size_weight * max(tanh(log size) of A, of its B)),
// value_weight * the pair's value distance and attn_weight * max(tanh(a/4) of A, of its B) for the attention share a
// that q (the last prompt queries, if any) pay, imp_weight * max(imp of A, of B) for a ranked compression's importance
// imp (in [0, 1], if any), then divided by 1 + the weights' sizes:
// the same order of merges as those penalties give, with scores kept in [-1, 1] so that the no-candidate and
// non-finite marks below stay apart
ggml_tensor * weigh_match(ggml_context * ctx, ggml_tensor * m, ggml_tensor * k, ggml_tensor * v, bool v_trans,
        ggml_tensor * log_sizes, ggml_tensor * q, float q_scale, ggml_tensor * imp, float imp_weight,
        const chelsea_kv_cluster_params & p, const chelsea_pass & pass) {
    const int64_t n_region = m->ne[0], n_head = m->ne[1];
    ggml_tensor * score = ggml_view_2d(ctx, m, n_region, n_head, m->nb[1], 0);
    ggml_tensor * index = ggml_view_2d(ctx, m, n_region, n_head, m->nb[1], m->nb[2]);
    // B cells point at -1: relu makes that 0, a valid row whose value the blend below discards
    ggml_tensor * rows = ggml_cast(ctx, ggml_relu(ctx, index), GGML_TYPE_I32);
    ggml_tensor * penalty = nullptr;
    if (p.distinct_weight > 0.0f) {
        ggml_tensor * d = key_distinctiveness(ctx, k, n_head, pass.n);
        ggml_tensor * d_a = ggml_cont(ctx, ggml_view_2d(ctx, d, n_region, n_head, d->nb[1], pass.c0*d->nb[0]));
        penalty = ggml_scale(ctx, pair_max(ctx, d_a, rows), p.distinct_weight);
    }
    if (p.size_weight != 0.0f) {
        ggml_tensor * ls = ggml_cont(ctx, ggml_view_2d(ctx, log_sizes, n_region, n_head, log_sizes->nb[1], pass.c0*log_sizes->nb[0]));
        // spreading looks at the cell that would move (A); gathering at the larger of the two, so that a large
        // cluster draws its neighbours whichever side of the pair it is on
        ggml_tensor * t = ggml_tanh(ctx, ls);
        ggml_tensor * grown = ggml_scale(ctx, p.size_weight > 0.0f ? t : pair_max(ctx, t, rows), p.size_weight);
        penalty = penalty ? ggml_add(ctx, penalty, grown) : grown;
    }
    if (p.value_weight > 0.0f && v != nullptr) {
        ggml_tensor * apart = ggml_scale(ctx, value_distance(ctx, v, v_trans, rows, n_head, pass), p.value_weight);
        penalty = penalty ? ggml_add(ctx, penalty, apart) : apart;
    }
    if (q != nullptr) {
        // a needle the question asks for draws tens of uniform shares in the heads that read it: tanh(a/4) saturates
        // there, while the text around it (about one share) stays near 0.25
        ggml_tensor * share = attention_share(ctx, k, q, q_scale, n_head, pass);
        ggml_tensor * a = ggml_tanh(ctx, ggml_scale(ctx, share, 0.25f));
        if (pass.attn_top > 0 && pass.attn_top < (uint32_t) n_region) {
            // ranked before tanh, which ties every saturated span: a step at the attn_top-th largest share of each head
            ggml_tensor * order = ggml_argsort(ctx, share, GGML_SORT_ORDER_DESC);
            ggml_tensor * nth = ggml_cont(ctx, ggml_view_2d(ctx, order, 1, n_head, order->nb[1], (pass.attn_top - 1)*order->nb[0]));
            ggml_tensor * least = ggml_get_rows(ctx, ggml_reshape_3d(ctx, share, 1, n_region, n_head), nth);
            least = ggml_scale(ctx, ggml_reshape_2d(ctx, least, 1, n_head), 1.0f - 1e-6f);
            a = ggml_mul(ctx, a, ggml_step(ctx, ggml_sub(ctx, share, least)));
        }
        ggml_tensor * asked = ggml_scale(ctx, pair_max(ctx, a, rows), p.attn_weight);
        penalty = penalty ? ggml_add(ctx, penalty, asked) : asked;
    }
    if (imp != nullptr) {
        ggml_tensor * ir = ggml_cont(ctx, ggml_view_2d(ctx, imp, n_region, n_head, imp->nb[1], pass.c0*imp->nb[0]));
        ggml_tensor * kept = ggml_scale(ctx, pair_max(ctx, ir, rows), imp_weight);
        penalty = penalty ? ggml_add(ctx, penalty, kept) : kept;
    }
    if (penalty == nullptr) {
        return m;
    }
    // 1 for candidates (scores in [-1, 1]), 0 for the marks GGML_CHELSEA_NO_SCORE and GGML_CHELSEA_NONFINITE
    ggml_tensor * candidate = ggml_step(ctx, ggml_scale_bias(ctx, score, 1.0f, 1.5f));
    const float norm = 1.0f/(1.0f + p.distinct_weight + std::fabs(p.size_weight) + p.value_weight + (q ? p.attn_weight : 0.0f) +
            (imp ? imp_weight : 0.0f));
    ggml_tensor * weighed = ggml_scale(ctx, ggml_sub(ctx, score, penalty), norm);
    // marks stay as they were: candidate*weighed + (1 - candidate)*score
    weighed = ggml_add(ctx, score, ggml_mul(ctx, candidate, ggml_sub(ctx, weighed, score)));
    return ggml_concat(ctx, ggml_reshape_3d(ctx, weighed, n_region, n_head, 1),
            ggml_reshape_3d(ctx, ggml_cont(ctx, index), n_region, n_head, 1), 2);
}

// the ops of one pass over one cache layer: match (or the random_pairs draw, returned in `drawn`), plan, merge of K
// and V into the first cells, new sizes and log sizes. Returns the layer's count of non-finite region slices (a
// scalar tensor), or nullptr for random pairs
ggml_tensor * build_layer_pass(ggml_context * ctx, ggml_cgraph * gf, pass_span & span, const chelsea_kv_state & st,
        std::mt19937 & rng, const chelsea_pass & pass, ggml_tensor * layer_k, ggml_tensor * layer_v, bool v_trans,
        size_t ikv, std::vector<std::pair<ggml_tensor *, std::vector<float>>> & drawn) {
    const auto & p = st.params;
    ggml_tensor * s = st.sizes[ikv];
    const int64_t n_head_kv = s->ne[1];
    const int c0 = (int) pass.c0, n_region = (int) pass.n_region, n_remove = (int) pass.n_remove;

    ggml_tensor * k  = span.rows(layer_k, pass.n);
    ggml_tensor * vv = nullptr;
    if (layer_v) {
        vv = v_trans ? span.cols(layer_v, layer_v->ne[0], pass.n) : span.rows(layer_v, pass.n);
    }
    ggml_tensor * m = nullptr;
    ggml_tensor * nonfinite = nullptr;
    if (p.random_pairs) {
        m = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_region, n_head_kv, 2);
        ggml_set_input(m);
        drawn.emplace_back(m, draw_random_pairs(rng, n_head_kv, n_region, p.chunk));
    } else {
        if (p.match_values && vv) {
            m = ggml_chelsea_match_kv(ctx, k, vv, v_trans ? 0 : 1, (int) n_head_kv, c0, n_region, p.chunk);
        } else {
            m = ggml_chelsea_match(ctx, k, (int) n_head_kv, c0, n_region, p.chunk);
        }
        // step(-score - 2.5): 1 for GGML_CHELSEA_NONFINITE, 0 for every other score
        ggml_tensor * scores = ggml_view_2d(ctx, m, n_region, n_head_kv, m->nb[1], 0);
        nonfinite = ggml_sum(ctx, ggml_step(ctx, ggml_scale_bias(ctx, scores, -1.0f,
                0.5f*(GGML_CHELSEA_NO_SCORE + GGML_CHELSEA_NONFINITE))));
    }
    ggml_tensor * sizes = span.cols(s, n_head_kv, pass.n);
    // the window's newest q_rows queries (q_rows > 0 only when the window exists), or the read-ahead ones
    ggml_tensor * q = nullptr;
    float q_scale = 1.0f;
    if (pass.q_rows > 0) {
        ggml_tensor * w = pass.q_lookahead ? st.lookahead[ikv] : st.queries[ikv];
        q = ggml_view_2d(ctx, w, w->ne[0], pass.q_rows, w->nb[1], pass.strm*w->nb[2] + (w->ne[1] - pass.q_rows)*w->nb[1]);
        q_scale = st.queries_scale[ikv];
    }
    ggml_tensor * imp = st.importance.empty() ? nullptr : span.cols(st.importance[ikv], n_head_kv, pass.n);
    if (!p.random_pairs && (p.distinct_weight > 0.0f || p.size_weight != 0.0f || p.value_weight > 0.0f || q || imp)) {
        m = weigh_match(ctx, m, k, vv, v_trans, span.cols(st.log_sizes[ikv], n_head_kv, pass.n), q, q_scale, imp,
                st.importance_weight, p, pass);
    }
    ggml_tensor * plan = ggml_chelsea_plan(ctx, m, sizes, c0, n_remove);

    ggml_build_forward_expand(gf, span.set_rows(layer_k, ggml_chelsea_merge(ctx, k, plan, n_remove, 1)));
    if (vv) {
        ggml_tensor * v_new = ggml_chelsea_merge(ctx, vv, plan, n_remove, v_trans ? 0 : 1);
        ggml_build_forward_expand(gf, v_trans ? span.set_cols(layer_v, v_new) : span.set_rows(layer_v, v_new));
    }

    // new sizes, and 1 for the cells freed at the end
    ggml_tensor * sizes_new = ggml_view_2d(ctx, plan, pass.n, n_head_kv, plan->nb[1], 2*plan->nb[2]);
    ggml_build_forward_expand(gf, span.set_cols(s, sizes_new));
    ggml_build_forward_expand(gf, span.set_cols(st.log_sizes[ikv], ggml_log(ctx, sizes_new)));
    if (imp) {
        // a centroid's importance is its cells' size-weighted mean, as its key is, for the passes after this one
        ggml_build_forward_expand(gf, span.set_cols(st.importance[ikv], ggml_chelsea_merge(ctx, imp, plan, n_remove, 0)));
    }
    return nonfinite;
}

// the nodes [n_nodes0, n) of a layer's pass onto the backend that holds the layer's cache. The scheduler would give
// the first ones, those that read no buffer of their own yet, the backend of the layer before: across two devices
// (two RPC workers) the layer's K and V would then be copied from one to the other, through the client
void pin_to_cache_backend(ggml_backend_sched_t sched, ggml_cgraph * gf, int n_nodes0, const ggml_tensor * cache_k) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(cache_k->buffer));
    ggml_backend_t backend = nullptr;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched) && backend == nullptr; ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(sched, i);
        backend = ggml_backend_get_device(b) == dev ? b : nullptr;
    }
    if (backend == nullptr) {
        return;
    }
    for (int i = n_nodes0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (ggml_backend_supports_op(backend, node)) {
            ggml_backend_sched_set_tensor_backend(sched, node, backend);
        }
    }
}

// the sequence's cells in position order, and how many of the first are shared with other sequences (seq_cp in one
// stream: they stand for all of them and are kept as they are, like the sinks); false if a shared cell follows one
// of its own
bool seq_cells_in_order(const llama_kv_cells & cells, llama_seq_id seq_id, std::vector<uint32_t> & idx, uint32_t & n_shared) {
    const auto & seq_pos = cells.seq_pos_get(seq_id);
    idx.clear();
    idx.reserve(seq_pos.size());
    n_shared = 0;
    bool shared_first = true;
    for (const auto & [pos, cell] : seq_pos) {
        if (cells.seq_count(cell) > 1) {
            shared_first = shared_first && n_shared == idx.size();
            n_shared++;
        }
        idx.push_back(cell);
    }
    return shared_first;
}

// cells one pass removes when `need` more must go, `most` may go (>= need) and the region has n_cand A cells:
// pass_fraction of the candidates, or all of the need when it exceeds that by less than CHELSEA_PASS_SLACK of a pass.
// A pass costs about the same over every layer whatever it merges: at a quarter per pass a prompt fed in chunks of the
// interval's size asks each compression for a little more than one pass (256 cells against 246 after an 8k prompt at
// R = 0.2), and the remainder's own pass would double the clustering; once a pass may merge more than a chunk needs
// (past about 2k cells at a quarter, 1k at the default half), room for a chunk (most above need, down to the budget)
// takes the whole pass, so that the chunks do not each pay a pass over the whole region for less
uint32_t pass_size(uint32_t need, uint32_t most, uint32_t n_cand, float pass_fraction) {
    const uint32_t per_pass = std::max(1u, (uint32_t) (n_cand*pass_fraction));
    const bool fold = need <= per_pass + (uint32_t) (CHELSEA_PASS_SLACK*per_pass);
    return std::min(std::max(fold ? need : per_pass, std::min(per_pass, most)), n_cand);
}

// cell metadata after a pass: the region keeps an increasing subsequence of its positions, the recent cells move
// down unchanged, and the sequence's merged range grows to cover the region
void retire_merged_cells(llama_kv_cells & cells, std::vector<uint32_t> & idx, const chelsea_pass & pass,
        llama_seq_id seq_id, chelsea_seq_state & seq) {
    const uint32_t n = pass.n, c0 = pass.c0, n_region = pass.n_region, n_remove = pass.n_remove;
    std::vector<llama_pos> pos_old(n);
    for (uint32_t i = 0; i < n; ++i) {
        pos_old[i] = cells.pos_get(idx[i]);
    }
    const uint32_t n_kept = n_region - n_remove;
    if (seq.pos_merged_min < 0) {
        seq.pos_merged_min = pos_old[c0];
    }
    seq.pos_merged_max = std::max(seq.pos_merged_max, pos_old[c0 + n_region - 1]);
    for (uint32_t i = c0; i < n; ++i) {
        cells.rm(idx[i]);
    }
    for (uint32_t j = c0; j < n - n_remove; ++j) {
        const uint32_t src = j < c0 + n_kept
            ? c0 + (uint32_t) (((uint64_t) (j - c0)*n_region)/n_kept)
            : j + n_remove;
        cells.pos_set(idx[j], pos_old[src]);
        cells.seq_add(idx[j], seq_id);
    }
    idx.resize(n - n_remove);
    seq.n_merged += n_remove;
}

} // namespace

// tensors (nodes, views, leaves) one layer's pass may make, with room: about 75 with every ranking penalty on
static constexpr int64_t CHELSEA_PASS_NODES_PER_LAYER = 128;

// a batch this small is a generation step (or a few speculative tokens), not a prompt chunk
static constexpr uint32_t CHELSEA_DECODE_MAX_TOKENS = 8;

void llama_context::chelsea_reserve() {
    sched_need_reserve = true;
    sched_reserve();
}

uint32_t llama_context::chelsea_n_batch_tokens(llama_seq_id seq_id) const {
    if (!balloc || seq_id < 0) {
        return balloc ? balloc->get_n_tokens() : 0;
    }
    const llama_pos p0 = balloc->seq_pos_min(seq_id);
    return p0 < 0 ? 0 : (uint32_t) (balloc->seq_pos_max(seq_id) - p0 + 1);
}

bool llama_kv_cache::chelsea_pending() const {
    for (const auto & seq : chelsea->seqs) {
        if (seq.pending) {
            return true;
        }
    }
    for (const auto & req : chelsea->read_ahead_requests) {
        if (req.seq >= 0) {
            return true;
        }
    }
    return chelsea->reread_request.seq >= 0;
}

bool llama_kv_cache::chelsea_schedule(const llama_context * lctx, bool optimize) {
    auto & st = *chelsea;
    const auto & p = st.params;
    const bool decoding = lctx->chelsea_n_batch_tokens() <= CHELSEA_DECODE_MAX_TOKENS;

    bool any = false;
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        auto & seq = st.seqs[s];
        const uint32_t strm = seq_to_stream[s];
        const auto & cells = v_cells[strm];
        const int64_t n = (int64_t) cells.seq_pos_get((llama_seq_id) s).size();
        if (n == 0) {
            seq.pending = seq.forced = false;
            continue;
        }
        const uint32_t target = chelsea_target_cells(p, n + seq.n_merged);
        const uint32_t free   = cells.size() - cells.get_used(); // find_slot fills holes too
        // while a prompt is fed in chunks, merge only when the next chunk would not fit: later merges see
        // more of the prompt; once generating, keep the sequence within budget + interval. Only this
        // sequence's own tokens count, so that other sequences' batches leave it as it is
        const uint32_t n_next = st.between_batches ? 0 : lctx->chelsea_n_batch_tokens((llama_seq_id) s);
        // while the prompt's end is read ahead, the prompt is being fed: a batch as small as a generation step is the
        // reading of that end again (attn_window tokens, chelsea_gguf.lookahead.refresh), not a step
        const bool reading_ahead = strm < st.lookahead_windows.size() && st.lookahead_windows[strm].seq == (llama_seq_id) s;
        const bool over_budget = decoding && !reading_ahead && n_next > 0 && n > (int64_t) target + p.interval;
        // the budget applies when generating (fewer cells to attend), when asked, and when a batch found no slot
        // (optimize: free all that can be freed). Otherwise a prompt chunk that does not fit merges only the room
        // it lacks: the buffer is allocated anyway, and what stays exact now makes better merges later
        const bool to_budget = seq.forced || optimize || over_budget;
        // while the prompt's end is read ahead, room for a chunk is made with attn_window cells to spare, so that the
        // end can be read again after that chunk without merging first. That reading is itself a batch of attn_window
        // tokens, which must not ask for the spare again
        const uint32_t spare = reading_ahead && n_next > (uint32_t) p.attn_window ? (uint32_t) p.attn_window : 0;
        seq.pending = n > target && (to_budget || free < n_next + spare);
        seq.keep    = seq.pending && !to_budget ? (uint32_t) n - std::min((uint32_t) n, n_next + spare - free) : 0;
        any = any || seq.pending;
    }
    return any;
}

bool llama_kv_cache::chelsea_update(llama_context * lctx) {
    bool changed = false;
    auto & st = *chelsea;
    if (st.reread_request.seq >= 0) {
        // here llama.cpp then rebuilds the decoding graphs, which copy a re-read's queries while it lasts
        std::vector<ggml_backend_buffer_type_t> bufts;
        std::vector<std::array<int64_t, 3>> shapes;
        for (const auto & layer : layers) {
            bufts.push_back(ggml_backend_buffer_get_type(layer.k->buffer));
            shapes.push_back({ (int64_t) hparams.n_embd_head_k(layer.il)*hparams.n_head(layer.il), st.reread_request.rows, 1 });
        }
        chelsea_switch_reread(st, bufts, shapes);
        st.reread_request = chelsea_query_window();
    }
    // a graph of its own runs here, where llama.cpp knows the scheduler is being used between decodes
    for (auto & req : st.read_ahead_requests) {
        if (req.seq >= 0) {
            changed = chelsea_read_ahead(lctx, req.seq, req.pos_max) > 0 || changed;
            req = chelsea_query_window();
        }
    }
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        auto & seq = st.seqs[s];
        if (seq.pending) {
            seq.pending = seq.forced = false;
            changed = chelsea_compress_seq(lctx, (llama_seq_id) s) || changed;
        }
    }
    return changed;
}

bool llama_kv_cache::chelsea_compress_seq(llama_context * lctx, llama_seq_id seq_id) {
    auto & st = *chelsea;
    const auto & p = st.params;
    auto & seq = st.seqs[seq_id];
    const int64_t t_start_us = ggml_time_us();
    const uint32_t strm = seq_to_stream[seq_id];
    auto & cells = v_cells[strm];

    std::vector<uint32_t> idx;
    uint32_t n_shared = 0;
    if (!seq_cells_in_order(cells, seq_id, idx, n_shared)) {
        LLAMA_LOG_WARN("%s: seq %d: cells shared with other sequences follow cells of its own; not compressed\n", __func__, seq_id);
        return false;
    }
    const uint32_t n0 = (uint32_t) idx.size();
    // alone in its stream, in cells [0, n) by position: the passes work in place. Otherwise (other
    // sequences' cells in between, holes) they gather the cells and scatter the survivors back
    bool packed = cells.used_max_p1() == n0 && cells.get_used() == n0;
    for (uint32_t i = 0; packed && i < n0; ++i) {
        packed = idx[i] == i;
    }
    if (!packed) {
        int64_t n_rows = 1;
        for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
            n_rows = std::max({ n_rows, st.sizes[ikv]->ne[1], v_trans && layers[ikv].v ? layers[ikv].v->ne[0] : 0 });
        }
        if (!pass_span::fits(get_size(), n_rows)) {
            LLAMA_LOG_WARN("%s: seq %d: its cells are not packed from cell 0, and a stream of %u cells is too large "
                    "to gather them; not compressed\n", __func__, seq_id, get_size());
            return false;
        }
    }

    const uint32_t budget = chelsea_target_cells(p, n0 + seq.n_merged);
    const uint32_t target = std::max(budget, seq.keep);
    // room for a prompt chunk (keep) is made before the chunk is read: the window holds the text before it, which
    // asks nothing. The queries are read once the prompt is in (the compression to budget at the first generated
    // token, one asked for, the interval's while generating)
    const bool prompt_in = seq.keep == 0;
    seq.keep = 0;
    const uint32_t c0 = std::max((uint32_t) p.n_sink, n_shared);
    // the sequence's last prompt queries, if the window holds its own; while the prompt is fed, those of its end
    // read ahead of it, if any
    uint32_t q_rows = 0;
    bool q_lookahead = false;
    // a ranked compression's importance stands in for the attention score
    if (p.attn_weight > 0.0f && !st.queries.empty() && st.importance.empty()) {
        if (prompt_in && st.query_windows[strm].seq == seq_id) {
            q_rows = st.query_windows[strm].rows;
        } else if (!prompt_in && !st.lookahead.empty() && st.lookahead_windows[strm].seq == seq_id) {
            q_rows = st.lookahead_windows[strm].rows;
            q_lookahead = true;
        }
    }
    const uint32_t n_recent = chelsea_recent_cells(p, target, c0);
    int32_t passes = 0;
    for (uint32_t n = n0; n > target && passes < p.max_passes && n >= c0 + n_recent + 2; n = (uint32_t) idx.size()) {
        const uint32_t n_region = n - c0 - n_recent;
        const uint32_t n_cand   = n_region / 2;
        // room for a prompt chunk that needs less than a pass may take the whole pass, down to the budget
        const uint32_t most = !prompt_in && passes == 0 ? n - budget : n - target;
        // the prompt's own end (a document's, when its questions come later) pays many spans tens of shares: only a
        // head's most attended cells keep the score. The read-ahead end, when merging while the prompt is fed, is
        // scored in full: those merges must keep whatever its question reads
        const uint32_t attn_top = q_rows > 0 && !q_lookahead && p.attn_top > 0.0f ?
                std::max(1u, (uint32_t) (p.attn_top*p.ratio*(float) n_region)) : 0;
        const chelsea_pass pass = { strm, packed ? std::vector<uint32_t>() : idx, n, c0, n_region,
                                    pass_size(n - target, most, n_cand, p.pass_fraction), q_rows, q_lookahead, attn_top };
        const int64_t nonfinite = chelsea_run_pass(lctx, pass);
        if (nonfinite < 0) {
            LLAMA_LOG_ERROR("%s: seq %d: compression pass failed\n", __func__, seq_id);
            break;
        }
        if (nonfinite > 0 && seq.nonfinite == 0) {
            LLAMA_LOG_WARN("%s: seq %d: NaN or Inf in the keys or values of %lld (cell, KV head, layer) slices; "
                    "they are merged last, but the model's output is likely broken already\n", __func__, seq_id,
                    (long long) nonfinite);
        }
        seq.nonfinite += nonfinite;
        retire_merged_cells(cells, idx, pass, seq_id, seq);
        st.any_merged = true;
        passes++;
    }
    const uint32_t n = (uint32_t) idx.size();
    if (packed) {
        v_heads[strm] = n;
    }

    seq.passes += passes;
    seq.compressions += passes > 0;
    seq.t_ms += (ggml_time_us() - t_start_us)/1000.0;
    if (passes > 0) {
        LLAMA_LOG_DEBUG("%s: seq %d: %u -> %u cells in %d passes (%lld tokens)\n", __func__, seq_id, n0, n,
                passes, (long long) (n + seq.n_merged));
    }
    return passes > 0;
}

int64_t llama_kv_cache::chelsea_run_pass(llama_context * lctx, const chelsea_pass & pass) {
    auto & st = *chelsea;
    auto * sched = lctx->get_sched();

    ggml_backend_sched_reset(sched);
    // a graph of its own: a pass has a few dozen nodes per layer (more with the ranking penalties), past the reserve
    // graph's budget of 8 nodes per model tensor
    llm_graph_result res(CHELSEA_PASS_NODES_PER_LAYER*(int64_t) layers.size() + 64);

    ggml_context * ctx = res.get_ctx();
    ggml_cgraph  * gf  = res.get_gf();

    pass_span span(ctx, pass.cells, get_size(), pass.strm);

    // random_pairs: drawn matches, set once the graph is allocated
    std::vector<std::pair<ggml_tensor *, std::vector<float>>> drawn;
    // region slices the match ops marked non-finite, summed over layers
    ggml_tensor * nonfinite = nullptr;
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const int n_nodes0 = ggml_graph_n_nodes(gf);
        ggml_tensor * marked = build_layer_pass(ctx, gf, span, st, st.rng, pass, layers[ikv].k, layers[ikv].v, v_trans, ikv, drawn);
        if (marked) {
            ggml_build_forward_expand(gf, marked);
        }
        pin_to_cache_backend(sched, gf, n_nodes0, layers[ikv].k);
        if (marked) {
            nonfinite = nonfinite ? ggml_add(ctx, nonfinite, marked) : marked;
        }
    }
    if (nonfinite) {
        ggml_set_output(nonfinite);
        ggml_build_forward_expand(gf, nonfinite);
    }

    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        LLAMA_LOG_ERROR("%s: failed to allocate the compression graph\n", __func__);
        return -1;
    }
    for (const auto & [m, data] : drawn) {
        ggml_backend_tensor_set(m, data.data(), 0, data.size()*sizeof(float));
    }
    span.set_inputs();
    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        LLAMA_LOG_ERROR("%s: failed to compute the compression graph\n", __func__);
        return -1;
    }
    float n_nonfinite = 0.0f;
    if (nonfinite) {
        ggml_backend_tensor_get(nonfinite, &n_nonfinite, 0, sizeof(n_nonfinite));
    }
    // the graph's tensors go with `res`: nothing may still be computing them
    ggml_backend_sched_synchronize(sched);
    return (int64_t) n_nonfinite;
}
