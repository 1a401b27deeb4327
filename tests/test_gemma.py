"""The second real model: Gemma-3-270M, a sliding-window (SWA) model with two attention caches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chelsea_gguf import Llama
from chelsea_gguf.chat import format_chat_prompt
from chelsea_gguf.models import gemma3_270m_path
from chelsea_gguf.passkey import FILLER, passkey_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> Iterator[Llama]:
    with Llama(str(gemma3_270m_path()), n_ctx=1024, verbose=False, seed=7) as model:
        yield model


def test_gemma_has_swa_and_full_caches(gemma: Llama) -> None:
    stats = gemma.kv_stats()
    assert stats.n_caches == 2
    assert stats.n_layers == 18
    assert gemma.metadata("general.architecture") == "gemma3"


def test_gemma_generates_deterministically(gemma: Llama) -> None:
    prompt = "The first three planets from the Sun are Mercury, Venus and"
    a = gemma(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    gemma.reset()
    b = gemma(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    assert a == b
    assert "Earth" in a
    assert gemma.kv_stats().tokens == len(gemma.tokenize(prompt)) + 5


def test_gemma_without_template_uses_its_family_template(gemma: Llama) -> None:
    prompt = format_chat_prompt(gemma.model, [{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<start_of_turn>user\nHi<end_of_turn>")


def test_gemma_clusters_only_its_full_attention_cache() -> None:
    prompt = "Notes. " + FILLER * 60 + "\nThe first three planets from the Sun are Mercury, Venus and"
    with Llama(str(gemma3_270m_path()), n_ctx=4096, verbose=False, kv_cluster=True, kv_cluster_ratio=0.25) as g:
        n_prompt = len(g.tokenize(prompt))
        out = g(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
        stats = g.kv_cluster_stats()
        assert stats["passes"] > 0 and stats["tokens"] == n_prompt + 5
        assert stats["cells"] <= 0.25 * stats["tokens"] + 64 + 1
        kv = g.kv_stats()
        assert kv.n_caches == 2
        # the sliding-window cache is not clustered: it keeps whole tokens, more cells than the clustered one
        assert kv.n_cells_used > stats["cells"]
        assert "Earth" in out


def test_gemma_clusters_beyond_its_cells_with_either_swa_cache() -> None:
    """A prompt longer than the physical cells: the clustered full-attention cache keeps up, and the sliding-window
    cache (window-sized, or full-sized with swa_full) recycles what its window no longer sees. swa_full changes
    only how much the sliding-window cache holds, never what attention sees, so clustering runs the same
    schedule either way. (The answers are not compared: attention over a window-sized or a full-sized cache
    rounds differently, and a near tie between two merge candidates can then go either way.)"""
    p = passkey_prompt(110, 0.3, seed=9)
    answers, stats = [], []
    for swa_full in (False, True):
        with Llama(str(gemma3_270m_path()), n_ctx=4096, verbose=False, kv_cluster=True, kv_cluster_ratio=0.25,
                   swa_full=swa_full) as g:
            assert len(g.tokenize(p.prompt)) > g.n_cells()
            answers.append(g(p.prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"])
            s = g.kv_cluster_stats()
            assert s["tokens"] == g.n_tokens and s["passes"] > 0
            stats.append((s["tokens"], s["cells"], s["passes"]))
    assert stats[0] == stats[1] and all(a.strip() for a in answers)


def test_gemma_small_clustered_context_keeps_room_beside_the_window() -> None:
    """llama.cpp sizes Gemma's sliding-window cache as min(cells, window + ubatch): a clustered context of fewer
    cells (R = 0.2 of 1100 tokens, a 256-token batch: 476) could not take its second batch. It gets at least
    window + ubatch cells, and the full-attention cache still merges."""
    with Llama(str(gemma3_270m_path()), n_ctx=1100, n_batch=256, verbose=False, kv_cluster=True,
               kv_cluster_ratio=0.2) as g:
        assert g.n_cells() == 512 + 256
        tokens = g.tokenize("The lantern by the harbour flickered while ships came in. " * 120)[:1060]
        g.eval(tokens)
        stats = g.kv_cluster_stats()
        assert len(tokens) == stats["tokens"] == 1060 and stats["cells"] <= g.n_cells() and stats["passes"] > 0
