"""The attention score (kv_cluster_attn_weight): the last queries of a prompt, kept per layer beside K, keep the
cells they attend (and their neighbours) from merging, on the real default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import ClusterOptions, cluster_sizes
from chelsea_gguf.kv import read_kv_stats

from test_merge_ranking import assert_other_merges_same_budget, varied_text

QUESTION = " Question: how many steps from the lantern was the copper? Answer:"
ATTN = {"kv_cluster_attn_weight": 1.0}
NO_ATTN = {"kv_cluster_attn_weight": 0.0}


def open_llm(model_path: Path, **options: Any) -> Llama:
    # room for the whole prompt: nothing merges before the question is in, as in a 16k context with a 2k prompt
    return Llama(str(model_path), n_ctx=4096, n_threads=2, verbose=False, kv_cluster=True, kv_cluster_ratio=0.25,
                 **options)


def prompt_tokens(llm: Llama) -> list[int]:
    return llm.tokenize(varied_text(60))[:1100] + llm.tokenize(QUESTION, add_bos=False)


def compressed(llm: Llama) -> tuple[dict, list[list[float]], np.ndarray]:
    assert lib.chelsea_kv_cluster_compress(llm.ctx, 0) > 0
    stats = llm.kv_cluster_stats()
    sizes = cluster_sizes(llm.ctx, 0, stats["cells"])
    llm.eval(llm.tokenize(" 4", add_bos=False))
    logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm.ctx, -1), 4 * llm.n_vocab()),
                           dtype=np.float32).copy()
    return stats, sizes, logits


def run(model_path: Path, **options: Any) -> tuple[dict, list[list[float]], np.ndarray]:
    with open_llm(model_path, **options) as llm:
        llm.eval(prompt_tokens(llm))
        return compressed(llm)


@pytest.fixture(scope="module")
def without_score(model_path: Path) -> tuple[dict, list[list[float]], np.ndarray]:
    return run(model_path, **NO_ATTN)


def test_attention_score_is_on_by_default(model_path: Path) -> None:
    """On by default (what measured best: bench/results/scoring_ablation.md), and the defaults build the same graph
    as the weight given."""
    assert ClusterOptions().attn_weight == 0.25 and ClusterOptions().attn_window == 16
    assert ClusterOptions().attn_top == 0.0
    assert run(model_path)[1] == run(model_path, kv_cluster_attn_weight=0.25, kv_cluster_attn_window=16,
                                     kv_cluster_attn_top=0.0)[1]


@pytest.mark.parametrize("options", [ATTN,
                                     # quantized K: the score multiplies the queries by q8_0 keys
                                     {**ATTN, "flash_attn": True, "type_k": "q8_0", "type_v": "q8_0"},
                                     {**ATTN, "kv_cluster_attn_window": 1}])
def test_attention_score_merges_other_cells_to_the_same_budget(model_path: Path, without_score, options) -> None:
    assert_other_merges_same_budget(without_score, run(model_path, **options))


def test_attn_top_changes_which_cells_keep_the_score(model_path: Path, without_score) -> None:
    """attn_top lets only the cells each head attends most keep their score once the prompt is in: other merges than
    with every cell scored (attn_top 0) or with a wider cut, each to the same budget."""
    few = run(model_path, **ATTN, kv_cluster_attn_top=0.1)
    wide = run(model_path, **ATTN, kv_cluster_attn_top=1.0)
    every = run(model_path, **ATTN, kv_cluster_attn_top=0.0)
    for scored in (few, wide, every):
        assert_other_merges_same_budget(without_score, scored)
    assert few[1] != wide[1] and few[1] != every[1] and wide[1] != every[1]


def test_queries_are_kept_beside_the_cache_only_when_asked(model_path: Path) -> None:
    """With the score on, each layer keeps attn_window f32 queries of every Q head, counted in the KV allocation;
    off, nothing (the second window of kv_cluster_lookahead: tests/test_read_ahead.py)."""
    window = 8
    with open_llm(model_path, **NO_ATTN) as llm:
        off = read_kv_stats(llm.ctx).buffer_bytes
    with open_llm(model_path, kv_cluster_attn_weight=1.0, kv_cluster_attn_window=window,
                  kv_cluster_lookahead=False) as llm:
        on = read_kv_stats(llm.ctx).buffer_bytes
        n_layer = int(lib.llama_model_n_layer(llm.model))
        n_embd = int(lib.llama_model_n_embd(llm.model))   # n_head * head size for this model
    assert on - off == n_layer * n_embd * window * 4


def test_a_loaded_state_compresses_as_the_live_one(model_path: Path, without_score) -> None:
    """A saved state carries the prompt's last queries: after a load, the compression is the live one's, merges and
    logits; loaded where the score is off, the queries are skipped and it compresses as without the score."""
    with open_llm(model_path, **ATTN) as llm:
        llm.eval(prompt_tokens(llm))
        state = llm.save_state()
        _, live_sizes, live_logits = compressed(llm)
        llm.load_state(state)
        _, loaded_sizes, loaded_logits = compressed(llm)
    assert live_sizes != without_score[1]
    assert loaded_sizes == live_sizes and np.array_equal(loaded_logits, live_logits)
    with open_llm(model_path, **NO_ATTN) as llm:
        llm.load_state(state)
        _, sizes, logits = compressed(llm)
    assert sizes == without_score[1] and np.array_equal(logits, without_score[2])


def test_a_narrower_window_loads_the_newest_queries(model_path: Path) -> None:
    """Loaded where attn_window is smaller, a state keeps its newest queries: the compression of a live cache with
    that window."""
    narrow = {**ATTN, "kv_cluster_attn_window": 4}
    with open_llm(model_path, **ATTN) as llm:
        llm.eval(prompt_tokens(llm))
        state = llm.save_state()
    with open_llm(model_path, **narrow) as llm:
        llm.load_state(state)
        _, loaded_sizes, loaded_logits = compressed(llm)
    _, live_sizes, live_logits = run(model_path, **narrow)
    assert loaded_sizes == live_sizes and np.array_equal(loaded_logits, live_logits)


@pytest.mark.parametrize("options, message", [
    ({"kv_cluster_attn_weight": -1.0}, "kv_cluster_attn_weight: -1 is out of range"),
    ({"kv_cluster_attn_window": 0}, "kv_cluster_attn_window: 0 is out of range (must be in 1 .. 512)"),
    ({"kv_cluster_attn_top": 1.5}, "kv_cluster_attn_top: 1.5 is out of range (must be in 0 .. 1)"),
    ({"kv_cluster_attn_top": -0.1}, "kv_cluster_attn_top: -0.1 is out of range (must be in 0 .. 1)"),
    ({"kv_cluster_attn_window": 513}, "kv_cluster_attn_window: 513 is out of range (must be in 1 .. 512)"),
])
def test_bad_attention_options_are_named(model_path: Path, options, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Llama(str(model_path), n_ctx=512, verbose=False, kv_cluster=True, **options)
