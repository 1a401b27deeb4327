// chelsea-gguf: online KV-cache clustering inside llama_kv_cache (the Chelsea method, ../shared/CHELSEA.md).
//
// A sequence's cells, in position order, are [sinks | mergeable region | recent]. A compression pass merges,
// per (layer, KV head), the best-matching A cells of each chunk of the region into their B cells
// (size-weighted means of K and V), removes the same number of cells from every head, and packs the
// survivors into the sequence's first cells. A sequence alone in its stream stays packed from cell 0, so the
// attended span n_kv shrinks with the cell count; one whose cells interleave with other sequences' (a unified
// stream) is gathered into a packed span for the pass and scattered back. Passes run as
// ggml graphs on the backend that holds the cache, from update(), where llama.cpp runs the K-shift.

#include "chelsea-kv.h"

#include "ggml-chelsea.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

namespace {

// the clustered cache behind a context, and the cache a "compress" or stats call works on
llama_kv_cache * clusterable_cache(const llama_context * ctx) {
    llama_memory_i * mem = llama_get_memory(ctx);
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return nullptr;
}

// the clustered cache of a context, if clustering is on and seq_id is a sequence of it
llama_kv_cache * clustered_cache(const llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = ctx ? clusterable_cache(ctx) : nullptr;
    if (kv == nullptr || !kv->chelsea || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return nullptr;
    }
    return kv;
}

// every cell back to standing for one token
void reset_all_sizes(const chelsea_kv_state & st) {
    for (size_t il = 0; il < st.sizes.size(); ++il) {
        const std::vector<float> ones(ggml_nelements(st.sizes[il]), 1.0f);
        const std::vector<float> zeros(ones.size(), 0.0f);
        ggml_backend_tensor_set(st.sizes[il], ones.data(), 0, ones.size()*sizeof(float));
        ggml_backend_tensor_set(st.log_sizes[il], zeros.data(), 0, zeros.size()*sizeof(float));
    }
}

// log_sizes of cells [first, first + count) of stream strm, from their sizes
void sync_log_sizes(const chelsea_kv_state & st, uint32_t strm, uint32_t first, uint32_t count) {
    std::vector<float> buf(count);
    for (size_t il = 0; il < st.sizes.size(); ++il) {
        ggml_tensor * s = st.sizes[il];
        for (int64_t h = 0; h < s->ne[1]; ++h) {
            const size_t offs = strm*s->nb[2] + h*s->nb[1] + first*sizeof(float);
            ggml_backend_tensor_get(s, buf.data(), offs, count*sizeof(float));
            for (float & x : buf) {
                x = std::log(x);
            }
            ggml_backend_tensor_set(st.log_sizes[il], buf.data(), offs, count*sizeof(float));
        }
    }
}

// cells idxs (increasing) of stream strm back to standing for one token
void reset_cell_sizes(const chelsea_kv_state & st, uint32_t strm, const std::vector<uint32_t> & idxs) {
    for (size_t i0 = 0; i0 < idxs.size(); ) {
        size_t i1 = i0 + 1;
        while (i1 < idxs.size() && idxs[i1] == idxs[i1 - 1] + 1) {
            ++i1;
        }
        const std::vector<float> ones(i1 - i0, 1.0f);
        const std::vector<float> zeros(i1 - i0, 0.0f);
        for (size_t il = 0; il < st.sizes.size(); ++il) {
            ggml_tensor * t = st.sizes[il];
            for (int64_t h = 0; h < t->ne[1]; ++h) {
                const size_t offs = strm*t->nb[2] + h*t->nb[1] + idxs[i0]*sizeof(float);
                ggml_backend_tensor_set(t, ones.data(), offs, ones.size()*sizeof(float));
                ggml_backend_tensor_set(st.log_sizes[il], zeros.data(), offs, zeros.size()*sizeof(float));
            }
        }
        i0 = i1;
    }
}

bool any_merged(const chelsea_kv_state & st) {
    return std::any_of(st.seqs.begin(), st.seqs.end(), [](const chelsea_seq_state & q) { return q.n_merged > 0; });
}

void set_error(char * err, size_t err_len, const std::string & msg) {
    if (err != nullptr && err_len > 0) {
        snprintf(err, err_len, "%s", msg.c_str());
    }
}

std::string validate(const chelsea_kv_cluster_params & p) {
    if (!(p.ratio > 0.0f && p.ratio <= 1.0f)) {
        return "ratio must be in (0, 1], got " + std::to_string(p.ratio);
    }
    if (p.chunk < 2 || p.chunk % 2 != 0) {
        return "chunk must be an even number >= 2, got " + std::to_string(p.chunk);
    }
    if (p.n_sink < 0) {
        return "n_sink must be >= 0, got " + std::to_string(p.n_sink);
    }
    if (p.n_recent < 0) {
        return "n_recent must be >= 0, got " + std::to_string(p.n_recent);
    }
    if (p.interval < 0) {
        return "interval must be >= 0, got " + std::to_string(p.interval);
    }
    if (p.max_passes < 1) {
        return "max_passes must be >= 1, got " + std::to_string(p.max_passes);
    }
    if (!(p.pass_fraction > 0.0f && p.pass_fraction <= 1.0f)) {
        return "pass_fraction must be in (0, 1], got " + std::to_string(p.pass_fraction);
    }
    return "";
}

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
// sequence is packed from cell 0, else the sequence's cells (chelsea_kv_state::pass_io::cells, by position),
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

// cells a sequence may be compressed to: its budget, never below what is protected
uint32_t target_cells(const chelsea_kv_cluster_params & p, int64_t tokens) {
    const int64_t budget = (int64_t) std::ceil((double) p.ratio * (double) tokens);
    return (uint32_t) std::max<int64_t>(budget, p.n_sink + p.n_recent + 2);
}

} // namespace

