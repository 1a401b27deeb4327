// chelsea-gguf: state of online KV-cache clustering, owned by a llama_kv_cache (its `chelsea` member).
//
// The cache integration is split by job, one file each:
//   chelsea-kv-params.cpp  the parameters: defaults, their rules, a sequence's budget
//   chelsea-kv-sizes.cpp   the cluster-size tensors beside K/V, and what resets them
//   chelsea-kv-hooks.cpp   llama_kv_cache hooks: enable, clear, seq_rm/cp/keep/add/div, the attention bias
//   chelsea-kv-pass.cpp    compression: when it is due, the passes over a sequence, each pass's graph
//   chelsea-kv-queries.cpp the last prompt queries a pass's attention score reads (params.attn_weight)
//   chelsea-kv-reread.cpp  a re-read's queries, and the importance a ranked compression merges by
//   chelsea-kv-io.cpp      state save/load of cluster sizes and merge bookkeeping
//   chelsea-kv-api.cpp     the C API of chelsea.h for clustering
#pragma once

#include "chelsea.h"

#include "ggml-cpp.h"
#include "llama.h"

#include <array>
#include <random>
#include <string>
#include <utility>
#include <vector>

struct llama_ubatch;

struct chelsea_seq_state {
    int64_t   n_merged       = 0;  // cells removed by merging: tokens represented = cells + n_merged
    llama_pos pos_merged_min = -1; // positions covered by merged cells (the compressed region)
    llama_pos pos_merged_max = -1;
    int32_t   passes         = 0;
    int32_t   compressions   = 0;
    double    t_ms           = 0.0;
    int64_t   nonfinite      = 0;  // (cell, KV head, layer) slices with NaN/Inf keys or values that passes found
    uint32_t  keep           = 0;     // that compression stops at this many cells (room for a prompt chunk); 0: budget
    bool      pending        = false; // compress at the next update()
    bool      forced         = false; // compress even if the interval is not reached

    // positions [p0, p1) reach into the merged cells
    bool merged_in(llama_pos p0, llama_pos p1) const {
        return n_merged > 0 && p1 > pos_merged_min && p0 <= pos_merged_max;
    }
    // positions [p0, p1) hold every merged cell
    bool merged_within(llama_pos p0, llama_pos p1) const {
        return p0 <= pos_merged_min && p1 > pos_merged_max;
    }
};

// the most prompt queries kept per sequence for the attention score: a pass multiplies every cell's key by each of
// them, in every layer
static constexpr int32_t CHELSEA_MAX_ATTN_WINDOW = 512;

// the last queries of a stream's prompt chunks that the tensors of chelsea_kv_state::queries hold: the newest `rows`
// rows, at the end, all from sequence seq
struct chelsea_query_window {
    llama_seq_id seq     = -1;
    uint32_t     rows    = 0;
    llama_pos    pos_max = -1; // of the newest; a chunk at or below it (a rewind) starts the window again
};

struct chelsea_kv_state {
    chelsea_kv_cluster_params params;

    // per cache layer (order of llama_kv_cache::layers): f32 [kv_size, n_head_kv, n_stream], 1 for a plain token
    std::vector<ggml_tensor *> sizes;
    // log(sizes), kept beside them (updated where they change): the attention bias reads it directly, with no
    // per-layer, per-token log and copy
    std::vector<ggml_tensor *> log_sizes;
    // when every layer's sizes share a buffer type and a head count: the log sizes above are views of this
    // f32 [kv_size, n_head_kv, n_stream, n_layer], which a decoding graph adds to every layer's mask in one op
    ggml_tensor * log_sizes_all = nullptr;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;

    // params.attn_weight: per cache layer, the last params.attn_window queries of each stream's prompt chunks, f32
    // [n_embd_head_k*n_head, attn_window, n_stream] beside the layer's K, newest last (empty while attn_weight is 0)
    std::vector<ggml_tensor *> queries;
    std::vector<float> queries_scale;                 // per cache layer: the KQ scale attention used them with
    std::vector<chelsea_query_window> query_windows;  // per stream
    // params.lookahead: the same for the queries of a prompt's end read ahead of the prompt, rotated to their
    // positions in it (chelsea_kv_cluster_read_ahead); a window's pos_max is the last of those positions
    std::vector<ggml_tensor *> lookahead;
    std::vector<chelsea_query_window> lookahead_windows; // per stream
    // per stream: the sequence whose window update() turns into its read-ahead queries, to stand from position pos_max
    // on (chelsea_kv_cluster_read_ahead); seq -1: none
    std::vector<chelsea_query_window> read_ahead_requests;
    bool state_has_queries = false; // the state being read carries each stream's queries (llama_kv_cache::state_read)

    // chelsea_kv_cluster_reread: while a sequence's text is read again to score its cells, per cache layer the queries
    // of its last prompt ubatch (its newest reread_window.rows, from row 0), f32 [n_embd_head_k*n_head, rows], in
    // place of the attention window. Allocated and freed in update() (reread_request), where llama.cpp then rebuilds
    // the decoding graphs that copy into them
    std::vector<ggml_tensor *> reread;
    std::vector<float> reread_scale;         // per cache layer: the KQ scale attention used them with
    chelsea_query_window reread_window;      // seq -1: no re-read
    chelsea_query_window reread_request;     // seq >= 0: update() starts a re-read of `rows` rows, or stops one (0)
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> reread_bufs;
    // chelsea_kv_cluster_compress_ranked: for that call, per cache layer an importance per cell and KV head, f32
    // [kv_size, n_head_kv, n_stream], which ranks merges in place of the attention score (empty: none)
    std::vector<ggml_tensor *> importance;
    float importance_weight = 0.0f;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> importance_bufs;

