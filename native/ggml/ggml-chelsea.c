// chelsea-gguf: graph constructors of the Chelsea ops (see native/include/ggml-chelsea.h).

#include "ggml-chelsea.h"
#include "ggml-impl.h"

struct ggml_tensor * ggml_chelsea_match(
        struct ggml_context * ctx,
        struct ggml_tensor  * k,
        int                   n_head,
        int                   c0,
        int                   n_region,
        int                   chunk) {
    GGML_ASSERT(n_head > 0 && k->ne[0] % n_head == 0);
    GGML_ASSERT((k->ne[0] / n_head) % ggml_blck_size(k->type) == 0);
    GGML_ASSERT(c0 >= 0 && n_region >= 0 && c0 + n_region <= k->ne[1]);
    GGML_ASSERT(chunk >= 2 && chunk % 2 == 0);
    GGML_ASSERT(k->ne[2] == 1 && k->ne[3] == 1);

    struct ggml_tensor * result = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_region, n_head, 2);

    const int32_t params[] = { n_head, c0, n_region, chunk };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_CHELSEA_MATCH;
    result->src[0] = k;

    return result;
}

struct ggml_tensor * ggml_chelsea_match_kv(
        struct ggml_context * ctx,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        int                   v_cells_dim,
        int                   n_head,
        int                   c0,
        int                   n_region,
        int                   chunk) {
    GGML_ASSERT(v_cells_dim == 0 || v_cells_dim == 1);
    GGML_ASSERT(v->ne[2] == 1 && v->ne[3] == 1);
    GGML_ASSERT(v->ne[v_cells_dim] == k->ne[1]);
    const int64_t n_embd_v = v->ne[1 - v_cells_dim];
    GGML_ASSERT(n_embd_v % n_head == 0);
    if (v_cells_dim == 1) {
        GGML_ASSERT((n_embd_v / n_head) % ggml_blck_size(v->type) == 0);
    } else {
        GGML_ASSERT(v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_BF16);
    }

    struct ggml_tensor * result = ggml_chelsea_match(ctx, k, n_head, c0, n_region, chunk);

    const int32_t params[] = { n_head, c0, n_region, chunk, v_cells_dim };
    ggml_set_op_params(result, params, sizeof(params));

    result->src[1] = v;

    return result;
}

struct ggml_tensor * ggml_chelsea_plan(
        struct ggml_context * ctx,
        struct ggml_tensor  * m,
        struct ggml_tensor  * s,
        int                   c0,
        int                   n_remove) {
    GGML_ASSERT(m->type == GGML_TYPE_F32 && s->type == GGML_TYPE_F32);
    GGML_ASSERT(m->ne[2] == 2 && m->ne[1] == s->ne[1]);
    GGML_ASSERT(c0 >= 0 && c0 + m->ne[0] <= s->ne[0]);
    GGML_ASSERT(n_remove >= 0 && 2*n_remove <= m->ne[0]);
    GGML_ASSERT(s->ne[2] == 1 && s->ne[3] == 1);

    struct ggml_tensor * result = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s->ne[0], s->ne[1], 3);

    const int32_t params[] = { c0, n_remove };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_CHELSEA_PLAN;
    result->src[0] = m;
    result->src[1] = s;

    return result;
}

struct ggml_tensor * ggml_chelsea_merge(
        struct ggml_context * ctx,
        struct ggml_tensor  * x,
        struct ggml_tensor  * p,
        int                   n_remove,
        int                   cells_dim) {
    GGML_ASSERT(cells_dim == 0 || cells_dim == 1);
    GGML_ASSERT(p->type == GGML_TYPE_F32 && p->ne[2] == 3);
    GGML_ASSERT(x->ne[2] == 1 && x->ne[3] == 1);

    const int64_t n_span = x->ne[cells_dim];
    const int64_t n_embd = x->ne[1 - cells_dim];
    GGML_ASSERT(p->ne[0] == n_span);
    GGML_ASSERT(n_embd % p->ne[1] == 0);
    GGML_ASSERT(n_remove >= 0 && n_remove < n_span);
    if (cells_dim == 0) {
        // along cells there are no quantization blocks to keep whole
        GGML_ASSERT(!ggml_is_quantized(x->type));
    } else {
        GGML_ASSERT((n_embd / p->ne[1]) % ggml_blck_size(x->type) == 0);
    }

    struct ggml_tensor * result = cells_dim == 1
        ? ggml_new_tensor_2d(ctx, x->type, n_embd, n_span - n_remove)
        : ggml_new_tensor_2d(ctx, x->type, n_span - n_remove, n_embd);

    const int32_t params[] = { n_remove, cells_dim };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_CHELSEA_MERGE;
    result->src[0] = x;
    result->src[1] = p;

    return result;
}
