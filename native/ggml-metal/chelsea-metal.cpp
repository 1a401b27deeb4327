// chelsea-gguf: encoding of the Chelsea KV-clustering ops on the Metal backend. The kernels are in chelsea.metal;
// the CUDA version (native/ggml-cuda/chelsea.cu) has the same steps.

#include "chelsea-metal.h"

#include "ggml-chelsea.h"
#include "ggml-impl.h"
#include "ggml-backend-impl.h"
#include "ggml-metal-impl.h"

#include <algorithm>

static ggml_metal_buffer_id chelsea_buffer_id(const ggml_tensor * t) {
    ggml_backend_buffer_t buffer = t->view_src ? t->view_src->buffer : t->buffer;

    return ggml_metal_buffer_get_id((ggml_metal_buffer_t) buffer->context, t);
}

static ggml_metal_pipeline_with_params chelsea_pipeline(ggml_metal_library_t lib, const char * name) {
    ggml_metal_pipeline_with_params res = ggml_metal_library_get_pipeline(lib, name);
    if (!res.pipeline) {
        res = ggml_metal_library_compile_pipeline(lib, name, name, nullptr);
    }
    return res;
}

static bool chelsea_kv_type(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_IQ4_NL:
            return true;
        default:
            return false;
    }
}

// the scratch starts 16-byte aligned behind the op's result (the kernels store float4)
static size_t chelsea_scratch_offs(const ggml_tensor * op) {
    return GGML_PAD(ggml_nbytes(op), 16);
}

// MERGE: the per-head source index (ints), then, for quantized rows, one f32 row per (destination cell, head)
static size_t chelsea_merge_index_bytes(const ggml_tensor * op) {
    const int32_t n_remove  = ggml_get_op_params_i32(op, 0);
    const int32_t cells_dim = ggml_get_op_params_i32(op, 1);
    const int64_t n_span    = op->src[0]->ne[cells_dim];
    const int64_t n_head    = op->src[1]->ne[1];
    const int64_t n_out     = n_span - n_remove;
    return GGML_PAD((2*n_head*n_out + n_head*(n_out + 1) + n_head*n_span)*sizeof(int32_t), 16);
}

// MATCH by keys and values: elements per cell of the value tensor (0 for keys only)
static int64_t chelsea_match_n_embd_v(const ggml_tensor * op) {
    const ggml_tensor * v = op->src[1];
    return v ? v->ne[1 - ggml_get_op_params_i32(op, 4)] : 0;
}

size_t ggml_metal_op_chelsea_extra(const ggml_tensor * op) {
    const size_t pad = chelsea_scratch_offs(op) - ggml_nbytes(op);
    switch (op->op) {
        case GGML_OP_CHELSEA_MATCH:
            {
                // unit keys, then (matching by keys and values) unit values, 16-byte aligned
                const int32_t n_region = ggml_get_op_params_i32(op, 2);
                return pad + GGML_PAD((size_t) n_region*op->src[0]->ne[0]*sizeof(float), 16) +
                       (size_t) n_region*chelsea_match_n_embd_v(op)*sizeof(float);
            }
        case GGML_OP_CHELSEA_PLAN:
            {
                const int32_t n_remove = ggml_get_op_params_i32(op, 1);
                const int64_t n_span   = op->src[1]->ne[0];
                const int64_t n_head   = op->src[1]->ne[1];
                return pad + (size_t) n_head*(n_span + (n_span - n_remove))*sizeof(int32_t);
            }
        case GGML_OP_CHELSEA_MERGE:
            {
                const int32_t n_remove  = ggml_get_op_params_i32(op, 0);
                const int32_t cells_dim = ggml_get_op_params_i32(op, 1);
                const ggml_tensor * x = op->src[0];
                size_t res = pad + chelsea_merge_index_bytes(op);
                if (ggml_is_quantized(x->type) && cells_dim == 1) {
                    res += (size_t) (x->ne[1] - n_remove)*x->ne[0]*sizeof(float);
                }
                return res;
            }
        default:
            return 0;
    }
}

// dispatches the kernel that writes the unit-length head slices of the region's cells of x to bid_out
static void chelsea_match_encode_norm(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * x,
        int cells_dim, ggml_metal_kargs_chelsea args, ggml_metal_buffer_id bid_out) {
    char name[256];
    if (cells_dim == 1) {
        args.nb01 = x->nb[1];
        snprintf(name, sizeof(name), "kernel_chelsea_match_norm_%s", ggml_type_name(x->type));
    } else {
        args.nb00 = x->nb[0];
        args.nb01 = x->nb[1];
        snprintf(name, sizeof(name), "kernel_chelsea_match_norm_t_%s", ggml_type_name(x->type));
    }
    auto pipeline = chelsea_pipeline(lib, name);

    ggml_metal_encoder_set_pipeline(enc, pipeline);
    ggml_metal_encoder_set_bytes   (enc, &args, sizeof(args), 0);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(x), 1);
    ggml_metal_encoder_set_buffer  (enc, bid_out, 2);
    ggml_metal_encoder_dispatch_threadgroups(enc, args.n_region, args.n_head, 1, 32, 1, 1);
}

