// chelsea-gguf: C API added to libllama by this project.
// Only new functions and new structs of our own; no llama.h struct changes layout.
#pragma once

#include "llama.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// KV-cache statistics of a context, read from the cache itself.
// For models with several attention caches (e.g. sliding-window + full), the numbers are summed.
struct chelsea_kv_stats {
    int32_t  n_caches;      // attention caches in the context (0: the model has no KV cache)
    int32_t  n_layers;      // layers that own K/V tensors, summed over caches
    uint32_t n_stream;      // KV streams of the first cache (1 unless n_seq_max > 1 and not unified)
    uint32_t n_cells;       // physical cells, all streams and caches
    uint32_t n_cells_used;  // cells that hold a token (or, once clustered, a centroid)
    uint32_t n_cells_span;  // cells attended per step: highest used cell + 1, summed over streams and caches
    uint64_t k_bytes;       // bytes of the K tensors
    uint64_t v_bytes;       // bytes of the V tensors
    uint64_t buffer_bytes;  // bytes of the backend buffers actually allocated for K and V
    int32_t  type_k;        // enum ggml_type of K
    int32_t  type_v;        // enum ggml_type of V
};

// Fills *out. Returns 0 on success, -1 if ctx or out is NULL.
LLAMA_API int32_t chelsea_kv_stats_get(const struct llama_context * ctx, struct chelsea_kv_stats * out);

// Bytes of the compute buffers the context holds now (activations, attention masks, a batch's logits), summed
// over backends: with the KV cache and the model's weights, what a context allocates. Returns 0 for a NULL ctx.
LLAMA_API uint64_t chelsea_compute_buffer_bytes(const struct llama_context * ctx);

// What a context allocates on one buffer type (a device's memory, or the host's): the model's weights, its KV cache
// with the cluster sizes, its compute buffers. With RPC workers, one entry per worker device ("RPC0[host:port]").
struct chelsea_buffer_memory {
    char     name[128];     // the buffer type's name, cut to fit
    uint64_t model_bytes;
    uint64_t kv_bytes;
    uint64_t compute_bytes;
};
// Fills out[0 .. min(n_max, count)) and returns the count of buffer types, or -1 for a NULL ctx.
LLAMA_API int32_t chelsea_buffer_memory_get(
        const struct llama_context * ctx,
        struct chelsea_buffer_memory * out,
        int32_t n_max);

// Tokens that sequence seq_id's cells represent in the cache of full-attention layers
// (one per cell without clustering). Returns -1 for an invalid seq_id or a context without a KV cache.
LLAMA_API int64_t chelsea_kv_seq_tokens(const struct llama_context * ctx, llama_seq_id seq_id);

//
// Online KV-cache clustering (Chelsea)
//

struct chelsea_kv_cluster_params {
    float   ratio;        // R: cells kept per token seen, 0 < R <= 1 (0.2 keeps 20%)
    int32_t chunk;        // C: cells per matching chunk, even, >= 2
    int32_t n_sink;       // first cells of a sequence that are never merged
    int32_t n_recent;     // last cells of a sequence that are never merged
    float   recent_share; // in [0, 1): a compression also leaves this share of the cells it keeps as the newest,
                          // exact: its recent window is max(n_recent, recent_share x cells kept); 0: n_recent alone
    int32_t interval;     // g: compress once a sequence holds more than budget + g cells
    int32_t max_passes;   // passes per compression
    float   pass_fraction; // share of a pass's candidate (A) cells it may merge, in (0, 1]: below 1, a pass
                           // merges only the most similar pairs and leaves distinct tokens for later
    bool    log_bias;     // add log(cluster size) to attention logits (proportional attention)
    bool    match_values; // score a pair by keys and values, 1 - (1 - cos k)(1 - cos v)/2 (default); false: by
                          // the cosine of the keys alone, as the paper does (see ggml_chelsea_match_kv)
    bool    random_pairs; // a baseline for benchmarks, not for use: each pass merges A cells into B cells of the
                          // same chunk chosen at random (from `seed`) instead of by key similarity; sizes,
                          // weighted means and the bias stay as with the real matching
    uint32_t seed;        // of random_pairs
    float   distinct_weight; // >= 0: a pair's score is lowered by this times the distinctiveness of its more
                             // distinctive cell, (1 - cos(key, the head's mean key))/2 (KeyDiff's signal), so cells
                             // whose keys stand out (a number, a name) merge last; 0: off
    float   size_weight;     // in -100 .. 100. > 0: a pair's score is lowered by this times tanh(log size) of its A
                             // cell, so merges spread over the sequence instead of growing the oldest centroids.
                             // < 0: raised by -this times tanh(log size) of the larger cell of the pair, so merges
                             // gather into clusters that are already large and more cells stay exact; 0: off
    float   value_weight;    // >= 0: a pair's score is lowered by this times (1 - cos(value of A, value of B))/2, so
                             // cells whose keys look alike but whose values differ (the digits of a number) merge
                             // later; 0: off
    float   attn_weight;     // >= 0: a pair's score is lowered by this times tanh(a/4) of its more attended cell, where
                             // a is the attention the sequence's last prompt queries (a prompt's question) pay the
                             // cell, as a multiple of a uniform share of the mergeable region (SnapKV's signal, read
                             // when the cache is compressed); default 0.25; 0: off, and no queries are kept
    int32_t attn_window;     // the last queries of a sequence's prompt chunks kept for attn_weight, 1 .. 512
    bool    lookahead;       // with attn_weight: keep a second window for the queries of a prompt's end read ahead of
                             // the prompt (chelsea_kv_cluster_read_ahead), which the room made for the prompt's chunks
                             // reads while the prompt is fed; default true
    float   attn_top;        // in [0, 1]: when the prompt's own last queries score a pass (not the read-ahead ones),
                             // only the attn_top x R x (the pass's mergeable cells) cells each head attends most keep
                             // their attention score, about attn_top of what a compression to budget keeps there. A
                             // document's own end pays tens of uniform shares to many spans, and scoring them all
                             // would keep them in place of the distinctive cells later questions need; 0 (the
                             // default): every cell keeps its score. 0.1 lost needles asked in the prompt (SmolLM2
                             // 1 to 4 of 63, Gemma-3-270M 5), so the cut is opt-in
};

