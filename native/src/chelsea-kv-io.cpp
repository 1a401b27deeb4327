// chelsea-gguf: state save/load of a clustered cache. After each stream's K/V data a saved state carries the cluster
// sizes of the saved cells and the merge bookkeeping of the saved sequences; the tag on n_stream makes a cache
// without clustering refuse such a state instead of misreading it.

#include "chelsea-kv.h"

#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"

#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

// high bit of the saved n_stream: a stock reader fails with "n_stream mismatch" instead of misreading
static constexpr uint32_t CHELSEA_STATE_TAG = 1u << 31;
// the next bit: each stream's part ends with its last prompt queries (chelsea_queries_state_write); a reader that
// predates them fails with "n_stream mismatch", and states saved before them load without queries
static constexpr uint32_t CHELSEA_STATE_QUERIES = 1u << 30;

uint32_t llama_kv_cache::chelsea_state_tag() const {
    return chelsea ? CHELSEA_STATE_TAG | CHELSEA_STATE_QUERIES : 0;
}

bool llama_kv_cache::chelsea_state_untag(uint32_t & n_stream_io) const {
    if (chelsea) {
        chelsea->state_has_queries = (n_stream_io & CHELSEA_STATE_TAG) && (n_stream_io & CHELSEA_STATE_QUERIES);
    }
    if ((n_stream_io & CHELSEA_STATE_TAG) == 0) {
        return false;
    }
    n_stream_io &= ~(CHELSEA_STATE_TAG | CHELSEA_STATE_QUERIES);
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
// then the merge bookkeeping of the saved sequences, then the stream's last prompt queries if a saved sequence's
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
    chelsea_queries_state_write(st, io, cr.strm, seqs);
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

    std::vector<float> sizes;
    for (size_t il = 0; il < st.sizes.size(); ++il) {
        ggml_tensor * s = st.sizes[il];
        uint32_t n_head;
        io.read(&n_head, sizeof(n_head));
        if (n_head != s->ne[1]) {
            LLAMA_LOG_ERROR("%s: the state has cluster sizes for %u KV heads, this cache has %lld\n", __func__, n_head, (long long) s->ne[1]);
            return false;
        }
        for (uint32_t h = 0; h < n_head; ++h) {
            for (const auto & [first, count] : runs) {
                // read now, not with read_tensor: the buffer reader defers those copies to its destruction, and the
                // log sizes (the attention bias) are taken from these values
                sizes.resize(count);
                io.read(sizes.data(), count*sizeof(float));
                const size_t offs = strm*s->nb[2] + h*s->nb[1] + first*sizeof(float);
                ggml_backend_tensor_set(s, sizes.data(), offs, count*sizeof(float));
                for (float & x : sizes) {
                    x = std::log(x);
                }
                ggml_backend_tensor_set(st.log_sizes[il], sizes.data(), offs, count*sizeof(float));
            }
        }
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
    st.update_any_merged();
    // the stream's window becomes the state's; a state saved before states carried one has none
    chelsea_forget_queries(strm);
    return !st.state_has_queries || chelsea_queries_state_read(st, io, strm, seq_to_stream, dest_seq_id);
}