    std::vector<chelsea_seq_state> seqs; // LLAMA_MAX_SEQ entries

    bool any_merged = false; // some cell holds a centroid: attention needs the log-size bias
    bool reserving  = false; // the compute buffers are being sized: attention graphs carry the bias as if merged
    // update() runs for an API call, between batches: the batch llama_context still holds is the last one decoded,
    // which no scheduling may make room for
    bool between_batches = false;

    // attention graphs add the log-size bias: something is merged, or the compute buffers are being sized for it
    bool bias_in_graph() const { return params.log_bias && (any_merged || reserving); }

    std::mt19937 rng; // params.random_pairs: the pairs' draws, from params.seed at clear()

    // a prompt chunk's queries go into `queries`: one sequence's chunk of more than one token, attn_weight on
    bool keeps_queries(const llama_ubatch & ubatch) const;
    // a prompt chunk's queries go into `reread` instead: a chunk of more than one token of the re-read sequence
    bool rereads(const llama_ubatch & ubatch) const;

    size_t sizes_bytes() const;

    // every cell of every stream back to standing for one token
    void reset_all_sizes() const;
    // cells idxs (increasing) of stream strm back to standing for one token
    void reset_cell_sizes(uint32_t strm, const std::vector<uint32_t> & idxs) const;
    // any_merged from the sequences' bookkeeping
    void update_any_merged();
};

// One compression pass over one sequence: the inputs of llama_kv_cache::chelsea_run_pass.
struct chelsea_pass {
    uint32_t strm;     // the stream of the sequence
    // the sequence's cells in position order when they are not packed from cell 0 (other sequences' cells between
    // them in a unified stream): the pass gathers them and scatters the survivors back; empty: packed in [0, n)
    std::vector<uint32_t> cells;
    uint32_t n;        // cells of the sequence
    uint32_t c0;       // first cell of the mergeable region (after the sinks and shared cells)
    uint32_t n_region; // cells of the mergeable region
    uint32_t n_remove; // cells the pass removes
    uint32_t q_rows;   // the sequence's last prompt queries the attention score reads (0: none)
    bool q_lookahead;  // those queries are the read-ahead ones (chelsea_kv_state::lookahead)
    uint32_t attn_top; // cells per KV head that keep their attention score, those it attends most (0: all)
};

// "" if params follow the rules, else a message that starts with the offending field's name ("chunk: ...")
std::string chelsea_params_problem(const chelsea_kv_cluster_params & params);

// cells a sequence of `tokens` tokens may be compressed to: its budget, never below what is protected
uint32_t chelsea_target_cells(const chelsea_kv_cluster_params & params, int64_t tokens);

// the newest cells a compression that keeps `kept` cells, the first n_protected of them sinks, leaves exact
uint32_t chelsea_recent_cells(const chelsea_kv_cluster_params & params, uint32_t kept, uint32_t n_protected);

// one f32 tensor per shape, shapes[i] in a buffer of type bufts[i], named `name`_l<i>; appended to `out`, their buffers
// to `bufs`. False, with nothing appended, if a buffer cannot be allocated
bool chelsea_alloc_f32(const std::vector<ggml_backend_buffer_type_t> & bufts, const std::vector<std::array<int64_t, 3>> & shapes,
        const char * name, std::vector<ggml_tensor *> & out, std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs);

class llama_kv_cells;

// update() starts or stops the re-read reread_request asks for: tensors of the given shapes per cache layer, on
// bufts (chelsea-kv-reread.cpp)
void chelsea_switch_reread(chelsea_kv_state & st, const std::vector<ggml_backend_buffer_type_t> & bufts,
        const std::vector<std::array<int64_t, 3>> & shapes);
// apply() of a re-read's ubatch: its queries are the ones `reread` holds
void chelsea_note_reread(chelsea_kv_state & st, const llama_ubatch & ubatch);
// the importance of chelsea_kv_cluster_compress_ranked, by position, onto seq_id's cells of stream strm; false if it
// cannot be allocated
bool chelsea_set_importance(chelsea_kv_state & st, const llama_kv_cells & cells, uint32_t strm, llama_seq_id seq_id,
        const float * importance, int32_t n_pos, float weight);
void chelsea_drop_importance(chelsea_kv_state & st);

class llama_io_write_i;
class llama_io_read_i;

// a state's part of stream strm ends with the stream's last prompt queries when they belong to one of the saved
// sequences seqs: a loaded state then compresses as the live one would
void chelsea_queries_state_write(const chelsea_kv_state & st, llama_io_write_i & io, uint32_t strm,
        const std::vector<llama_seq_id> & seqs);
// reads what chelsea_queries_state_write wrote into the (emptied) window of stream strm (into dest_seq_id, if >= 0);
// a cache without the queries (attn_weight 0) skips them; false (logged) if the state does not fit this cache
bool chelsea_queries_state_read(chelsea_kv_state & st, llama_io_read_i & io, uint32_t strm,
        const std::vector<uint32_t> & seq_to_stream, llama_seq_id dest_seq_id);