//
// llama_kv_cache members
//

bool llama_kv_cache::chelsea_enable(const chelsea_kv_cluster_params & params, std::string & err) {
    err = validate(params);
    if (!err.empty()) {
        return false;
    }
    if (other) {
        err = "this KV cache shares its cells with another cache";
        return false;
    }
    if (hparams.is_mla()) {
        err = "models with multi-head latent attention (MLA) cannot be clustered";
        return false;
    }
    if (hparams.use_alibi || hparams.f_max_alibi_bias > 0.0f) {
        err = "models with ALiBi position biases cannot be clustered";
        return false;
    }
    if (hparams.n_pos_per_embd() > 1) {
        err = "models with multi-dimensional positions (M-RoPE) cannot be clustered";
        return false;
    }
    if (has_cell_ext()) {
        err = "this model keeps per-cell extras in the KV cache, which merged cells cannot carry";
        return false;
    }
    if (v_trans && hparams.is_n_embd_v_gqa_variable()) {
        err = "models whose V head size varies across layers cannot be clustered without flash attention";
        return false;
    }
    for (const auto & layer : layers) {
        const int64_t head_dim = hparams.n_embd_head_k(layer.il);
        if (head_dim % ggml_blck_size(layer.k->type) != 0 ||
            (layer.v && !v_trans && hparams.n_embd_head_v(layer.il) % ggml_blck_size(layer.v->type) != 0)) {
            err = "the KV cache type's block size does not divide the head size";
            return false;
        }
    }

    if (chelsea) {
        chelsea->params = params;
        chelsea->rng.seed(params.seed);
        return true;
    }

    auto st = std::make_shared<chelsea_kv_state>();
    st->params = params;
    st->seqs.resize(LLAMA_MAX_SEQ);

    // one ggml context per buffer type, on the buffer type of each layer's K: sizes live beside K/V
    const auto layer_buft = [](const auto & layer) { return ggml_backend_buffer_get_type(layer.k->buffer); };
    const uint32_t n_head_kv0 = layers.empty() ? 0 : hparams.n_head_kv(layers[0].il);
    bool one_log_tensor = !layers.empty();
    for (const auto & layer : layers) {
        one_log_tensor = one_log_tensor && layer_buft(layer) == layer_buft(layers[0]) && hparams.n_head_kv(layer.il) == n_head_kv0;
    }
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & layer = layers[ikv];
        ggml_backend_buffer_type_t buft = layer_buft(layer);
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = { size_t(2*layers.size() + 2)*ggml_tensor_overhead(), nullptr, true };
            it = ctx_map.emplace(buft, ggml_context_ptr(ggml_init(ip))).first;
        }
        ggml_context * ctx = it->second.get();
        ggml_tensor * s = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, get_size(), hparams.n_head_kv(layer.il), n_stream);
        ggml_format_name(s, "chelsea_sizes_l%d", layer.il);
        st->sizes.push_back(s);
        ggml_tensor * ls = nullptr;
        if (one_log_tensor) {
            if (!st->log_sizes_all) {
                st->log_sizes_all = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, get_size(), n_head_kv0, n_stream, layers.size());
                ggml_set_name(st->log_sizes_all, "chelsea_log_sizes");
            }
            const ggml_tensor * all = st->log_sizes_all;
            ls = ggml_view_3d(ctx, st->log_sizes_all, all->ne[0], all->ne[1], all->ne[2], all->nb[1], all->nb[2], ikv*all->nb[3]);
        } else {
            ls = ggml_dup_tensor(ctx, s);
        }
        ggml_format_name(ls, "chelsea_log_sizes_l%d", layer.il);
        st->log_sizes.push_back(ls);
    }
    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            err = "failed to allocate the cluster-size buffer";
            return false;
        }
        LLAMA_LOG_INFO("%s: %10s cluster-size buffer size = %8.2f MiB\n", __func__, ggml_backend_buffer_name(buf),
                ggml_backend_buffer_get_size(buf)/1024.0/1024.0);
        st->ctxs_bufs.emplace_back(std::move(ctx), buf);
    }
    chelsea = std::move(st);
    chelsea_clear();
    return true;
}

