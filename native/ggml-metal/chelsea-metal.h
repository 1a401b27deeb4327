// chelsea-gguf: the Chelsea KV-clustering ops on the Metal backend (kernels: chelsea.metal), called from
// ggml-metal's op encoder, supports_op and buffer-size hook (ggml_patches/0009-metal-chelsea-ops.patch).
#pragma once

#include "ggml-metal-device.h"

#ifdef __cplusplus
extern "C" {
#endif

// each encodes one op (a few dependent dispatches) and returns the number of nodes it consumed (1)
int ggml_metal_op_chelsea_match(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const struct ggml_tensor * op);
int ggml_metal_op_chelsea_plan (ggml_metal_library_t lib, ggml_metal_encoder_t enc, const struct ggml_tensor * op);
int ggml_metal_op_chelsea_merge(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const struct ggml_tensor * op);

// scratch the kernels use behind the op's result (added to the buffer's get_alloc_size, like FLASH_ATTN_EXT's)
size_t ggml_metal_op_chelsea_extra(const struct ggml_tensor * op);

bool ggml_metal_chelsea_supports_op(const struct ggml_tensor * op, bool has_simdgroup_reduction, bool has_bfloat);

#ifdef __cplusplus
}
#endif
