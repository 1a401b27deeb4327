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

// Tokens that sequence seq_id's cells represent in the cache of full-attention layers
// (one per cell without clustering). Returns -1 for an invalid seq_id or a context without a KV cache.
LLAMA_API int64_t chelsea_kv_seq_tokens(const struct llama_context * ctx, llama_seq_id seq_id);

#ifdef __cplusplus
}
#endif