LLAMA_API struct chelsea_kv_cluster_params chelsea_kv_cluster_default_params(void);

// Checks params without a context (the rules chelsea_kv_cluster_enable applies). Returns 0, or -1 with a message
// in err (if not NULL) that starts with the name of the offending field, "max_passes: 65 is out of range (1 .. 64)".
LLAMA_API int32_t chelsea_kv_cluster_params_check(
        const struct chelsea_kv_cluster_params * params,
        char * err,
        size_t err_len);

// Enables clustering on the context's attention cache (for sliding-window models: the full-attention
// layers only). Returns 0, or -1 with a message naming the problem in err (if not NULL).
LLAMA_API int32_t chelsea_kv_cluster_enable(
        struct llama_context * ctx,
        const struct chelsea_kv_cluster_params * params,
        char * err,
        size_t err_len);

// Compresses sequence seq_id down to its budget now. Returns the number of cells removed (0 when
// nothing is due or the cells cannot be clustered), or -1 if clustering is not enabled.
LLAMA_API int32_t chelsea_kv_cluster_compress(struct llama_context * ctx, llama_seq_id seq_id);

// With attn_weight and lookahead on: the queries of the chunk just decoded into seq_id, the last tokens of a prompt
// read ahead of the rest of it, are rotated to stand at positions [pos_first, pos_first + rows) and kept apart. The
// room made for the prompt's chunks while they are fed then keeps what the prompt's end asks for, as the compression
// to budget after the prompt does. The caller removes the chunk's cells (llama_memory_seq_rm) and feeds the prompt.
// The queries are dropped once the sequence reaches pos_first + rows - 1, at a clear or state load, or with
// pos_first = -1. Returns the rows kept, 0 when dropped, -1 if there is nothing to keep (clustering, attn_weight or
// lookahead off, or the window holds no queries of seq_id).
LLAMA_API int32_t chelsea_kv_cluster_read_ahead(struct llama_context * ctx, llama_seq_id seq_id, llama_pos pos_first);

struct chelsea_kv_cluster_seq_stats {
    int64_t   tokens;     // tokens the sequence's cells represent
    int32_t   cells;      // cells the sequence holds
    int32_t   passes;     // compression passes run on it
    int32_t   compressions; // compressions (one or more passes each)
    double    t_ms;       // wall time spent compressing it
    llama_pos pos_merged_min; // positions covered by merged cells, -1 if none
    llama_pos pos_merged_max;
    int64_t   nonfinite;  // (cell, KV head, layer) slices with NaN/Inf keys or values that passes found: the
                          // model produced them; they are merged last, never spread into a finite cell by choice
};

// Returns 0, or -1 if clustering is not enabled or seq_id is out of range.
LLAMA_API int32_t chelsea_kv_cluster_seq_stats_get(
        const struct llama_context * ctx,
        llama_seq_id seq_id,
        struct chelsea_kv_cluster_seq_stats * out);

// Inspection, for tests and tools: positions of the cells of seq_id's stream in cell order (-1: empty
// or another sequence's cell), up to n_max; returns the number of cells of the stream.
LLAMA_API int32_t chelsea_kv_cluster_cell_positions(
        const struct llama_context * ctx,
        llama_seq_id seq_id,
        llama_pos * out,
        int32_t n_max);