void llama_kv_cache::chelsea_clear() {
    auto & st = *chelsea;
    reset_all_sizes(st);
    for (auto & seq : st.seqs) {
        seq = chelsea_seq_state();
    }
    st.any_merged = false;
    st.rng.seed(st.params.seed);
}

bool llama_kv_cache::chelsea_seq_move(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift, int d) {
    auto & seq = chelsea->seqs[seq_id];
    if (seq.n_merged == 0 || p1 <= seq.pos_merged_min || p0 > seq.pos_merged_max) {
        return true;
    }
    // a uniform shift of the whole merged region rotates every member of a centroid alike: exact. Anything else
    // (a part of the region, a division, a shift below position 0 that would drop cells) is not
    const bool whole = p0 <= seq.pos_merged_min && p1 > seq.pos_merged_max;
    if (d != 1 || !whole || seq.pos_merged_min + shift < 0) {
        LLAMA_LOG_ERROR("%s: seq %d: refusing to %s positions [%d, %d): merged cells cover [%d, %d] and would not stay exact\n",
                __func__, seq_id, d != 1 ? "divide" : "shift", p0, p1, seq.pos_merged_min, seq.pos_merged_max);
        return false;
    }
    seq.pos_merged_min += shift;
    seq.pos_merged_max += shift;
    return true;
}

bool llama_kv_cache::chelsea_seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    auto & st  = *chelsea;
    auto & src = st.seqs[seq_id_src];
    auto & dst = st.seqs[seq_id_dst];
    if (seq_id_src == seq_id_dst) {
        return true;
    }
    const uint32_t s0 = seq_to_stream[seq_id_src];
    const uint32_t s1 = seq_to_stream[seq_id_dst];
    if (s0 != s1) {
        // a whole-stream copy (llama.cpp allows no other): dst's stream becomes src's, cluster sizes included
        for (size_t il = 0; il < st.sizes.size(); ++il) {
            for (ggml_tensor * t : { st.sizes[il], st.log_sizes[il] }) {
                std::vector<uint8_t> buf(t->nb[2]);
                ggml_backend_tensor_get(t, buf.data(), s0*t->nb[2], buf.size());
                ggml_backend_tensor_set(t, buf.data(), s1*t->nb[2], buf.size());
            }
        }
        dst = src;
        dst.pending = dst.forced = false;
        st.any_merged = any_merged(st);
        return true;
    }
    if (src.n_merged == 0) {
        return true;
    }
    p0 = p0 < 0 ? 0 : p0;
    p1 = p1 < 0 ? std::numeric_limits<llama_pos>::max() : p1;
    if (p1 <= src.pos_merged_min || p0 > src.pos_merged_max) {
        return true;
    }
    // dst shares the merged cells: it must take all of them, and have none of its own to account for
    if (!(p0 <= src.pos_merged_min && p1 > src.pos_merged_max) || dst.n_merged > 0) {
        LLAMA_LOG_ERROR("%s: refusing to copy positions [%d, %d) of seq %d to seq %d: %s\n", __func__, p0, p1,
                seq_id_src, seq_id_dst, dst.n_merged > 0 ? "the destination holds merged cells of its own"
                                                         : "it would split merged cells");
        return false;
    }
    dst.n_merged       = src.n_merged;
    dst.pos_merged_min = src.pos_merged_min;
    dst.pos_merged_max = src.pos_merged_max;
    return true;
}

void llama_kv_cache::chelsea_seq_keep(llama_seq_id seq_id) {
    auto & st = *chelsea;
    const uint32_t strm = seq_to_stream[seq_id];
    const auto & cells = v_cells[strm];
    std::vector<uint32_t> freed;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && !cells.seq_has(i, seq_id)) {
            freed.push_back(i);
        }
    }
    reset_cell_sizes(st, strm, freed);
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        if ((llama_seq_id) s != seq_id && seq_to_stream[s] == strm) {
            st.seqs[s] = chelsea_seq_state();
        }
    }
    st.any_merged = any_merged(st);
}

// high bit of the saved n_stream: a stock reader fails with "n_stream mismatch" instead of misreading
static constexpr uint32_t CHELSEA_STATE_TAG = 1u << 31;

uint32_t llama_kv_cache::chelsea_state_tag() const {
    return chelsea ? CHELSEA_STATE_TAG : 0;
}

