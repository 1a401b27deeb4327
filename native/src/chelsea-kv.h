// chelsea-gguf: state of online KV-cache clustering, owned by a llama_kv_cache (its `chelsea` member).
#pragma once

#include "chelsea.h"

#include "ggml-cpp.h"
#include "llama.h"

#include <random>
#include <utility>
#include <vector>

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

    std::vector<chelsea_seq_state> seqs; // LLAMA_MAX_SEQ entries

    bool any_merged = false; // some cell holds a centroid: attention needs the log-size bias
    bool reserving  = false; // the compute buffers are being sized: attention graphs carry the bias as if merged

    // attention graphs add the log-size bias: something is merged, or the compute buffers are being sized for it
    bool bias_in_graph() const { return params.log_bias && (any_merged || reserving); }

    std::mt19937 rng; // params.random_pairs: the pairs' draws, from params.seed at clear()

    // the compression pass being run (llama_kv_cache::chelsea_update -> chelsea_run_pass)
    struct pass_io {
        // the sequence's cells in position order when they are not packed from cell 0 (other sequences' cells
        // between them in a unified stream): the pass gathers them and scatters the survivors back; empty: packed
        std::vector<uint32_t> cells;
        int64_t nonfinite = 0; // out: region slices (cell, KV head, layer) whose keys or values are not finite
    } pass;

    size_t sizes_bytes() const {
        size_t n = 0;
        for (const auto & [_, buf] : ctxs_bufs) {
            n += ggml_backend_buffer_get_size(buf.get());
        }
        return n;
    }
};
