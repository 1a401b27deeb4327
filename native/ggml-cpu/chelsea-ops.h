// chelsea-gguf: CPU forward functions of the Chelsea ops, called from ggml-cpu's op dispatch.
#pragma once

#include "ggml.h"

struct ggml_compute_params;

#ifdef __cplusplus
extern "C" {
#endif

void ggml_compute_forward_chelsea_match(const struct ggml_compute_params * params, struct ggml_tensor * dst);
void ggml_compute_forward_chelsea_plan (const struct ggml_compute_params * params, struct ggml_tensor * dst);
void ggml_compute_forward_chelsea_merge(const struct ggml_compute_params * params, struct ggml_tensor * dst);

bool ggml_chelsea_cpu_supports_op(const struct ggml_tensor * op);

// bytes of params->wdata the op needs with n_tasks threads (ggml_graph_plan)
size_t ggml_chelsea_cpu_work_size(const struct ggml_tensor * op, int n_tasks);

#ifdef __cplusplus
}
#endif