bool llama_kv_cache::chelsea_state_untag(uint32_t & n_stream_io) const {
    if ((n_stream_io & CHELSEA_STATE_TAG) == 0) {
        return false;
    }
    n_stream_io &= ~CHELSEA_STATE_TAG;
    if (!chelsea) {
        throw std::runtime_error("chelsea-gguf: this state was saved from a context with KV-cache clustering "
                "(merged cells and their cluster sizes); load it into a context with clustering enabled");
    }
    return true;
}

// the sequences whose bookkeeping a state of seq_id (-1: all) in stream strm carries
static std::vector<llama_seq_id> chelsea_state_seqs(const std::vector<uint32_t> & seq_to_stream, uint32_t n_seq_max,
        uint32_t strm, llama_seq_id seq_id) {
    std::vector<llama_seq_id> seqs;
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        if ((seq_id < 0 || (uint32_t) seq_id == s) && seq_to_stream[s] == strm) {
            seqs.push_back((llama_seq_id) s);
        }
    }
    return seqs;
}

// per stream, after its K/V data: [n_layer][n_head_kv] cluster sizes of the saved cells (in saved order),
// then the merge bookkeeping of the saved sequences
void llama_kv_cache::chelsea_state_write(llama_io_write_i & io, const cell_ranges_t & cr, llama_seq_id seq_id) const {
    const auto & st = *chelsea;

    const uint32_t n_layer = st.sizes.size();
    io.write(&n_layer, sizeof(n_layer));
    for (ggml_tensor * s : st.sizes) {
        const uint32_t n_head = s->ne[1];
        io.write(&n_head, sizeof(n_head));
        for (uint32_t h = 0; h < n_head; ++h) {
            for (const auto & [first, last] : cr.data) {
                io.write_tensor(s, cr.strm*s->nb[2] + h*s->nb[1] + first*sizeof(float), (last - first)*sizeof(float));
            }
        }
    }

    const auto seqs = chelsea_state_seqs(seq_to_stream, n_seq_max, cr.strm, seq_id);
    const uint32_t n_seq = seqs.size();
    io.write(&n_seq, sizeof(n_seq));
    for (llama_seq_id s : seqs) {
        const auto & seq = st.seqs[s];
        io.write(&s,                  sizeof(s));
        io.write(&seq.n_merged,       sizeof(seq.n_merged));
        io.write(&seq.pos_merged_min, sizeof(seq.pos_merged_min));
        io.write(&seq.pos_merged_max, sizeof(seq.pos_merged_max));
        io.write(&seq.passes,         sizeof(seq.passes));
        io.write(&seq.compressions,   sizeof(seq.compressions));
        io.write(&seq.t_ms,           sizeof(seq.t_ms));
    }
}

bool llama_kv_cache::chelsea_state_read(llama_io_read_i & io, uint32_t strm, uint32_t cell_count, const slot_info & sinfo, llama_seq_id dest_seq_id) {
    auto & st = *chelsea;

    uint32_t n_layer;
    io.read(&n_layer, sizeof(n_layer));
    if (n_layer != st.sizes.size()) {
        LLAMA_LOG_ERROR("%s: the state has cluster sizes for %u layers, this cache has %zu\n", __func__, n_layer, st.sizes.size());
        return false;
    }

    // the cells were restored at sinfo.idxs[0], in saved order: contiguous runs of them
    std::vector<std::pair<uint32_t, uint32_t>> runs; // [cell index, count]
    for (uint32_t i = 0; i < cell_count; ++i) {
        const uint32_t idx = sinfo.idxs[0][i];
        if (!runs.empty() && runs.back().first + runs.back().second == idx) {
            runs.back().second++;
        } else {
            runs.emplace_back(idx, 1);
        }
    }

    for (ggml_tensor * s : st.sizes) {
        uint32_t n_head;
        io.read(&n_head, sizeof(n_head));
        if (n_head != s->ne[1]) {
            LLAMA_LOG_ERROR("%s: the state has cluster sizes for %u KV heads, this cache has %lld\n", __func__, n_head, (long long) s->ne[1]);
            return false;
        }
        for (uint32_t h = 0; h < n_head; ++h) {
            for (const auto & [first, count] : runs) {
                io.read_tensor(s, strm*s->nb[2] + h*s->nb[1] + first*sizeof(float), count*sizeof(float));
            }
        }
    }
    for (const auto & [first, count] : runs) {
        sync_log_sizes(st, strm, first, count);
    }

    uint32_t n_seq;
    io.read(&n_seq, sizeof(n_seq));
    if (n_seq > LLAMA_MAX_SEQ || (dest_seq_id >= 0 && n_seq > 1)) {
        LLAMA_LOG_ERROR("%s: the state has merge bookkeeping for %u sequences\n", __func__, n_seq);
        return false;
    }
    for (uint32_t i = 0; i < n_seq; ++i) {
        llama_seq_id src;
        chelsea_seq_state seq;
        io.read(&src,                sizeof(src));
        io.read(&seq.n_merged,       sizeof(seq.n_merged));
        io.read(&seq.pos_merged_min, sizeof(seq.pos_merged_min));
        io.read(&seq.pos_merged_max, sizeof(seq.pos_merged_max));
        io.read(&seq.passes,         sizeof(seq.passes));
        io.read(&seq.compressions,   sizeof(seq.compressions));
        io.read(&seq.t_ms,           sizeof(seq.t_ms));
        const llama_seq_id dst = dest_seq_id >= 0 ? dest_seq_id : src;
        if (dst < 0 || (uint32_t) dst >= n_seq_max || seq_to_stream[dst] != strm || seq.n_merged < 0) {
            LLAMA_LOG_ERROR("%s: the state's merge bookkeeping names sequence %d, which this cache cannot hold in stream %u\n",
                    __func__, src, strm);
            return false;
        }
        st.seqs[dst] = seq;
    }
    st.any_merged = any_merged(st);
    return true;
}

