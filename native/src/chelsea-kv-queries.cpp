// chelsea-gguf: the last queries of a sequence's prompt chunks, kept per cache layer beside K for the attention score
// of a compression pass (params.attn_weight). A prompt's last chunk usually ends with what the user asks, and the
// compression to budget at the first generated token runs before any of it is answered: the attention those queries
// pay a cell says whether the answer needs it. The attention graph of a chunk copies its last queries into the
// window (chelsea_keep_queries); apply() of the same ubatch counts them (chelsea_note_ubatch), so that a reused graph
// and a rebuilt one keep the same books. A prompt that must be merged while it is fed can have its end read first
// (params.lookahead): chelsea_read_ahead turns those queries to where the prompt has them into a second window, which
// the room made for the prompt's chunks reads until the prompt gets there.

#include "chelsea-kv.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <map>

bool chelsea_kv_state::keeps_queries(const llama_ubatch & ubatch) const {
    // a generated token is not a question: the window keeps the prompt's, for the compressions while generating. A
    // re-read is not one either: it asks for the text back
    return !queries.empty() && params.attn_weight > 0.0f && ubatch.n_tokens > 1 && ubatch.n_seqs_unq == 1 &&
        !rereads(ubatch);
}

bool llama_kv_cache::chelsea_alloc_queries(std::string & err) {
    auto & st = *chelsea;
    if (!st.queries.empty() || st.params.attn_weight <= 0.0f) {
        return true;
    }
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;
    std::vector<ggml_tensor *> queries;
    std::vector<ggml_tensor *> lookahead;
    for (const auto & layer : layers) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = { size_t(2*layers.size() + 1)*ggml_tensor_overhead(), nullptr, true };
            it = ctx_map.emplace(buft, ggml_context_ptr(ggml_init(ip))).first;
        }
        const int64_t n_embd_q = (int64_t) hparams.n_embd_head_k(layer.il)*hparams.n_head(layer.il);
        ggml_tensor * q = ggml_new_tensor_3d(it->second.get(), GGML_TYPE_F32, n_embd_q, st.params.attn_window, n_stream);
        ggml_format_name(q, "chelsea_queries_l%d", layer.il);
        queries.push_back(q);
        if (st.params.lookahead) {
            ggml_tensor * a = ggml_dup_tensor(it->second.get(), q);
            ggml_format_name(a, "chelsea_lookahead_l%d", layer.il);
            lookahead.push_back(a);
        }
    }
    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            err = "failed to allocate the buffer of the last prompt queries (attn_weight)";
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        LLAMA_LOG_INFO("%s: %10s prompt-query buffer size = %8.2f MiB\n", __func__, ggml_backend_buffer_name(buf),
                ggml_backend_buffer_get_size(buf)/1024.0/1024.0);
        st.ctxs_bufs.emplace_back(std::move(ctx), buf);
    }
    st.queries = std::move(queries);
    st.lookahead = std::move(lookahead);
    st.queries_scale.assign(layers.size(), 1.0f);
    st.query_windows.assign(n_stream, chelsea_query_window());
    st.lookahead_windows.assign(n_stream, chelsea_query_window());
    st.read_ahead_requests.assign(n_stream, chelsea_query_window());
    return true;
}

void llama_kv_cache::chelsea_note_ubatch(const llama_ubatch & ubatch) {
    auto & st = *chelsea;
    // the read-ahead queries stand in for the prompt's end until the prompt gets there: from then on the window
    // holds that end's own queries, read with the text before it
    for (auto & la : st.lookahead_windows) {
        for (uint32_t i = 0; la.seq >= 0 && i < ubatch.n_tokens; ++i) {
            for (int32_t j = 0; j < ubatch.n_seq_id[i]; ++j) {
                if (ubatch.seq_id[i][j] == la.seq && ubatch.pos[i] >= la.pos_max) {
                    la = chelsea_query_window();
                    break;
                }
            }
        }
    }
    if (st.rereads(ubatch)) {
        chelsea_note_reread(st, ubatch);
        return;
    }
    if (!st.keeps_queries(ubatch)) {
        return;
    }
    const llama_seq_id seq_id = ubatch.seq_id_unq[0];
    auto & w = st.query_windows[seq_to_stream[seq_id]];
    if (w.seq != seq_id || ubatch.pos[0] <= w.pos_max) {
        w = chelsea_query_window();
        w.seq = seq_id;
    }
    w.rows    = std::min<uint32_t>((uint32_t) st.params.attn_window, w.rows + ubatch.n_tokens);
    w.pos_max = ubatch.pos[ubatch.n_tokens - 1];
}

void llama_kv_cache::chelsea_forget_queries(uint32_t strm) {
    auto & st = *chelsea;
    if (strm < st.query_windows.size()) {
        st.query_windows[strm] = chelsea_query_window();
        st.lookahead_windows[strm] = chelsea_query_window();
    }
}

