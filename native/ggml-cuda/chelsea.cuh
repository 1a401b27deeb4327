// chelsea-gguf: CUDA kernels of the Chelsea KV-clustering ops (see native/include/ggml-chelsea.h),
// called from ggml-cuda's op dispatch (ggml_patches/0007-cuda-run-the-Chelsea-KV-clustering-ops-*.patch); the kernels are
// in chelsea-match.cu, chelsea-plan.cu and chelsea-merge.cu.
#pragma once

#include "common.cuh"

void ggml_cuda_op_chelsea_match(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_chelsea_plan (ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_chelsea_merge(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

bool ggml_cuda_chelsea_supports_op(const ggml_tensor * op);
