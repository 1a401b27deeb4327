// chelsea-gguf: the C API of chelsea.h for KV-cache clustering: switching it on, compressing, statistics and
// inspection.

#include "chelsea-kv.h"

#include "ggml.h"
#include "llama-context.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-recurrent.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

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

void set_error(char * err, size_t err_len, const std::string & msg) {
    if (err != nullptr && err_len > 0) {
        snprintf(err, err_len, "%s", msg.c_str());
    }
}

} // namespace

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
    kv->chelsea->between_batches = true;
    ctx->memory_update(false);
    kv->chelsea->between_batches = false;
    seq.forced = false;
    return (int32_t) (seq.n_merged - before);
}

int32_t chelsea_kv_cluster_read_ahead(llama_context * ctx, llama_seq_id seq_id, llama_pos pos_first) {
    llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr || kv->chelsea->lookahead.empty()) {
        return -1;
    }
    auto & st = *kv->chelsea;
    const uint32_t strm = kv->get_stream(seq_id);
    st.lookahead_windows[strm] = chelsea_query_window();
    if (pos_first < 0) {
        return 0;
    }
    // turned in update(), as a compression: the scheduler then runs a graph of ours, and llama.cpp knows not to
    // reuse the decoding graph it had built on it
    st.read_ahead_requests[strm] = { seq_id, 0, pos_first };
    kv->chelsea->between_batches = true;
    ctx->memory_update(false);
    kv->chelsea->between_batches = false;
    st.read_ahead_requests[strm] = chelsea_query_window();
    const chelsea_query_window & la = st.lookahead_windows[strm];
    return la.seq == seq_id ? (int32_t) la.rows : -1;
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

int32_t chelsea_kv_cluster_reread(llama_context * ctx, llama_seq_id seq_id, int32_t n_rows) {
    llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr || n_rows < 0 || (uint32_t) n_rows > llama_n_ubatch(ctx)) {
        return -1;
    }
    auto & st = *kv->chelsea;
    if (st.reread_window.seq >= 0 && st.reread_window.seq != seq_id) {
        return -1;
    }
    if (n_rows == 0 && st.reread_window.seq < 0) {
        return 0;
    }
    // in update(), as a read-ahead: llama.cpp then rebuilds the graphs that copy the queries, with or without it
    st.reread_request = { seq_id, (uint32_t) n_rows, -1 };
    st.between_batches = true;
    ctx->memory_update(false);
    st.between_batches = false;
    st.reread_request = chelsea_query_window();
    return (n_rows > 0) == (st.reread_window.seq == seq_id) ? 0 : -1;
}

int32_t chelsea_kv_cluster_reread_queries(const llama_context * ctx, llama_seq_id seq_id, int32_t layer, float * out,
        int32_t n_max, int32_t * n_embd_q, float * kq_scale) {
    const llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr || kv->chelsea->reread_window.seq != seq_id || layer < 0 ||
        (size_t) layer >= kv->chelsea->reread.size()) {
        return -1;
    }
    const auto & st = *kv->chelsea;
    const ggml_tensor * q = st.reread[layer];
    if (n_embd_q != nullptr) {
        *n_embd_q = (int32_t) q->ne[0];
    }
    if (kq_scale != nullptr) {
        *kq_scale = st.reread_scale[layer];
    }
    const int32_t rows = (int32_t) st.reread_window.rows;
    if (out != nullptr && rows > 0 && (int64_t) rows*q->ne[0] <= n_max) {
        ggml_backend_tensor_get(q, out, 0, rows*q->nb[1]);
    }
    return rows;
}

int32_t chelsea_kv_cluster_compress_ranked(llama_context * ctx, llama_seq_id seq_id, const float * importance,
        int32_t n_pos, float weight) {
    llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr || (importance == nullptr && n_pos > 0) || n_pos < 0 || !(weight >= 0.0f && weight <= 100.0f)) {
        return -1;
    }
    for (int32_t i = 0; i < n_pos; ++i) {
        if (!(importance[i] >= 0.0f && importance[i] <= 1.0f)) {
            return -1;
        }
    }
    auto & st = *kv->chelsea;
    if (!chelsea_set_importance(st, kv->get_cells(seq_id), kv->get_stream(seq_id), seq_id, importance, n_pos, weight)) {
        return -1;
    }
    const int32_t removed = chelsea_kv_cluster_compress(ctx, seq_id);
    chelsea_drop_importance(st);
    return removed;
}

int32_t chelsea_kv_cluster_queries(const llama_context * ctx, llama_seq_id seq_id, int32_t layer, bool read_ahead,
        float * out, int32_t n_max, int32_t * n_embd_q) {
    const llama_kv_cache * kv = clustered_cache(ctx, seq_id);
    if (kv == nullptr) {
        return -1;
    }
    const auto & st = *kv->chelsea;
    const auto & tensors = read_ahead ? st.lookahead : st.queries;
    if (layer < 0 || (size_t) layer >= tensors.size()) {
        return -1;
    }
    const ggml_tensor * q = tensors[layer];
    const uint32_t strm = kv->get_stream(seq_id);
    const chelsea_query_window & w = read_ahead ? st.lookahead_windows[strm] : st.query_windows[strm];
    if (n_embd_q != nullptr) {
        *n_embd_q = (int32_t) q->ne[0];
    }
    const int32_t rows = w.seq == seq_id ? (int32_t) w.rows : 0;
    if (out != nullptr && rows > 0 && (int64_t) rows*q->ne[0] <= n_max) {
        ggml_backend_tensor_get(q, out, strm*q->nb[2] + (q->ne[1] - rows)*q->nb[1], rows*q->nb[1]);
    }
    return rows;
}

int32_t chelsea_kv_keys(const llama_context * ctx, llama_seq_id seq_id, int32_t layer, float * out, int32_t n_cells) {
    const llama_kv_cache * kv = ctx ? clusterable_cache(ctx) : nullptr;
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max() || n_cells < 0 ||
        (uint32_t) n_cells > kv->get_size()) {
        return -1;
    }
    const ggml_tensor * k = kv->chelsea_layer_k(layer);
    if (k == nullptr) {
        return -1;
    }
    // [n_embd_k, kv_size, n_stream]: the stream's first n_cells rows, in the cache's type
    const ggml_type_traits * traits = ggml_get_type_traits(k->type);
    if (k->type != GGML_TYPE_F32 && traits->to_float == nullptr) {
        return -1;
    }
    const size_t row = k->nb[1];
    std::vector<uint8_t> raw(row*n_cells);
    ggml_backend_tensor_get(k, raw.data(), kv->get_stream(seq_id)*k->nb[2], raw.size());
    for (int32_t c = 0; c < n_cells; ++c) {
        if (k->type == GGML_TYPE_F32) {
            memcpy(out + (size_t) c*k->ne[0], raw.data() + c*row, k->ne[0]*sizeof(float));
        } else {
            traits->to_float(raw.data() + c*row, out + (size_t) c*k->ne[0], k->ne[0]);
        }
    }
    return (int32_t) k->ne[0];
}