bool llama_kv_cache::chelsea_pending() const {
    for (const auto & seq : chelsea->seqs) {
        if (seq.pending) {
            return true;
        }
    }
    return false;
}

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

bool llama_kv_cache::chelsea_schedule(const llama_context * lctx, bool optimize) {
    auto & st = *chelsea;
    const auto & p = st.params;
    const bool decoding = lctx->chelsea_n_batch_tokens() <= CHELSEA_DECODE_MAX_TOKENS;

    bool any = false;
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        auto & seq = st.seqs[s];
        const auto & cells = v_cells[seq_to_stream[s]];
        const int64_t n = (int64_t) cells.seq_pos_get((llama_seq_id) s).size();
        if (n == 0) {
            seq.pending = seq.forced = false;
            continue;
        }
        const uint32_t target = target_cells(p, n + seq.n_merged);
        const uint32_t free   = cells.size() - cells.get_used(); // find_slot fills holes too
        // while a prompt is fed in chunks, merge only when the next chunk would not fit: later merges see
        // more of the prompt; once generating, keep the sequence within budget + interval. Only this
        // sequence's own tokens count, so that other sequences' batches leave it as it is
        const uint32_t n_next = lctx->chelsea_n_batch_tokens((llama_seq_id) s);
        const bool over_budget = decoding && n_next > 0 && n > (int64_t) target + p.interval;
        // the budget applies when generating (fewer cells to attend), when asked, and when a batch found no slot
        // (optimize: free all that can be freed). Otherwise a prompt chunk that does not fit merges only the room
        // it lacks: the buffer is allocated anyway, and what stays exact now makes better merges later
        const bool to_budget = seq.forced || optimize || over_budget;
        seq.pending = n > target && (to_budget || free < n_next);
        seq.keep    = seq.pending && !to_budget ? (uint32_t) n - std::min((uint32_t) n, n_next - free) : 0;
        any = any || seq.pending;
    }
    return any;
}

bool llama_kv_cache::chelsea_seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    auto & st = *chelsea;
    std::vector<llama_seq_id> seqs;
    if (seq_id >= 0) {
        seqs.push_back(seq_id);
    } else {
        for (uint32_t s = 0; s < n_seq_max; ++s) {
            seqs.push_back((llama_seq_id) s);
        }
    }
    // refuse first, change nothing unless every sequence agrees
    bool frees_merged = false;
    for (llama_seq_id s : seqs) {
        const auto & seq = st.seqs[s];
        if (seq.n_merged == 0 || p1 <= seq.pos_merged_min || p0 > seq.pos_merged_max) {
            continue;
        }
        if (p0 <= seq.pos_merged_min && p1 > seq.pos_merged_max) {
            frees_merged = true;
            continue;
        }
        LLAMA_LOG_DEBUG("%s: seq %d: refusing to remove [%d, %d): it cuts through merged cells [%d, %d]\n",
                __func__, s, p0, p1, seq.pos_merged_min, seq.pos_merged_max);
        return false;
    }
    if (frees_merged) {
        // every merged cell of these sequences goes: the cells removal frees (not those another sequence
        // shares) become plain tokens again
        for (llama_seq_id s : seqs) {
            auto & seq = st.seqs[s];
            if (seq.n_merged > 0 && p0 <= seq.pos_merged_min && p1 > seq.pos_merged_max) {
                const uint32_t strm = seq_to_stream[s];
                const auto & cells = v_cells[strm];
                std::vector<uint32_t> freed;
                for (uint32_t i = 0; i < cells.size(); ++i) {
                    if (!cells.is_empty(i) && cells.pos_in(i, p0, p1) && cells.seq_has(i, s) &&
                        (seq_id < 0 || cells.seq_count(i) == 1)) {
                        freed.push_back(i);
                    }
                }
                reset_cell_sizes(st, strm, freed);
                seq.n_merged = 0;
                seq.pos_merged_min = seq.pos_merged_max = -1;
            }
        }
        st.any_merged = any_merged(st);
    }
    return true;
}