int ggml_metal_op_chelsea_match(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    const ggml_tensor * k = op->src[0];
    const ggml_tensor * v = op->src[1]; // ggml_chelsea_match_kv: values count too

    const int32_t n_head   = ggml_get_op_params_i32(op, 0);
    const int32_t c0       = ggml_get_op_params_i32(op, 1);
    const int32_t n_region = ggml_get_op_params_i32(op, 2);
    const int32_t chunk    = ggml_get_op_params_i32(op, 3);
    const int32_t v_dim    = ggml_get_op_params_i32(op, 4);

    if (n_region == 0) {
        return 1;
    }

    ggml_metal_kargs_chelsea args = {};
    args.n_head      = n_head;
    args.head_dim    = (int32_t) (k->ne[0] / n_head);
    args.c0          = c0;
    args.n_region    = n_region;
    args.chunk       = chunk;
    args.head_dim_v  = v ? (int32_t) (chelsea_match_n_embd_v(op) / n_head) : 0;
    args.v_cells_dim = v_dim;

    ggml_metal_buffer_id bid_dst = chelsea_buffer_id(op);
    ggml_metal_buffer_id bid_xn  = bid_dst;
    bid_xn.offs += chelsea_scratch_offs(op);
    ggml_metal_buffer_id bid_vn  = bid_xn;
    bid_vn.offs += GGML_PAD((size_t) n_region*k->ne[0]*sizeof(float), 16);

    chelsea_match_encode_norm(lib, enc, k, 1, args, bid_xn);
    if (v) {
        ggml_metal_kargs_chelsea args_v = args;
        args_v.head_dim = args.head_dim_v;
        chelsea_match_encode_norm(lib, enc, v, v_dim, args_v, bid_vn);
    }

    // the unit-length keys and values must be complete before any cell compares against them
    ggml_metal_encoder_memory_barrier(enc);

    auto pipeline_best = chelsea_pipeline(lib, "kernel_chelsea_match_best");

    const int nsg = 4; // cells (simdgroups) per threadgroup

    ggml_metal_encoder_set_pipeline(enc, pipeline_best);
    ggml_metal_encoder_set_bytes   (enc, &args, sizeof(args), 0);
    ggml_metal_encoder_set_buffer  (enc, bid_xn,  1);
    ggml_metal_encoder_set_buffer  (enc, v ? bid_vn : bid_xn, 2); // not read without values
    ggml_metal_encoder_set_buffer  (enc, bid_dst, 3);
    ggml_metal_encoder_dispatch_threadgroups(enc, (n_region + nsg - 1)/nsg, n_head, 1, 32, nsg, 1);

    return 1;
}

int ggml_metal_op_chelsea_plan(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    const ggml_tensor * m = op->src[0];
    const ggml_tensor * s = op->src[1];

    const int32_t c0       = ggml_get_op_params_i32(op, 0);
    const int32_t n_remove = ggml_get_op_params_i32(op, 1);

    ggml_metal_kargs_chelsea args = {};
    args.n_head   = (int32_t) m->ne[1];
    args.c0       = c0;
    args.n_region = (int32_t) m->ne[0];
    args.n_span   = (int32_t) s->ne[0];
    args.n_remove = n_remove;
    args.n_out    = (int32_t) (s->ne[0] - n_remove);
    args.nb00     = m->nb[0];
    args.nb01     = m->nb[1];
    args.nb02     = m->nb[2];
    args.nb10     = s->nb[0];
    args.nb11     = s->nb[1];

    ggml_metal_buffer_id bid_tmp = chelsea_buffer_id(op);
    bid_tmp.offs += chelsea_scratch_offs(op);

    auto pipeline = chelsea_pipeline(lib, "kernel_chelsea_plan");

    const int nth = std::min(1024, ggml_metal_pipeline_max_theads_per_threadgroup(pipeline));

    ggml_metal_encoder_set_pipeline(enc, pipeline);
    ggml_metal_encoder_set_bytes   (enc, &args, sizeof(args), 0);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(m),  1);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(s),  2);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(op), 3);
    ggml_metal_encoder_set_buffer  (enc, bid_tmp, 4);
    ggml_metal_encoder_set_threadgroup_memory_size(enc, GGML_PAD((256 + 32 + 4)*sizeof(int32_t), 16), 0);
    ggml_metal_encoder_dispatch_threadgroups(enc, args.n_head, 1, 1, nth, 1, 1);

    return 1;
}

