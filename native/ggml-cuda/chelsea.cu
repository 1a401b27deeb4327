// chelsea-gguf: which Chelsea ops the CUDA backend runs (the kernels: chelsea-match.cu, chelsea-plan.cu,
// chelsea-merge.cu).

#include "chelsea.cuh"

#include "ggml-chelsea.h"

// the KV cache types llama.cpp accepts (-ctk/-ctv); all of them have a CPU to_float and from_float, so this is
// the CPU backend's set restricted to types a KV cache can have
static bool chelsea_cuda_kv_type(const ggml_type type) {
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

bool ggml_cuda_chelsea_supports_op(const ggml_tensor * op) {
    const ggml_tensor * src0 = op->src[0];
    switch (op->op) {
        case GGML_OP_CHELSEA_MATCH: {
            // elements of a row are read as one run (rows themselves may be strided)
            const ggml_tensor * v = op->src[1];
            const bool v_ok = v == nullptr || (ggml_get_op_params_i32(op, 4) == 1
                ? chelsea_cuda_kv_type(v->type) && v->nb[0] == ggml_type_size(v->type)
                : v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_BF16);
            return chelsea_cuda_kv_type(src0->type) && src0->nb[0] == ggml_type_size(src0->type) && v_ok;
        }
        case GGML_OP_CHELSEA_PLAN:
            return src0->type == GGML_TYPE_F32 && op->src[1]->type == GGML_TYPE_F32;
        case GGML_OP_CHELSEA_MERGE:
            return chelsea_cuda_kv_type(src0->type) && src0->nb[0] == ggml_type_size(src0->type) &&
                   op->src[1]->type == GGML_TYPE_F32;
        default:
            return false;
    }
}