ggml_tensor * llama_kv_cache::chelsea_get_bias(ggml_context * ctx, int32_t il, uint32_t n_kv, const slot_info & sinfo) const {
    const auto & st = *chelsea;
    if (!st.bias_in_graph()) {
        return nullptr;
    }
    // [n_kv, 1, 1, n_head_kv*n_stream]: head h of stream s at h + n_head_kv*s, one stride apart (kv_size floats)
    ggml_tensor * ls = st.log_sizes[map_layer_ids.at(il)];
    const uint32_t ns = sinfo.s1 - sinfo.s0 + 1;
    return ggml_view_4d(ctx, ls, n_kv, 1, 1, ls->ne[1]*ns, ls->nb[1], ls->nb[1], ls->nb[1], sinfo.s0*ls->nb[2]);
}

ggml_tensor * llama_kv_cache::chelsea_get_bias_all(ggml_context * ctx, int32_t il, uint32_t n_kv, int32_t & i_layer) const {
    const auto & st = *chelsea;
    if (!st.bias_in_graph() || !st.log_sizes_all || n_stream != 1) {
        return nullptr;
    }
    // one stream: head h of layer i at h + n_head_kv*i, one stride apart (kv_size floats)
    ggml_tensor * all = st.log_sizes_all;
    i_layer = map_layer_ids.at(il);
    return ggml_view_4d(ctx, all, n_kv, 1, 1, all->ne[1]*all->ne[3], all->nb[1], all->nb[1], all->nb[1], 0);
}

bool llama_kv_cache::chelsea_update(llama_context * lctx) {
    auto & st = *chelsea;
    const auto & p = st.params;
    bool changed = false;

    for (uint32_t sid = 0; sid < n_seq_max; ++sid) {
        auto & seq = st.seqs[sid];
        if (!seq.pending) {
            continue;
        }
        seq.pending = seq.forced = false;

        const int64_t t_start_us = ggml_time_us();
        const llama_seq_id seq_id = (llama_seq_id) sid;
        const uint32_t strm = seq_to_stream[sid];
        auto & cells = v_cells[strm];

        // the sequence's cells in position order. Cells it shares with other sequences (seq_cp in one stream)
        // stand for all of them: they must come first, and are kept as they are, like the sinks
        const auto & seq_pos = cells.seq_pos_get(seq_id);
        std::vector<uint32_t> idx;
        idx.reserve(seq_pos.size());
        uint32_t n_shared = 0;
        bool shared_first = true;
        for (const auto & [pos, cell] : seq_pos) {
            if (cells.seq_count(cell) > 1) {
                shared_first = shared_first && n_shared == idx.size();
                n_shared++;
            }
            idx.push_back(cell);
        }
        if (!shared_first) {
            LLAMA_LOG_WARN("%s: seq %d: cells shared with other sequences follow cells of its own; not compressed\n", __func__, seq_id);
            continue;
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
                continue;
            }
        }

        uint32_t n = n0;
        const uint32_t target = std::max(target_cells(p, n + seq.n_merged), seq.keep);
        seq.keep = 0;
        const uint32_t c0 = std::max((uint32_t) p.n_sink, n_shared);
        int32_t passes = 0;
        while (n > target && passes < p.max_passes) {
            if (n < c0 + (uint32_t) p.n_recent + 2) {
                break;
            }
            const uint32_t n_region = n - c0 - p.n_recent;
            const uint32_t n_cand   = n_region / 2;
            const uint32_t n_remove = std::min(std::max(1u, (uint32_t) (n_cand*p.pass_fraction)), n - target);
            if (n_remove == 0) {
                break;
            }
            st.pass.cells = packed ? std::vector<uint32_t>() : idx;
            if (!chelsea_run_pass(lctx, strm, n, c0, n_region, n_remove)) {
                LLAMA_LOG_ERROR("%s: seq %d: compression pass failed\n", __func__, seq_id);
                break;
            }
            if (st.pass.nonfinite > 0 && seq.nonfinite == 0) {
                LLAMA_LOG_WARN("%s: seq %d: NaN or Inf in the keys or values of %lld (cell, KV head, layer) slices; "
                        "they are merged last, but the model's output is likely broken already\n", __func__, seq_id,
                        (long long) st.pass.nonfinite);
            }
            seq.nonfinite += st.pass.nonfinite;

            // cell metadata: the region keeps an increasing subsequence of its positions, the recent
            // cells move down unchanged
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
            n -= n_remove;
            idx.resize(n);
            seq.n_merged += n_remove;
            st.any_merged = true;
            passes++;
            changed = true;
        }
        st.pass.cells.clear();
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
    }
    return changed;
}

