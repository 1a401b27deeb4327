"""KV statistics must read the real allocation, which follows from the model's shape and the context."""

import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import lib

# bytes per element for f16, and per 32-element block for q8_0 (32 int8 + one f16 scale)
F16_BYTES = 2
Q8_0_BLOCK_BYTES = 34


def kv_row_elements(llm: Llama) -> tuple[int, int]:
    n_layer = lib.llama_model_n_layer(llm.model)
    head_dim = lib.llama_model_n_embd(llm.model) // lib.llama_model_n_head(llm.model)
    return n_layer, head_dim * lib.llama_model_n_head_kv(llm.model)


def test_stats_match_model_shape(llm: Llama) -> None:
    llm.reset()
    stats = llm.kv_stats()
    n_layer, n_embd_kv = kv_row_elements(llm)
    assert stats.n_caches == 1
    assert stats.n_layers == n_layer
    assert stats.n_cells == llm.n_ctx() == 2048
    assert stats.type_k == stats.type_v == "f16"
    expected = n_layer * stats.n_cells * n_embd_kv * F16_BYTES
    assert stats.k_bytes == expected
    assert stats.v_bytes == expected
    # the backend buffer holds both, plus at most alignment padding per tensor
    assert expected * 2 <= stats.buffer_bytes <= expected * 2 + n_layer * 2 * 512


def test_cells_and_tokens_follow_evaluation(llm: Llama) -> None:
    llm.reset()
    assert llm.kv_stats().n_cells_used == 0
    tokens = llm.tokenize("Counting cells in the cache, one token at a time.")
    llm.eval(tokens)
    stats = llm.kv_stats()
    assert stats.n_cells_used == len(tokens)
    assert stats.tokens == len(tokens)
    assert stats.n_cells_span == len(tokens)
    llm.reset()
    assert llm.kv_stats().tokens == 0


@pytest.mark.parametrize("n_ctx", [512, 1024])
def test_quantized_cache_allocation(model_path, n_ctx: int) -> None:
    with Llama(str(model_path), n_ctx=n_ctx, type_k="q8_0", type_v="q8_0", flash_attn=True,
               verbose=False) as q8:
        stats = q8.kv_stats()
        n_layer, n_embd_kv = kv_row_elements(q8)
        assert stats.type_k == "q8_0" and stats.type_v == "q8_0"
        assert stats.k_bytes == n_layer * n_ctx * (n_embd_kv // 32) * Q8_0_BLOCK_BYTES
        assert stats.buffer_bytes < n_layer * n_ctx * n_embd_kv * F16_BYTES * 2
        assert "Paris" in q8("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