int32_t llama_kv_cache::chelsea_read_ahead(llama_context * lctx, llama_seq_id seq_id, llama_pos pos_first) {
    auto & st = *chelsea;
    const uint32_t strm = seq_to_stream[seq_id];
    auto & la = st.lookahead_windows[strm];
    la = chelsea_query_window();
    const chelsea_query_window w = st.query_windows[strm];
    if (st.lookahead.empty() || w.seq != seq_id || w.rows == 0 || pos_first < 0) {
        return -1;
    }
    // RoPE turns by position, so queries read at other positions turn to where the prompt will have them by the
    // difference, as llama.cpp's K-shift turns keys (build_rope_shift)
    const llama_pos delta = pos_first - (w.pos_max - (llama_pos) w.rows + 1);
    const auto & cparams = lctx->get_cparams();
    const auto rope_type = hparams.rope_type == LLAMA_ROPE_TYPE_MROPE || hparams.rope_type == LLAMA_ROPE_TYPE_IMROPE
        ? LLAMA_ROPE_TYPE_NEOX : hparams.rope_type;

    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);
    llm_graph_result res(24*(int64_t) layers.size() + 16);
    ggml_context * ctx = res.get_ctx();
    ggml_cgraph  * gf  = res.get_gf();
    ggml_tensor * shift = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, w.rows);
    ggml_set_input(shift);
    // a quantized K cache holds keys, and attention reads queries, turned by a Hadamard rotation (llama.cpp's
    // attn_rot_k): RoPE applies to them turned back, as the K-shift of such a cache does (rot^2 = I)
    ggml_tensor * rot = build_input_k_rot(ctx);
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const uint32_t il = layers[ikv].il;
        ggml_tensor * src = st.queries[ikv];
        ggml_tensor * dst = st.lookahead[ikv];
        const size_t offs = strm*src->nb[2] + (src->ne[1] - w.rows)*src->nb[1];
        ggml_tensor * q = ggml_view_2d(ctx, src, src->ne[0], w.rows, src->nb[1], offs);
        if (hparams.has_rope(il)) {
            const int64_t head_dim = hparams.n_embd_head_k(il);
            if (rot) {
                q = llama_mul_mat_hadamard(ctx, q, rot);
            }
            ggml_tensor * q3 = ggml_reshape_3d(ctx, q, head_dim, src->ne[0]/head_dim, w.rows);
            q3 = ggml_rope_ext(ctx, q3, shift, model.get_rope_factors(cparams, il), hparams.n_rot(il), rope_type,
                    cparams.n_ctx_orig_yarn, model.get_rope_freq_base(cparams, il), model.get_rope_freq_scale(cparams, il),
                    cparams.yarn_ext_factor, cparams.yarn_attn_factor, cparams.yarn_beta_fast, cparams.yarn_beta_slow);
            q = ggml_reshape_2d(ctx, q3, src->ne[0], w.rows);
            if (rot) {
                q = llama_mul_mat_hadamard(ctx, q, rot);
            }
        }
        ggml_build_forward_expand(gf, ggml_cpy(ctx, q, ggml_view_2d(ctx, dst, dst->ne[0], w.rows, dst->nb[1], offs)));
    }
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        LLAMA_LOG_ERROR("%s: failed to allocate the graph that turns the read-ahead queries\n", __func__);
        return -1;
    }
    const std::vector<int32_t> shifts(w.rows, (int32_t) delta);
    ggml_backend_tensor_set(shift, shifts.data(), 0, shifts.size()*sizeof(int32_t));
    if (rot) {
        ggml_backend_tensor_set(rot, attn_rot_hadamard.at(rot->ne[0]).data(), 0, ggml_nbytes(rot));
    }
    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        LLAMA_LOG_ERROR("%s: failed to turn the read-ahead queries\n", __func__);
        return -1;
    }
    // the graph's tensors go with `res`: nothing may still be computing them
    ggml_backend_sched_synchronize(sched);
    la = { seq_id, w.rows, pos_first + (llama_pos) w.rows - 1 };
    return (int32_t) w.rows;
}

ggml_tensor * llama_kv_cache::chelsea_keep_queries(ggml_context * ctx, ggml_tensor * q, float kq_scale, int32_t il,
        const llama_ubatch & ubatch) const {
    auto & st = *chelsea; // the KQ scale is only known here
    const bool reread = st.rereads(ubatch);
    if (!reread && !st.keeps_queries(ubatch)) {
        return nullptr;
    }
    const int32_t ikv = map_layer_ids.at(il);
    ggml_tensor * window = reread ? st.reread[ikv] : st.queries[ikv];
    const int64_t n_embd_q = q->ne[0]*q->ne[1], n_tokens = q->ne[2];
    if (n_embd_q != window->ne[0]) {
        return nullptr;
    }
    (reread ? st.reread_scale : st.queries_scale)[ikv] = kq_scale;

    const int64_t n_window = window->ne[1];
    const int64_t n_new    = std::min(n_window, n_tokens);
    // a re-read's tensors hold one ubatch, from row 0, of one sequence
    const uint32_t strm    = reread ? 0 : seq_to_stream[ubatch.seq_id_unq[0]];
    ggml_tensor * q_new = ggml_view_3d(ctx, q, q->ne[0], q->ne[1], n_new, q->nb[1], q->nb[2], (n_tokens - n_new)*q->nb[2]);
    q_new = q_new->type == GGML_TYPE_F32 ? ggml_cont(ctx, q_new) : ggml_cast(ctx, q_new, GGML_TYPE_F32);
    q_new = ggml_reshape_2d(ctx, q_new, n_embd_q, n_new);
    if (reread) {
        return ggml_cpy(ctx, q_new, ggml_view_2d(ctx, window, n_embd_q, n_new, window->nb[1], 0));
    }
    if (n_new < n_window) {
        // the older queries move up by n_new rows; the concat is a copy, read before the window is written
        ggml_tensor * older = ggml_view_2d(ctx, window, n_embd_q, n_window - n_new, window->nb[1],
                strm*window->nb[2] + n_new*window->nb[1]);
        q_new = ggml_concat(ctx, older, q_new, 1);
    }
    return ggml_cpy(ctx, q_new, ggml_view_2d(ctx, window, n_embd_q, n_window, window->nb[1], strm*window->nb[2]));
}

