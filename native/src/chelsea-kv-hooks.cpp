// chelsea-gguf: the llama_kv_cache operations that meet merged cells (seq_add/seq_div, seq_cp, seq_keep, seq_rm),
// and the log(cluster size) bias attention reads. Each either keeps the merge bookkeeping exact or refuses and
// changes nothing.

#include "chelsea-kv.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"

#include <limits>
#include <vector>

bool llama_kv_cache::chelsea_seq_move(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift, int d) {
    auto & seq = chelsea->seqs[seq_id];
    if (!seq.merged_in(p0, p1)) {
        return true;
    }
    // a uniform shift of the whole merged region rotates every member of a centroid alike: exact. Anything else
    // (a part of the region, a division, a shift below position 0 that would drop cells) is not
    if (d != 1 || !seq.merged_within(p0, p1) || seq.pos_merged_min + shift < 0) {
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
        st.update_any_merged();
        return true;
    }
    p0 = p0 < 0 ? 0 : p0;
    p1 = p1 < 0 ? std::numeric_limits<llama_pos>::max() : p1;
    if (!src.merged_in(p0, p1)) {
        return true;
    }
    // dst shares the merged cells: it must take all of them, and have none of its own to account for
    if (!src.merged_within(p0, p1) || dst.n_merged > 0) {
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
    st.reset_cell_sizes(strm, freed);
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        if ((llama_seq_id) s != seq_id && seq_to_stream[s] == strm) {
            st.seqs[s] = chelsea_seq_state();
        }
    }
    st.update_any_merged();
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
        if (!seq.merged_in(p0, p1)) {
            continue;
        }
        if (!seq.merged_within(p0, p1)) {
            LLAMA_LOG_DEBUG("%s: seq %d: refusing to remove [%d, %d): it cuts through merged cells [%d, %d]\n",
                    __func__, s, p0, p1, seq.pos_merged_min, seq.pos_merged_max);
            return false;
        }
        frees_merged = true;
    }
    if (!frees_merged) {
        return true;
    }
    // every merged cell of these sequences goes: the cells removal frees (not those another sequence shares)
    // become plain tokens again
    for (llama_seq_id s : seqs) {
        auto & seq = st.seqs[s];
        if (!seq.merged_in(p0, p1)) {
            continue;
        }
        const uint32_t strm = seq_to_stream[s];
        const auto & cells = v_cells[strm];
        std::vector<uint32_t> freed;
        for (uint32_t i = 0; i < cells.size(); ++i) {
            if (!cells.is_empty(i) && cells.pos_in(i, p0, p1) && cells.seq_has(i, s) &&
                (seq_id < 0 || cells.seq_count(i) == 1)) {
                freed.push_back(i);
            }
        }
        st.reset_cell_sizes(strm, freed);
        seq.n_merged = 0;
        seq.pos_merged_min = seq.pos_merged_max = -1;
    }
    st.update_any_merged();
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
