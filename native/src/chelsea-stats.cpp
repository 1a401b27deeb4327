// KV-cache statistics for chelsea_kv_stats_get / chelsea_kv_seq_tokens, and the compute buffers beside them.

#include "chelsea.h"
#include "chelsea-kv.h"

#include "llama-context.h"
#include "llama-ext.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"

#include <cstring>
#include <map>
#include <vector>

namespace {

// The attention caches behind a context's memory, full-attention cache first.
std::vector<const llama_kv_cache *> attention_caches(const llama_context * ctx) {
    std::vector<const llama_kv_cache *> res;
    llama_memory_i * mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return res;
    }
    if (auto * kv = dynamic_cast<const llama_kv_cache *>(mem)) {
        res.push_back(kv);
    } else if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) {
        res.push_back(iswa->get_base());
        res.push_back(iswa->get_swa());
    } else if (auto * hybrid = dynamic_cast<const llama_memory_hybrid *>(mem)) {
        res.push_back(hybrid->get_mem_attn());
    }
    return res;
}

} // namespace

int32_t chelsea_kv_stats_get(const llama_context * ctx, chelsea_kv_stats * out) {
    if (ctx == nullptr || out == nullptr) {
        return -1;
    }
    *out = {};
    out->type_k = -1;
    out->type_v = -1;
    for (const llama_kv_cache * kv : attention_caches(ctx)) {
        if (kv == nullptr) {
            continue;
        }
        if (out->n_caches == 0) {
            out->n_stream = kv->get_n_stream();
            out->type_k   = kv->type_k();
            out->type_v   = kv->type_v();
        }
        out->n_caches     += 1;
        out->n_layers     += (int32_t) kv->get_layer_ids().size();
        out->k_bytes      += kv->chelsea_size_k_bytes();
        out->v_bytes      += kv->chelsea_size_v_bytes();
        out->buffer_bytes += kv->chelsea_total_size() + (kv->chelsea ? kv->chelsea->sizes_bytes() : 0);
        out->n_cells      += kv->get_size() * kv->get_n_stream();
        // get_cells() is indexed by sequence; visit each stream once through its first sequence
        std::vector<bool> seen(kv->get_n_stream(), false);
        for (uint32_t s = 0; s < kv->get_n_seq_max(); ++s) {
            const uint32_t strm = kv->get_stream((llama_seq_id) s);
            if (strm >= seen.size() || seen[strm]) {
                continue;
            }
            seen[strm] = true;
            const llama_kv_cells & cells = kv->get_cells((llama_seq_id) s);
            out->n_cells_used += cells.get_used();
            out->n_cells_span += cells.used_max_p1();
        }
    }
    return 0;
}

int64_t chelsea_kv_seq_tokens(const llama_context * ctx, llama_seq_id seq_id) {
    const auto caches = attention_caches(ctx);
    if (caches.empty() || caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max()) {
        return -1;
    }
    const int64_t cells = (int64_t) caches[0]->get_cells(seq_id).seq_pos_get(seq_id).size();
    return cells + (caches[0]->chelsea ? caches[0]->chelsea->seqs[seq_id].n_merged : 0);
}

uint64_t chelsea_compute_buffer_bytes(const llama_context * ctx) {
    if (ctx == nullptr) {
        return 0;
    }
    ggml_backend_sched_t sched = ctx->get_sched();
    uint64_t n = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
        n += ggml_backend_sched_get_buffer_size(sched, ggml_backend_sched_get_backend(sched, i));
    }
    return n;
}

int32_t chelsea_buffer_memory_get(const llama_context * ctx, chelsea_buffer_memory * out, int32_t n_max) {
    if (ctx == nullptr) {
        return -1;
    }
    llama_memory_breakdown mb = llama_get_memory_breakdown(ctx);
    // the cluster sizes live beside K/V, in buffers of their own that the cache's breakdown does not list
    std::map<ggml_backend_buffer_type_t, size_t> sizes;
    for (const llama_kv_cache * kv : attention_caches(ctx)) {
        if (kv != nullptr && kv->chelsea) {
            for (const auto & [_, buf] : kv->chelsea->ctxs_bufs) {
                sizes[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
            }
        }
    }
    for (const auto & [buft, n] : sizes) {
        mb[buft].context += n;
    }
    int32_t i = 0;
    for (const auto & [buft, data] : mb) {
        if (out != nullptr && i < n_max) {
            chelsea_buffer_memory & m = out[i];
            m = {};
            std::strncpy(m.name, ggml_backend_buft_name(buft), sizeof(m.name) - 1);
            m.model_bytes   = data.model;
            m.kv_bytes      = data.context;
            m.compute_bytes = data.compute;
        }
        ++i;
    }
    return i;
}
