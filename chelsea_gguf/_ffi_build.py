"""cffi API-mode bindings: compiled against the real llama.h and chelsea.h.

Run by CMake at build time (``python _ffi_build.py OUT.c``) to emit the extension's C source. Struct
members are declared with ``...;`` so that the C compiler, not this file, fixes offsets and sizes:
a layout drift between this file and the pinned headers is a compile error, never a silent misread.
"""

from __future__ import annotations

import sys

import cffi

CDEF = r"""
typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;

struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_sampler;
typedef struct llama_memory_i * llama_memory_t;
typedef struct ggml_backend_device * ggml_backend_dev_t;
typedef struct ggml_backend_reg * ggml_backend_reg_t;
enum ggml_backend_dev_type { GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU,
                             GGML_BACKEND_DEVICE_TYPE_IGPU, GGML_BACKEND_DEVICE_TYPE_ACCEL, ... };

enum ggml_type { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
                 GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_BF16, GGML_TYPE_IQ4_NL, ... };
enum ggml_log_level { GGML_LOG_LEVEL_NONE, GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO,
                      GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT, ... };
enum llama_flash_attn_type { LLAMA_FLASH_ATTN_TYPE_AUTO, LLAMA_FLASH_ATTN_TYPE_DISABLED,
                             LLAMA_FLASH_ATTN_TYPE_ENABLED, ... };
typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
typedef bool (*ggml_abort_callback)(void * data);

enum llama_load_mode {
    LLAMA_LOAD_MODE_AUTO = -1,
    LLAMA_LOAD_MODE_NONE = 0,
    LLAMA_LOAD_MODE_MMAP = 1,
    ...
};

struct llama_model_params {
    ggml_backend_dev_t * devices;
    int32_t n_gpu_layers;
    enum llama_load_mode load_mode;
    int32_t main_gpu;
    const float * tensor_split;
    bool vocab_only;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
    ...;
};

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    int32_t  n_threads;
    int32_t  n_threads_batch;
    enum llama_flash_attn_type flash_attn_type;
    float    rope_freq_base;
    float    rope_freq_scale;
    enum ggml_type type_k;
    enum ggml_type type_v;
    ggml_abort_callback abort_callback;
    void *   abort_callback_data;
    bool embeddings;
    bool offload_kqv;
    bool no_perf;
    bool swa_full;
    bool kv_unified;
    uint32_t n_outputs_max;
    ...;
};

struct llama_sampler_chain_params {
    bool no_perf;
    ...;
};

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token  *  token;
    float        *  embd;
    llama_pos    *  pos;
    int32_t      *  n_seq_id;
    llama_seq_id ** seq_id;
    int8_t       *  logits;
} llama_batch;

typedef struct llama_chat_message {
    const char * role;
    const char * content;
} llama_chat_message;

struct llama_perf_context_data {
    double t_start_ms;
    double t_load_ms;
    double t_p_eval_ms;
    double t_eval_ms;
    int32_t n_p_eval;
    int32_t n_eval;
    int32_t n_reused;
    ...;
};

struct llama_model_params   llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);

void llama_backend_init(void);
bool llama_supports_rpc(void);
size_t llama_max_devices(void);

/* ggml-backend.h: devices, and the RPC backend's add_server (through get_proc_address) */
ggml_backend_reg_t ggml_backend_reg_by_name(const char * name);
void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
size_t ggml_backend_dev_count(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
const char * ggml_backend_dev_name(ggml_backend_dev_t device);
const char * ggml_backend_dev_description(ggml_backend_dev_t device);
enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
const char * llama_print_system_info(void);
bool llama_supports_gpu_offload(void);

struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);

uint32_t llama_n_ctx(const struct llama_context * ctx);
uint32_t llama_n_batch(const struct llama_context * ctx);
uint32_t llama_n_ubatch(const struct llama_context * ctx);
uint32_t llama_n_seq_max(const struct llama_context * ctx);
int32_t  llama_n_threads(struct llama_context * ctx);

const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
int32_t llama_model_n_swa(const struct llama_model * model);
int32_t llama_model_n_embd(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
const struct llama_model * llama_get_model(const struct llama_context * ctx);
int32_t llama_model_n_head(const struct llama_model * model);
int32_t llama_model_n_head_kv(const struct llama_model * model);
int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
uint64_t llama_model_size(const struct llama_model * model);
uint64_t llama_model_n_params(const struct llama_model * model);
const char * llama_model_chat_template(const struct llama_model * model, const char * name);

int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
llama_token llama_vocab_bos(const struct llama_vocab * vocab);
llama_token llama_vocab_eos(const struct llama_vocab * vocab);
bool llama_vocab_get_add_bos(const struct llama_vocab * vocab);

int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                             int32_t length, int32_t lstrip, bool special);
int32_t llama_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                         char * text, int32_t text_len_max, bool remove_special, bool unparse_special);
int32_t llama_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg,
                                  bool add_ass, char * buf, int32_t length);

struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
void llama_synchronize(struct llama_context * ctx);

llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta);
void llama_memory_seq_div(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d);
void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1);
void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);

struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * smpl);
struct llama_sampler * llama_sampler_init_greedy(void);
struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
struct llama_sampler * llama_sampler_init_top_k(int32_t k);
struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_temp(float t);
struct llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n, float penalty_repeat,
                                                    float penalty_freq, float penalty_present);
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_free(struct llama_sampler * smpl);

size_t llama_state_get_size(struct llama_context * ctx);
size_t llama_state_get_data(struct llama_context * ctx, uint8_t * dst, size_t size);
size_t llama_state_set_data(struct llama_context * ctx, const uint8_t * src, size_t size);
size_t llama_state_seq_get_size(struct llama_context * ctx, llama_seq_id seq_id);
size_t llama_state_seq_get_data(struct llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id);
size_t llama_state_seq_set_data(struct llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id);

struct llama_perf_context_data llama_perf_context(const struct llama_context * ctx);
void llama_perf_context_reset(struct llama_context * ctx);

/* chelsea.h */
struct chelsea_kv_stats {
    int32_t  n_caches;
    int32_t  n_layers;
    uint32_t n_stream;
    uint32_t n_cells;
    uint32_t n_cells_used;
    uint32_t n_cells_span;
    uint64_t k_bytes;
    uint64_t v_bytes;
    uint64_t buffer_bytes;
    int32_t  type_k;
    int32_t  type_v;
};
int32_t chelsea_kv_stats_get(const struct llama_context * ctx, struct chelsea_kv_stats * out);
int64_t chelsea_kv_seq_tokens(const struct llama_context * ctx, llama_seq_id seq_id);
uint64_t chelsea_compute_buffer_bytes(const struct llama_context * ctx);
struct chelsea_buffer_memory {
    char     name[128];
    uint64_t model_bytes;
    uint64_t kv_bytes;
    uint64_t compute_bytes;
};
int32_t chelsea_buffer_memory_get(const struct llama_context * ctx, struct chelsea_buffer_memory * out, int32_t n_max);

struct chelsea_kv_cluster_params {
    float   ratio;
    int32_t chunk;
    int32_t n_sink;
    int32_t n_recent;
    float   recent_share;
    int32_t interval;
    int32_t max_passes;
    float   pass_fraction;
    bool    log_bias;
    bool    match_values;
    bool    random_pairs;
    uint32_t seed;
    float    distinct_weight;
    float    size_weight;
    float    value_weight;
    float    attn_weight;
    int32_t  attn_window;
    bool     lookahead;
    float    attn_top;
};
struct chelsea_kv_cluster_params chelsea_kv_cluster_default_params(void);
int32_t chelsea_kv_cluster_params_check(const struct chelsea_kv_cluster_params * params, char * err, size_t err_len);
int32_t chelsea_kv_cluster_enable(struct llama_context * ctx, const struct chelsea_kv_cluster_params * params,
                                  char * err, size_t err_len);
int32_t chelsea_kv_cluster_compress(struct llama_context * ctx, llama_seq_id seq_id);
int32_t chelsea_kv_cluster_read_ahead(struct llama_context * ctx, llama_seq_id seq_id, llama_pos pos_first);
int32_t chelsea_kv_cluster_queries(const struct llama_context * ctx, llama_seq_id seq_id, int32_t layer,
                                   bool read_ahead, float * out, int32_t n_max, int32_t * n_embd_q);
struct chelsea_kv_cluster_seq_stats {
    int64_t   tokens;
    int32_t   cells;
    int32_t   passes;
    int32_t   compressions;
    double    t_ms;
    llama_pos pos_merged_min;
    llama_pos pos_merged_max;
    int64_t   nonfinite;
};
int32_t chelsea_kv_cluster_seq_stats_get(const struct llama_context * ctx, llama_seq_id seq_id,
                                         struct chelsea_kv_cluster_seq_stats * out);
int32_t chelsea_kv_cluster_cell_positions(const struct llama_context * ctx, llama_seq_id seq_id, llama_pos * out,
                                          int32_t n_max);
int32_t chelsea_kv_cluster_reread(struct llama_context * ctx, llama_seq_id seq_id, int32_t n_rows);
int32_t chelsea_kv_cluster_reread_queries(const struct llama_context * ctx, llama_seq_id seq_id, int32_t layer,
                                          float * out, int32_t n_max, int32_t * n_embd_q, float * kq_scale);
int32_t chelsea_kv_cluster_compress_ranked(struct llama_context * ctx, llama_seq_id seq_id, const float * importance,
                                           int32_t n_pos, float weight);
int32_t chelsea_kv_cluster_sizes(const struct llama_context * ctx, llama_seq_id seq_id, int32_t layer, float * out,
                                 int32_t n_cells);
int32_t chelsea_kv_keys(const struct llama_context * ctx, llama_seq_id seq_id, int32_t layer, float * out,
                        int32_t n_cells);
int32_t chelsea_ops_run_cpu(int32_t type_k, int32_t type_v, bool v_trans, bool match_values, int32_t n_embd, int32_t n_head,
                            int32_t n_span, int32_t c0, int32_t n_region, int32_t chunk, int32_t n_remove,
                            const float * k, const float * v, const float * s,
                            float * k_in, float * v_in, float * match, float * plan, float * k_out, float * v_out,
                            int32_t n_threads);

extern "Python" void chelsea_log_callback(enum ggml_log_level, const char *, void *);
"""

SOURCE = r"""
#include "llama.h"
#include "chelsea.h"
"""


def make_builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("chelsea_gguf._chelsea_native", SOURCE)
    return ffi


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: _ffi_build.py OUTPUT.c")
    make_builder().emit_c_code(sys.argv[1])
