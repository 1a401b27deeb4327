// chelsea-gguf: the parameters of KV-cache clustering: their defaults, their rules, and a sequence's budget.
// The rules live here only; the Python side reports them under its own option names.

#include "chelsea-kv.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

namespace {

// "ratio: 1.5 is out of range (must be > 0 and <= 1)"; %g keeps what the user typed (std::to_string does not)
std::string out_of_range(const char * field, double value, const char * rule) {
    char buf[160];
    snprintf(buf, sizeof(buf), "%s: %g is out of range (must be %s)", field, value, rule);
    return buf;
}

} // namespace

// the most passes one compression may run: each pass is a graph over every layer, and past this many the
// remaining candidates are too few to be worth another graph
static constexpr int32_t CHELSEA_MAX_PASSES = 64;

std::string chelsea_params_problem(const chelsea_kv_cluster_params & p) {
    if (!(p.ratio > 0.0f && p.ratio <= 1.0f)) {
        return out_of_range("ratio", p.ratio, "> 0 and <= 1");
    }
    if (p.chunk < 2) {
        return out_of_range("chunk", p.chunk, ">= 2");
    }
    if (p.chunk % 2 != 0) {
        return "chunk: " + std::to_string(p.chunk) + " must be even (chunks split into alternating pairs)";
    }
    if (p.n_sink < 0) {
        return out_of_range("n_sink", p.n_sink, ">= 0");
    }
    if (p.n_recent < 0) {
        return out_of_range("n_recent", p.n_recent, ">= 0");
    }
    if (!(p.recent_share >= 0.0f && p.recent_share < 1.0f)) {
        return out_of_range("recent_share", p.recent_share, ">= 0 and < 1");
    }
    if (p.interval < 0) {
        return out_of_range("interval", p.interval, ">= 0");
    }
    if (p.max_passes < 1 || p.max_passes > CHELSEA_MAX_PASSES) {
        return out_of_range("max_passes", p.max_passes, ("in 1 .. " + std::to_string(CHELSEA_MAX_PASSES)).c_str());
    }
    if (!(p.pass_fraction > 0.0f && p.pass_fraction <= 1.0f)) {
        return out_of_range("pass_fraction", p.pass_fraction, "> 0 and <= 1");
    }
    if (!(p.distinct_weight >= 0.0f && p.distinct_weight <= 100.0f)) {
        return out_of_range("distinct_weight", p.distinct_weight, "in 0 .. 100");
    }
    if (!(p.size_weight >= -100.0f && p.size_weight <= 100.0f)) {
        return out_of_range("size_weight", p.size_weight, "in -100 .. 100");
    }
    if (!(p.value_weight >= 0.0f && p.value_weight <= 100.0f)) {
        return out_of_range("value_weight", p.value_weight, "in 0 .. 100");
    }
    if (!(p.attn_weight >= 0.0f && p.attn_weight <= 100.0f)) {
        return out_of_range("attn_weight", p.attn_weight, "in 0 .. 100");
    }
    if (!(p.attn_top >= 0.0f && p.attn_top <= 1.0f)) {
        return out_of_range("attn_top", p.attn_top, "in 0 .. 1");
    }
    if (p.attn_window < 1 || p.attn_window > CHELSEA_MAX_ATTN_WINDOW) {
        return out_of_range("attn_window", p.attn_window, ("in 1 .. " + std::to_string(CHELSEA_MAX_ATTN_WINDOW)).c_str());
    }
    return "";
}

uint32_t chelsea_target_cells(const chelsea_kv_cluster_params & p, int64_t tokens) {
    const int64_t budget = (int64_t) std::ceil((double) p.ratio * (double) tokens);
    return (uint32_t) std::max<int64_t>(budget, p.n_sink + p.n_recent + 2);
}

uint32_t chelsea_recent_cells(const chelsea_kv_cluster_params & p, uint32_t kept, uint32_t n_protected) {
    const uint32_t share = (uint32_t) ((double) p.recent_share * (double) kept);
    // the share never takes the last 2 cells of the region: a pass needs a pair to merge
    const uint32_t most  = kept > n_protected + 2 ? kept - n_protected - 2 : 0;
    return std::max((uint32_t) p.n_recent, std::min(share, most));
}

chelsea_kv_cluster_params chelsea_kv_cluster_default_params(void) {
    chelsea_kv_cluster_params p;
    p.ratio      = 0.25f;
    p.chunk      = 64;
    p.n_sink     = 16;
    p.n_recent   = 64;
    p.recent_share = 0.0f;
    p.interval   = 256;
    p.max_passes = 32;
    p.pass_fraction = 0.5f;
    p.log_bias   = true;
    p.match_values = true;
    p.random_pairs = false;
    p.seed       = 0;
    p.distinct_weight = 1.0f;
    p.size_weight     = 0.0f;
    p.value_weight    = 0.0f;
    p.attn_weight     = 0.25f;
    p.attn_window     = 16;
    p.lookahead       = true;
    p.attn_top        = 0.0f;
    return p;
}

int32_t chelsea_kv_cluster_params_check(const chelsea_kv_cluster_params * params, char * err, size_t err_len) {
    const std::string problem = params ? chelsea_params_problem(*params) : "params must not be NULL";
    if (problem.empty()) {
        return 0;
    }
    if (err != nullptr && err_len > 0) {
        snprintf(err, err_len, "%s", problem.c_str());
    }
    return -1;
}