int ggml_metal_op_chelsea_merge(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    const ggml_tensor * x = op->src[0];
    const ggml_tensor * p = op->src[1];

    const int32_t n_remove  = ggml_get_op_params_i32(op, 0);
    const int32_t cells_dim = ggml_get_op_params_i32(op, 1);

    const int64_t n_span = x->ne[cells_dim];
    const int64_t n_embd = x->ne[1 - cells_dim];
    const int64_t n_head = p->ne[1];
    const int64_t n_out  = n_span - n_remove;

    if (n_out == 0 || n_embd == 0) {
        return 1;
    }

    ggml_metal_kargs_chelsea args = {};
    args.n_head       = (int32_t) n_head;
    args.head_dim     = (int32_t) (n_embd / n_head);
    args.n_span       = (int32_t) n_span;
    args.n_remove     = n_remove;
    args.n_out        = (int32_t) n_out;
    args.nb01         = x->nb[1];
    args.nb10         = p->nb[0];
    args.nb11         = p->nb[1];
    args.nb12         = p->nb[2];
    args.nb1          = op->nb[1];
    args.tmp_acc_offs = chelsea_merge_index_bytes(op);

    ggml_metal_buffer_id bid_tmp = chelsea_buffer_id(op);
    bid_tmp.offs += chelsea_scratch_offs(op);

    {
        auto pipeline = chelsea_pipeline(lib, "kernel_chelsea_merge_index");

        const int nth = std::min(1024, ggml_metal_pipeline_max_theads_per_threadgroup(pipeline));

        ggml_metal_encoder_set_pipeline(enc, pipeline);
        ggml_metal_encoder_set_bytes   (enc, &args, sizeof(args), 0);
        ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(p), 1);
        ggml_metal_encoder_set_buffer  (enc, bid_tmp, 2);
        ggml_metal_encoder_set_threadgroup_memory_size(enc, GGML_PAD(32*sizeof(int32_t), 16), 0);
        ggml_metal_encoder_dispatch_threadgroups(enc, n_head, 1, 1, nth, 1, 1);
    }

    // the source lists must be complete before any destination cell reads them
    ggml_metal_encoder_memory_barrier(enc);

    char name[256];
    snprintf(name, sizeof(name), "kernel_chelsea_merge_%s_%s", cells_dim == 1 ? "rows" : "cols", ggml_type_name(x->type));
    auto pipeline = chelsea_pipeline(lib, name);

    ggml_metal_encoder_set_pipeline(enc, pipeline);
    ggml_metal_encoder_set_bytes   (enc, &args, sizeof(args), 0);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(x),  1);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(p),  2);
    ggml_metal_encoder_set_buffer  (enc, chelsea_buffer_id(op), 3);
    ggml_metal_encoder_set_buffer  (enc, bid_tmp, 4);
    if (cells_dim == 1) {
        ggml_metal_encoder_dispatch_threadgroups(enc, n_out, n_head, 1, 32, 1, 1);
    } else {
        const int nth = 256;
        ggml_metal_encoder_dispatch_threadgroups(enc, (n_out + nth - 1)/nth, n_embd, 1, nth, 1, 1);
    }

    return 1;
}

bool ggml_metal_chelsea_supports_op(const ggml_tensor * op, bool has_simdgroup_reduction, bool has_bfloat) {
    const ggml_tensor * src0 = op->src[0];

    // simd_sum / simd_prefix_*_sum are used throughout
    if (!has_simdgroup_reduction) {
        return false;
    }
    if (src0->type == GGML_TYPE_BF16 && !has_bfloat) {
        return false;
    }

    switch (op->op) {
        case GGML_OP_CHELSEA_MATCH:
            {
                // keys (and values along ne1) are read in pieces of 16 elements (a float4x4), rows through their
                // stride; transposed values element by element (float types only)
                const int32_t n_head   = ggml_get_op_params_i32(op, 0);
                const int64_t head_dim = src0->ne[0] / n_head;
                const ggml_tensor * v = op->src[1];
                bool v_ok = true;
                if (v) {
                    v_ok = ggml_get_op_params_i32(op, 4) == 1
                        ? chelsea_kv_type(v->type) && v->nb[0] == ggml_type_size(v->type) && (v->ne[0] / n_head) % 16 == 0
                        : v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_BF16;
                    v_ok = v_ok && (v->type != GGML_TYPE_BF16 || has_bfloat);
                }
                return chelsea_kv_type(src0->type) && src0->nb[0] == ggml_type_size(src0->type) && head_dim % 16 == 0 && v_ok;
            }
        case GGML_OP_CHELSEA_PLAN:
            return src0->type == GGML_TYPE_F32 && op->src[1]->type == GGML_TYPE_F32;
        case GGML_OP_CHELSEA_MERGE:
            {
                const int32_t cells_dim = ggml_get_op_params_i32(op, 1);
                const int64_t head_dim  = src0->ne[1 - cells_dim] / op->src[1]->ne[1];
                return chelsea_kv_type(src0->type) && src0->nb[0] == ggml_type_size(src0->type) &&
                       op->src[1]->type == GGML_TYPE_F32 && (cells_dim == 0 || head_dim % 16 == 0);
            }
        default:
            return false;
    }
}
