// chelsea-gguf: chelsea_ops_run_cpu -- one pass of the Chelsea ops on caller data, to check them against
// a reference implementation (tests/test_chelsea_ops.py).

#include "chelsea.h"

#include "ggml-chelsea.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <cstring>
#include <vector>

namespace {

// stores n_rows rows of f32 data as `type`
void store_rows(ggml_tensor * t, const float * src, int64_t n_rows, int64_t n_per_row) {
    ggml_quantize_chunk(t->type, src, t->data, 0, n_rows, n_per_row, nullptr);
}

// reads the rows of a 2-D tensor back as f32
void load_rows(const ggml_tensor * t, float * dst) {
    for (int64_t r = 0; r < t->ne[1]; ++r) {
        const char * row = (const char *) t->data + r*t->nb[1];
        if (t->type == GGML_TYPE_F32) {
            memcpy(dst + r*t->ne[0], row, t->ne[0]*sizeof(float));
        } else {
            ggml_get_type_traits(t->type)->to_float(row, dst + r*t->ne[0], t->ne[0]);
        }
    }
}

void transpose(const float * src, float * dst, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
            dst[c*rows + r] = src[r*cols + c];
        }
    }
}

// reads a tensor as [cells][channels] f32, whether it stores cells as rows or (transposed) as columns
void load_cells(const ggml_tensor * t, bool transposed, float * dst) {
    if (!transposed) {
        load_rows(t, dst);
        return;
    }
    std::vector<float> rows((size_t) ggml_nelements(t));
    load_rows(t, rows.data());
    transpose(rows.data(), dst, t->ne[1], t->ne[0]);
}

} // namespace

int32_t chelsea_ops_run_cpu(
        int32_t type_k, int32_t type_v, bool v_trans, bool match_values,
        int32_t n_embd, int32_t n_head, int32_t n_span,
        int32_t c0, int32_t n_region, int32_t chunk, int32_t n_remove,
        const float * k, const float * v, const float * s,
        float * k_in, float * v_in, float * match, float * plan, float * k_out, float * v_out,
        int32_t n_threads) {
    if (type_k < 0 || type_k >= GGML_TYPE_COUNT || type_v < 0 || type_v >= GGML_TYPE_COUNT ||
        n_embd <= 0 || n_head <= 0 || n_embd % n_head != 0 || n_span <= 0 || c0 < 0 || n_region < 0 ||
        c0 + n_region > n_span || chunk < 2 || chunk % 2 != 0 || n_remove < 0 || 2*n_remove > n_region ||
        k == nullptr || v == nullptr || s == nullptr || n_threads < 1) {
        return -1;
    }
    const int64_t head_dim = n_embd / n_head;
    if (head_dim % ggml_blck_size((ggml_type) type_k) != 0 || head_dim % ggml_blck_size((ggml_type) type_v) != 0 ||
        (v_trans && ggml_is_quantized((ggml_type) type_v))) {
        return -1;
    }
    const int64_t n_out = n_span - n_remove;

    const size_t mem = 8*(size_t) n_span*n_embd*sizeof(float) + 4*(size_t) n_span*n_head*sizeof(float) + 64*ggml_tensor_overhead()
        + ggml_graph_overhead() + (1 << 20);
    ggml_init_params ip = { mem, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    if (ctx == nullptr) {
        return -1;
    }

    ggml_tensor * tk = ggml_new_tensor_2d(ctx, (ggml_type) type_k, n_embd, n_span);
    store_rows(tk, k, n_span, n_embd);

    ggml_tensor * tv;
    if (v_trans) {
        std::vector<float> vt((size_t) n_span*n_embd);
        transpose(v, vt.data(), n_span, n_embd);
        tv = ggml_new_tensor_2d(ctx, (ggml_type) type_v, n_span, n_embd);
        store_rows(tv, vt.data(), n_embd, n_span);
    } else {
        tv = ggml_new_tensor_2d(ctx, (ggml_type) type_v, n_embd, n_span);
        store_rows(tv, v, n_span, n_embd);
    }

    ggml_tensor * ts = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_span, n_head);
    memcpy(ts->data, s, ggml_nbytes(ts));

    ggml_tensor * tm  = match_values
        ? ggml_chelsea_match_kv(ctx, tk, tv, v_trans ? 0 : 1, n_head, c0, n_region, chunk)
        : ggml_chelsea_match(ctx, tk, n_head, c0, n_region, chunk);
    ggml_tensor * tp  = ggml_chelsea_plan(ctx, tm, ts, c0, n_remove);
    ggml_tensor * tko = ggml_chelsea_merge(ctx, tk, tp, n_remove, 1);
    ggml_tensor * tvo = ggml_chelsea_merge(ctx, tv, tp, n_remove, v_trans ? 0 : 1);

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, tko);
    ggml_build_forward_expand(gf, tvo);
    const ggml_status status = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
    if (status != GGML_STATUS_SUCCESS) {
        ggml_free(ctx);
        return -1;
    }

    if (k_in) {
        load_rows(tk, k_in);
    }
    if (v_in) {
        load_cells(tv, v_trans, v_in);
    }
    if (match) {
        memcpy(match, tm->data, ggml_nbytes(tm));
    }
    if (plan) {
        memcpy(plan, tp->data, ggml_nbytes(tp));
    }
    if (k_out) {
        load_rows(tko, k_out);
    }
    if (v_out) {
        load_cells(tvo, v_trans, v_out);
    }
    ggml_free(ctx);
    return 0;
}