void chelsea_queries_state_write(const chelsea_kv_state & st, llama_io_write_i & io, uint32_t strm,
        const std::vector<llama_seq_id> & seqs) {
    chelsea_query_window w;
    if (!st.queries.empty() && std::find(seqs.begin(), seqs.end(), st.query_windows[strm].seq) != seqs.end()) {
        w = st.query_windows[strm];
    }
    io.write(&w.rows, sizeof(w.rows));
    if (w.rows == 0) {
        return;
    }
    const uint32_t n_layer = st.queries.size();
    io.write(&w.seq,     sizeof(w.seq));
    io.write(&w.pos_max, sizeof(w.pos_max));
    io.write(&n_layer,   sizeof(n_layer));
    for (uint32_t il = 0; il < n_layer; ++il) {
        ggml_tensor * q = st.queries[il];
        const uint32_t n_embd_q = q->ne[0];
        io.write(&n_embd_q,            sizeof(n_embd_q));
        io.write(&st.queries_scale[il], sizeof(float));
        io.write_tensor(q, strm*q->nb[2] + (q->ne[1] - w.rows)*q->nb[1], w.rows*q->nb[1]);
    }
}

bool chelsea_queries_state_read(chelsea_kv_state & st, llama_io_read_i & io, uint32_t strm,
        const std::vector<uint32_t> & seq_to_stream, llama_seq_id dest_seq_id) {
    chelsea_query_window saved;
    io.read(&saved.rows, sizeof(saved.rows));
    if (saved.rows == 0) {
        return true;
    }
    uint32_t n_layer;
    io.read(&saved.seq,     sizeof(saved.seq));
    io.read(&saved.pos_max, sizeof(saved.pos_max));
    io.read(&n_layer,       sizeof(n_layer));
    const llama_seq_id dst = dest_seq_id >= 0 ? dest_seq_id : saved.seq;
    if (saved.rows > (uint32_t) CHELSEA_MAX_ATTN_WINDOW || dst < 0 || (size_t) dst >= seq_to_stream.size() ||
            seq_to_stream[dst] != strm || (!st.queries.empty() && n_layer != st.queries.size())) {
        LLAMA_LOG_ERROR("%s: the state's prompt queries (%u rows of sequence %d, %u layers) do not fit this cache "
                "(at most %d rows, %zu layers, stream %u)\n", __func__, saved.rows, saved.seq, n_layer,
                CHELSEA_MAX_ATTN_WINDOW, st.queries.size(), strm);
        return false;
    }
    // a window narrower than the saved one keeps the newest rows; a cache without the score reads past them
    const uint32_t n_keep = st.queries.empty() ? 0 : std::min<uint32_t>(saved.rows, st.params.attn_window);
    std::vector<float> rows;
    for (uint32_t il = 0; il < n_layer; ++il) {
        uint32_t n_embd_q;
        float scale;
        io.read(&n_embd_q, sizeof(n_embd_q));
        io.read(&scale,    sizeof(scale));
        if (!st.queries.empty() && n_embd_q != st.queries[il]->ne[0]) {
            LLAMA_LOG_ERROR("%s: the state's prompt queries of layer %u have %u values, this cache's %lld\n",
                    __func__, il, n_embd_q, (long long) st.queries[il]->ne[0]);
            return false;
        }
        rows.resize((size_t) saved.rows*n_embd_q);
        io.read(rows.data(), rows.size()*sizeof(float));
        if (n_keep > 0) {
            ggml_tensor * q = st.queries[il];
            ggml_backend_tensor_set(q, rows.data() + (size_t) (saved.rows - n_keep)*n_embd_q,
                    strm*q->nb[2] + (q->ne[1] - n_keep)*q->nb[1], n_keep*q->nb[1]);
            st.queries_scale[il] = scale;
        }
    }
    if (n_keep > 0) {
        st.query_windows[strm] = { dst, n_keep, saved.pos_max };
    }
    return true;
}