// Scoring cells by reading the text again (KVzip's signal). With n_rows > 0 (at most n_ubatch), every later prompt
// ubatch of seq_id keeps its last n_rows queries per cache layer for chelsea_kv_cluster_reread_queries, and not in
// the attention window of attn_weight; 0 stops that and frees them. One sequence at a time. Returns 0, or -1.
LLAMA_API int32_t chelsea_kv_cluster_reread(struct llama_context * ctx, llama_seq_id seq_id, int32_t n_rows);

// The queries the last re-read ubatch of seq_id kept in cache layer `layer` (0-based among layers with K/V), as
// out[r*n_embd_q + j] for row r (oldest first), copied when they fit in n_max floats; *n_embd_q and *kq_scale (the
// scale attention multiplied their dot products with keys by) are set when not NULL. Returns the rows, or -1.
LLAMA_API int32_t chelsea_kv_cluster_reread_queries(
        const struct llama_context * ctx,
        llama_seq_id seq_id,
        int32_t layer,
        float * out,
        int32_t n_max,
        int32_t * n_embd_q,
        float * kq_scale);

// Compresses seq_id to its budget now, as chelsea_kv_cluster_compress, with merges ranked by an importance per
// position: importance[p] in [0, 1] for the token at position p < n_pos (cells of later positions have 0), the
// same in every layer and KV head. A pair's score is lowered by weight x the larger importance of its two cells, in
// place of the attention score of attn_weight; a merged cell has its cells' size-weighted mean for the passes
// after. Returns the cells removed, or -1 (bad arguments, or no memory for the importance).
LLAMA_API int32_t chelsea_kv_cluster_compress_ranked(
        struct llama_context * ctx,
        llama_seq_id seq_id,
        const float * importance,
        int32_t n_pos,
        float weight);

// Inspection: cluster sizes of cache layer `layer` (0-based among layers with K/V), stream of seq_id,
// as out[h*n_cells + c] for KV head h and cell c < n_cells. Returns n_head_kv, or -1.
LLAMA_API int32_t chelsea_kv_cluster_sizes(
        const struct llama_context * ctx,
        llama_seq_id seq_id,
        int32_t layer,
        float * out,
        int32_t n_cells);

// Inspection, for benchmarks and tools: the keys of cache layer `layer` (0-based among layers with K/V), stream of
// seq_id, cells [0, n_cells), dequantized to f32 as out[c*n_embd_k + j]. With or without clustering (for
// sliding-window models: the full-attention cache). Returns n_embd_k (the width of a key row), or -1.
LLAMA_API int32_t chelsea_kv_keys(
        const struct llama_context * ctx,
        llama_seq_id seq_id,
        int32_t layer,
        float * out,
        int32_t n_cells);

// Inspection, for tests and tools: the prompt queries that attn_weight keeps for seq_id in cache layer `layer` (0-based
// among layers with K/V), the last ones of its prompt chunks or (read_ahead) those chelsea_kv_cluster_read_ahead kept,
// as out[r*n_embd_q + j] for row r (oldest first), copied when they fit in n_max floats. Sets *n_embd_q (if not NULL)
// and returns the rows (0: none kept for seq_id), or -1.
LLAMA_API int32_t chelsea_kv_cluster_queries(
        const struct llama_context * ctx,
        llama_seq_id seq_id,
        int32_t layer,
        bool read_ahead,
        float * out,
        int32_t n_max,
        int32_t * n_embd_q);

// Runs one pass of the Chelsea ops (match or, with match_values, match by keys and values; plan, merge) on
// the CPU backend over caller data, for checking the ops against a reference. k: [n_span][n_embd] f32, stored as type_k before the pass;
// v: [n_span][n_embd] f32 stored as type_v (transposed when v_trans); s: [n_head][n_span] sizes.
// Outputs (any may be NULL): k_in/v_in the stored inputs read back as f32; match [2][n_head][n_region];
// plan [3][n_head][n_span]; k_out/v_out [n_span - n_remove][n_embd] f32. Returns 0, or -1 on bad input.
LLAMA_API int32_t chelsea_ops_run_cpu(
        int32_t type_k, int32_t type_v, bool v_trans, bool match_values,
        int32_t n_embd, int32_t n_head, int32_t n_span,
        int32_t c0, int32_t n_region, int32_t chunk, int32_t n_remove,
        const float * k, const float * v, const float * s,
        float * k_in, float * v_in, float * match, float * plan, float * k_out, float * v_out,
        int32_t n_threads);

#ifdef __cplusplus
}
#endif
