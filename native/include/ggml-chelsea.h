// chelsea-gguf: the Chelsea KV-cache clustering ops (match, plan, merge).
//
// One compression pass over one layer of a KV cache is
//     m = ggml_chelsea_match(ctx, k, n_head, c0, n_region, chunk);   // who is similar to whom
//         (or ggml_chelsea_match_kv(ctx, k, v, v_cells_dim, ...): by keys and values)
//     p = ggml_chelsea_plan (ctx, m, s, c0, n_remove);               // which merges, where cells go
//     k' = ggml_chelsea_merge(ctx, k, p, n_remove, 1);               // size-weighted centroids, packed low
//     v' = ggml_chelsea_merge(ctx, v, p, n_remove, 1 or 0);
// after which the caller copies k', v' and the new sizes (p[.., .., 2]) back into the cache.
// Every head removes exactly n_remove cells, so all heads keep the same number of cells.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// below any cosine similarity: "no candidate"
#define GGML_CHELSEA_NO_SCORE (-2.0f)
// below that: the cell's key or value slice holds NaN or Inf (counted by the caller, merged last if at all)
#define GGML_CHELSEA_NONFINITE (-3.0f)

// k: [n_embd, n_span], cells along ne1 (a strided view is fine), any type with a to_float.
// The region [c0, c0 + n_region) is cut into chunks of `chunk` cells; inside a chunk, cells at odd offsets
// (set A) pick the cell at an even offset (set B) whose key has the highest cosine similarity, per head
// (head h owns elements [h*n_embd/n_head, (h+1)*n_embd/n_head) of a row).
// result: f32 [n_region, n_head, 2]; [i, h, 0] = best score of A cell i (GGML_CHELSEA_NO_SCORE for B cells,
//         and for A cells whose keys compare to nothing), or GGML_CHELSEA_NONFINITE for any cell, A or B, whose
//         slice holds NaN or Inf; [i, h, 1] = index of that B cell relative to c0 (-1 for B cells). All values
//         are finite.
GGML_API struct ggml_tensor * ggml_chelsea_match(
        struct ggml_context * ctx,
        struct ggml_tensor  * k,
        int                   n_head,
        int                   c0,
        int                   n_region,
        int                   chunk);

// As ggml_chelsea_match, scoring a pair by its keys and its values: 1 - (1 - cos k)(1 - cos v)/2, in [-1, 1].
// Merging two cells into their mean changes attention output by about (p_a - p_b)(v_a - v_b)/2, so a pair is
// cheap when either the keys (hence the weights p) or the values agree; tokens with alike keys but different
// values (the digits of a number) are kept apart. v: [n_embd_v, n_span] (v_cells_dim = 1) or llama.cpp's
// transposed [n_span, n_embd_v] (v_cells_dim = 0, F32/F16/BF16 only); head h owns elements
// [h*n_embd_v/n_head, (h+1)*n_embd_v/n_head). A non-finite value, like a non-finite key, marks the cell.
GGML_API struct ggml_tensor * ggml_chelsea_match_kv(
        struct ggml_context * ctx,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        int                   v_cells_dim,
        int                   n_head,
        int                   c0,
        int                   n_region,
        int                   chunk);

// m: a ggml_chelsea_match result; s: f32 [n_span, n_head] cluster sizes (cells along ne0, strided view ok).
// Per head, the n_remove A cells with the best scores merge into their B cell (ties: lower index first).
// result: f32 [n_span, n_head, 3]; for source cell i of head h:
//   [i, h, 0] = the cell it lands in after packing survivors to the lowest indices (order kept),
//   [i, h, 1] = its weight in that cell's centroid (s_i / sum of the sizes landing there),
//   [i, h, 2] = the new size of cell i (1 for the n_remove cells freed at the end).
GGML_API struct ggml_tensor * ggml_chelsea_plan(
        struct ggml_context * ctx,
        struct ggml_tensor  * m,
        struct ggml_tensor  * s,
        int                   c0,
        int                   n_remove);

// x: [n_embd, n_span] with cells along ne1 (cells_dim = 1: K, or V with flash attention), or
//    [n_span, n_embd] with cells along ne0 (cells_dim = 0: llama.cpp's transposed V).
// p: a ggml_chelsea_plan result. Quantized x is dequantized, merged in f32 and quantized again.
// result: same type as x, contiguous, n_span - n_remove cells: each one the weighted mean of its sources.
GGML_API struct ggml_tensor * ggml_chelsea_merge(
        struct ggml_context * ctx,
        struct ggml_tensor  * x,
        struct ggml_tensor  * p,
        int                   n_remove,
        int                   cells_dim);

#ifdef __cplusplus
}
#endif