bool llama_kv_cache::chelsea_run_pass(llama_context * lctx, uint32_t strm, uint32_t n, uint32_t c0, uint32_t n_region, uint32_t n_remove) {
    auto & st = *chelsea;
    auto * sched = lctx->get_sched();

    ggml_backend_sched_reset(sched);
    auto * res = lctx->get_gf_res_reserve();
    res->reset();

    ggml_context * ctx = res->get_ctx();
    ggml_cgraph  * gf  = res->get_gf();

    pass_span span(ctx, st.pass.cells, get_size(), strm);

    // random_pairs: drawn matches, set once the graph is allocated
    std::vector<std::pair<ggml_tensor *, std::vector<float>>> drawn;
    // region slices the match ops marked non-finite, summed over layers
    ggml_tensor * nonfinite = nullptr;

    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & layer = layers[ikv];
        ggml_tensor * s = st.sizes[ikv];
        const int64_t n_head_kv = s->ne[1];

        ggml_tensor * k  = span.rows(layer.k, n);
        ggml_tensor * vv = nullptr;
        if (layer.v) {
            vv = v_trans ? span.cols(layer.v, layer.v->ne[0], n) : span.rows(layer.v, n);
        }
        ggml_tensor * m  = nullptr;
        if (st.params.random_pairs) {
            m = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_region, n_head_kv, 2);
            ggml_set_input(m);
            drawn.emplace_back(m, draw_random_pairs(st.rng, n_head_kv, n_region, st.params.chunk));
        } else {
            if (st.params.match_values && vv) {
                m = ggml_chelsea_match_kv(ctx, k, vv, v_trans ? 0 : 1, (int) n_head_kv, (int) c0, (int) n_region, st.params.chunk);
            } else {
                m = ggml_chelsea_match(ctx, k, (int) n_head_kv, (int) c0, (int) n_region, st.params.chunk);
            }
            // step(-score - 2.5): 1 for GGML_CHELSEA_NONFINITE, 0 for every other score
            ggml_tensor * scores = ggml_view_2d(ctx, m, n_region, n_head_kv, m->nb[1], 0);
            ggml_tensor * marked = ggml_sum(ctx, ggml_step(ctx, ggml_scale_bias(ctx, scores, -1.0f,
                    0.5f*(GGML_CHELSEA_NO_SCORE + GGML_CHELSEA_NONFINITE))));
            nonfinite = nonfinite ? ggml_add(ctx, nonfinite, marked) : marked;
        }
        ggml_tensor * plan = ggml_chelsea_plan(ctx, m, span.cols(s, n_head_kv, n), (int) c0, (int) n_remove);

        ggml_build_forward_expand(gf, span.set_rows(layer.k, ggml_chelsea_merge(ctx, k, plan, (int) n_remove, 1)));
        if (vv) {
            ggml_tensor * v_new = ggml_chelsea_merge(ctx, vv, plan, (int) n_remove, v_trans ? 0 : 1);
            ggml_build_forward_expand(gf, v_trans ? span.set_cols(layer.v, v_new) : span.set_rows(layer.v, v_new));
        }

        // new sizes, and 1 for the cells freed at the end
        ggml_tensor * sizes_new = ggml_view_2d(ctx, plan, n, n_head_kv, plan->nb[1], 2*plan->nb[2]);
        ggml_build_forward_expand(gf, span.set_cols(s, sizes_new));
        ggml_build_forward_expand(gf, span.set_cols(st.log_sizes[ikv], ggml_log(ctx, sizes_new)));
    }
    if (nonfinite) {
        ggml_set_output(nonfinite);
        ggml_build_forward_expand(gf, nonfinite);
    }

    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        LLAMA_LOG_ERROR("%s: failed to allocate the compression graph\n", __func__);
        return false;
    }
    for (const auto & [m, data] : drawn) {
        ggml_backend_tensor_set(m, data.data(), 0, data.size()*sizeof(float));
    }
    span.set_inputs();
    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        LLAMA_LOG_ERROR("%s: failed to compute the compression graph\n", __func__);
        return false;
    }
    float n_nonfinite = 0.0f;
    if (nonfinite) {
        ggml_backend_tensor_get(nonfinite, &n_nonfinite, 0, sizeof(n_nonfinite));
    }
    st.pass.nonfinite = (int64_t) n_nonfinite;
    return true;
}

//
// C API
//

