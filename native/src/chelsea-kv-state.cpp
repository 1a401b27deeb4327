// chelsea-gguf: the clustering state of a llama_kv_cache: switching clustering on (what cannot be clustered, the
// cluster-size tensors beside K/V), clearing it, and putting cells back to standing for one token.

#include "chelsea-kv.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

// RPC devices answer supports_op from the op alone, as the worker's HELLO said (ggml_patches/0011); a stock worker
// would abort on the first pass. Local backends built here (CPU, CUDA, Metal) run the ops
static bool chelsea_dev_runs_ops(ggml_backend_dev_t dev) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    if (reg == nullptr || std::strncmp(ggml_backend_reg_name(reg), "RPC", 3) != 0) {
        return true;
    }
    ggml_tensor op = {};
    op.op = GGML_OP_CHELSEA_MATCH;
    return ggml_backend_dev_supports_op(dev, &op);
}

size_t chelsea_kv_state::sizes_bytes() const {
    size_t n = 0;
    for (const auto & [_, buf] : ctxs_bufs) {
        n += ggml_backend_buffer_get_size(buf.get());
    }
    return n;
}

void chelsea_kv_state::reset_all_sizes() const {
    for (size_t il = 0; il < sizes.size(); ++il) {
        const std::vector<float> ones(ggml_nelements(sizes[il]), 1.0f);
        const std::vector<float> zeros(ones.size(), 0.0f);
        ggml_backend_tensor_set(sizes[il], ones.data(), 0, ones.size()*sizeof(float));
        ggml_backend_tensor_set(log_sizes[il], zeros.data(), 0, zeros.size()*sizeof(float));
    }
}

void chelsea_kv_state::reset_cell_sizes(uint32_t strm, const std::vector<uint32_t> & idxs) const {
    for (size_t i0 = 0; i0 < idxs.size(); ) {
        size_t i1 = i0 + 1;
        while (i1 < idxs.size() && idxs[i1] == idxs[i1 - 1] + 1) {
            ++i1;
        }
        const std::vector<float> ones(i1 - i0, 1.0f);
        const std::vector<float> zeros(i1 - i0, 0.0f);
        for (size_t il = 0; il < sizes.size(); ++il) {
            ggml_tensor * t = sizes[il];
            for (int64_t h = 0; h < t->ne[1]; ++h) {
                const size_t offs = strm*t->nb[2] + h*t->nb[1] + idxs[i0]*sizeof(float);
                ggml_backend_tensor_set(t, ones.data(), offs, ones.size()*sizeof(float));
                ggml_backend_tensor_set(log_sizes[il], zeros.data(), offs, zeros.size()*sizeof(float));
            }
        }
        i0 = i1;
    }
}

void chelsea_kv_state::update_any_merged() {
    any_merged = std::any_of(seqs.begin(), seqs.end(), [](const chelsea_seq_state & q) { return q.n_merged > 0; });
}

bool llama_kv_cache::chelsea_enable(const chelsea_kv_cluster_params & params, std::string & err) {
    err = chelsea_params_problem(params);
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

    for (const auto & layer : layers) {
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(layer.k->buffer));
        if (dev != nullptr && !chelsea_dev_runs_ops(dev)) {
            err = std::string("the KV cache of layer ") + std::to_string(layer.il) + " is on " +
                ggml_backend_dev_name(dev) + " (" + ggml_backend_dev_description(dev) + "), a worker built without "
                "the Chelsea clustering ops (a stock llama.cpp rpc-server?): start chelsea-rpc-server there, or turn "
                "clustering off";
            return false;
        }
    }

    if (chelsea) {
        chelsea->params = params;
        chelsea->rng.seed(params.seed);
        return chelsea_alloc_queries(err);
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
    return chelsea_alloc_queries(err);
}

void llama_kv_cache::chelsea_clear() {
    auto & st = *chelsea;
    st.reset_all_sizes();
    for (auto & seq : st.seqs) {
        seq = chelsea_seq_state();
    }
    st.any_merged = false;
    st.rng.seed(st.params.seed);
    for (uint32_t s = 0; s < (uint32_t) st.query_windows.size(); ++s) {
        chelsea_forget_queries(s);
    }
}
