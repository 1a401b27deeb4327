// chelsea-gguf: scoring a sequence's cells by reading its text again (KVzip's signal), and the compression ranked by
// that score. A document compressed before its questions are known keeps what the attention score of its own end
// asks for, which is not what later questions ask; the model's queries while it repeats the text attend to what
// it needs to rebuild it. While a re-read lasts (chelsea_kv_cluster_reread) each prompt ubatch of the sequence copies
// its queries into tensors of their own, which the caller scores against the keys; the scores then rank one
// compression's merges (chelsea_kv_cluster_compress_ranked) through a per-cell importance that lives only for it.

#include "chelsea-kv.h"

#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-kv-cells.h"

#include <map>

bool chelsea_alloc_f32(const std::vector<ggml_backend_buffer_type_t> & bufts, const std::vector<std::array<int64_t, 3>> & shapes,
        const char * name, std::vector<ggml_tensor *> & out, std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs) {
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;
    std::vector<ggml_tensor *> tensors;
    for (size_t i = 0; i < shapes.size(); ++i) {
        auto it = ctx_map.find(bufts[i]);
        if (it == ctx_map.end()) {
            ggml_init_params ip = { (shapes.size() + 1)*ggml_tensor_overhead(), nullptr, true };
            it = ctx_map.emplace(bufts[i], ggml_context_ptr(ggml_init(ip))).first;
        }
        ggml_tensor * t = ggml_new_tensor_3d(it->second.get(), GGML_TYPE_F32, shapes[i][0], shapes[i][1], shapes[i][2]);
        ggml_format_name(t, "%s_l%zu", name, i);
        tensors.push_back(t);
    }
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> made;
    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            LLAMA_LOG_ERROR("%s: failed to allocate the %s buffer\n", __func__, name);
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        made.emplace_back(std::move(ctx), buf);
    }
    out.insert(out.end(), tensors.begin(), tensors.end());
    for (auto & cb : made) {
        bufs.push_back(std::move(cb));
    }
    return true;
}

bool chelsea_kv_state::rereads(const llama_ubatch & ubatch) const {
    return reread_window.seq >= 0 && ubatch.n_tokens > 1 && ubatch.n_seqs_unq == 1 &&
        ubatch.seq_id_unq[0] == reread_window.seq;
}

void chelsea_switch_reread(chelsea_kv_state & st, const std::vector<ggml_backend_buffer_type_t> & bufts,
        const std::vector<std::array<int64_t, 3>> & shapes) {
    const chelsea_query_window req = st.reread_request;
    st.reread.clear();
    st.reread_bufs.clear();
    st.reread_window = chelsea_query_window();
    if (req.rows > 0 && chelsea_alloc_f32(bufts, shapes, "chelsea_reread", st.reread, st.reread_bufs)) {
        st.reread_scale.assign(st.reread.size(), 1.0f);
        st.reread_window.seq = req.seq;
    }
}

void chelsea_note_reread(chelsea_kv_state & st, const llama_ubatch & ubatch) {
    st.reread_window.rows    = std::min<uint32_t>((uint32_t) st.reread.front()->ne[1], ubatch.n_tokens);
    st.reread_window.pos_max = ubatch.pos[ubatch.n_tokens - 1];
}

bool chelsea_set_importance(chelsea_kv_state & st, const llama_kv_cells & cells, uint32_t strm, llama_seq_id seq_id,
        const float * importance, int32_t n_pos, float weight) {
    chelsea_drop_importance(st);
    std::vector<ggml_backend_buffer_type_t> bufts;
    std::vector<std::array<int64_t, 3>> shapes;
    for (const ggml_tensor * s : st.sizes) {
        bufts.push_back(ggml_backend_buffer_get_type(s->buffer));
        shapes.push_back({ s->ne[0], s->ne[1], s->ne[2] });
    }
    if (!chelsea_alloc_f32(bufts, shapes, "chelsea_importance", st.importance, st.importance_bufs)) {
        return false;
    }
    // by position, so that the caller need not know where the cells are; later positions (and other sequences' cells)
    // have none
    std::vector<float> by_cell(cells.size(), 0.0f);
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && cells.seq_has(i, seq_id) && cells.pos_get(i) < n_pos) {
            by_cell[i] = importance[cells.pos_get(i)];
        }
    }
    for (ggml_tensor * t : st.importance) {
        for (int64_t h = 0; h < t->ne[1]; ++h) {
            ggml_backend_tensor_set(t, by_cell.data(), strm*t->nb[2] + h*t->nb[1], by_cell.size()*sizeof(float));
        }
    }
    st.importance_weight = weight;
    return true;
}

void chelsea_drop_importance(chelsea_kv_state & st) {
    st.importance.clear();
    st.importance_bufs.clear();
    st.importance_weight = 0.0f;
}