chelsea_kv_cluster_params chelsea_kv_cluster_default_params(void) {
    chelsea_kv_cluster_params p;
    p.ratio      = 0.25f;
    p.chunk      = 64;
    p.n_sink     = 16;
    p.n_recent   = 64;
    p.interval   = 256;
    p.max_passes = 32;
    p.pass_fraction = 0.25f;
    p.log_bias   = true;
    p.match_values = true;
    p.random_pairs = false;
    p.seed       = 0;
    return p;
}

int32_t chelsea_kv_cluster_enable(llama_context * ctx, const chelsea_kv_cluster_params * params, char * err, size_t err_len) {
    if (ctx == nullptr || params == nullptr) {
        set_error(err, err_len, "ctx and params must not be NULL");
        return -1;
    }
    llama_memory_i * mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        set_error(err, err_len, "this context has no KV cache");
        return -1;
    }
    if (dynamic_cast<llama_memory_recurrent *>(mem) != nullptr) {
        set_error(err, err_len, "recurrent models (state-space / RNN memory) have no KV cache to cluster");
        return -1;
    }
    if (dynamic_cast<llama_memory_hybrid *>(mem) != nullptr || dynamic_cast<llama_memory_hybrid_iswa *>(mem) != nullptr) {
        set_error(err, err_len, "hybrid recurrent/attention models cannot be clustered");
        return -1;
    }
    llama_kv_cache * kv = clusterable_cache(ctx);
    if (kv == nullptr) {
        set_error(err, err_len, "this model's memory type cannot be clustered");
        return -1;
    }
    std::string msg;
    if (!kv->chelsea_enable(*params, msg)) {
        set_error(err, err_len, msg);
        return -1;
    }
    if (params->log_bias) {
        // merged cells make attention add a per-head mask, which the reserve at context creation did not see:
        // size the compute buffers for it now rather than growing them at the first merge
        bool reserved = true;
        std::string reserve_err;
        kv->chelsea->reserving = true;
        try {
            ctx->chelsea_reserve();
        } catch (const std::exception & e) {
            reserved = false;
            reserve_err = e.what();
        }
        kv->chelsea->reserving = false;
        if (!reserved) {
            set_error(err, err_len, "clustering is on, but its compute buffers could not be reserved: " + reserve_err);
            return -1;
        }
    }
    return 0;
}

int32_t chelsea_kv_cluster_compress(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr) {
        return -1;
    }
    auto & seq = kv->chelsea->seqs[seq_id];
    const int64_t before = seq.n_merged;
    seq.forced = true;
    ctx->memory_update(false);
    seq.forced = false;
    return (int32_t) (seq.n_merged - before);
}

int32_t chelsea_kv_cluster_seq_stats_get(const llama_context * ctx, llama_seq_id seq_id, chelsea_kv_cluster_seq_stats * out) {
    const llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr || out == nullptr) {
        return -1;
    }
    const auto & seq = kv->chelsea->seqs[seq_id];
    const int64_t cells = (int64_t) kv->get_cells(seq_id).seq_pos_get(seq_id).size();
    out->tokens         = cells + seq.n_merged;
    out->cells          = (int32_t) cells;
    out->passes         = seq.passes;
    out->compressions   = seq.compressions;
    out->t_ms           = seq.t_ms;
    out->pos_merged_min = seq.pos_merged_min;
    out->pos_merged_max = seq.pos_merged_max;
    out->nonfinite      = seq.nonfinite;
    return 0;
}

int32_t chelsea_kv_cluster_cell_positions(const llama_context * ctx, llama_seq_id seq_id, llama_pos * out, int32_t n_max) {
    const llama_kv_cache * kv = ctx ? clusterable_cache(ctx) : nullptr;
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return -1;
    }
    const auto & cells = kv->get_cells(seq_id);
    for (int32_t i = 0; i < n_max && (uint32_t) i < cells.size(); ++i) {
        out[i] = !cells.is_empty(i) && cells.seq_has(i, seq_id) ? cells.pos_get(i) : -1;
    }
    return (int32_t) cells.size();
}

int32_t chelsea_kv_cluster_sizes(const llama_context * ctx, llama_seq_id seq_id, int32_t layer, float * out, int32_t n_cells) {
    const llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr || layer < 0 || (size_t) layer >= kv->chelsea->sizes.size() || n_cells < 0 ||
        (uint32_t) n_cells > kv->get_size()) {
        return -1;
    }
    const ggml_tensor * s = kv->chelsea->sizes[layer];
    const uint32_t strm = kv->get_stream(seq_id);
    for (int64_t h = 0; h < s->ne[1]; ++h) {
        ggml_backend_tensor_get(s, out + h*n_cells, strm*s->nb[2] + h*s->nb[1], n_cells*sizeof(float));
    }
    return (int32_t) s->ne[1];
}
