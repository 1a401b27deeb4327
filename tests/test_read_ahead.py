"""Reading a prompt's end first (kv_cluster_lookahead): a prompt that clustering must merge while it is fed is first
read at its last attn_window tokens, and the queries of those, turned to where the prompt has them, rank the merges
made before the prompt gets there, as the prompt's own last queries rank the compression after it. On the real
models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import ClusterOptions, cluster_sizes
from chelsea_gguf.kv import read_kv_stats
from chelsea_gguf.lookahead import READ_AGAIN_AFTER
from chelsea_gguf.models import gemma3_270m_path, smollm2_path

from test_merge_ranking import varied_text

QUESTION = " Question: how many steps from the lantern was the copper, and what was near the harbour? Answer:"
WINDOW = 8


def queries(llm: Llama, layer: int, read_ahead: bool) -> np.ndarray:
    """The prompt queries kept for sequence 0 in cache layer `layer`, [rows, n_embd_q]."""
    width = ffi.new("int32_t *")
    rows = lib.chelsea_kv_cluster_queries(llm.ctx, 0, layer, read_ahead, ffi.NULL, 0, width)
    assert rows >= 0
    out = ffi.new("float[]", max(1, rows * width[0]))
    lib.chelsea_kv_cluster_queries(llm.ctx, 0, layer, read_ahead, out, rows * width[0], ffi.NULL)
    return np.frombuffer(ffi.buffer(out, 4 * rows * width[0]), dtype=np.float32).reshape(rows, width[0]).copy()


# RoPE of llama's kind and of NeoX's. Gemma's keys (f16, rounded at other angles) and large activations leave a
# trace of a few percent by its global layers; without the turn, the queries differ by about their own size. A
# quantized K cache reads queries turned by a Hadamard rotation (llama.cpp's attn_rot_k), which RoPE must see through
# (without that, as without the turn); the layers after the first read keys rounded at other angles too
@pytest.mark.parametrize(("model", "type_k", "tolerance"),
                         [("smollm2", None, 0.01), ("gemma3-270m", None, 0.1), ("smollm2", "q8_0", 0.03)])
def test_read_ahead_queries_are_turned_to_where_the_prompt_has_them(model: str, type_k: str | None,
                                                                     tolerance: float) -> None:
    """Queries read at positions [0, n) and turned to [P, P + n) are those of the same tokens read at [P, P + n):
    attention inside the chunk sees relative positions only, so RoPE alone tells the two apart."""
    path = smollm2_path() if model == "smollm2" else gemma3_270m_path()
    at = 1500
    quantized = dict(type_k=type_k, flash_attn=True) if type_k else {}
    with Llama(str(path), n_ctx=4096, n_threads=2, verbose=False, kv_cluster=True,
               kv_cluster_attn_window=WINDOW, **quantized) as llm:
        tail = llm.tokenize(QUESTION, add_bos=False)
        n = len(tail)
        assert llm._decode(tail, 0, logits_last=False) == 0
        read_at_0 = [queries(llm, layer, False) for layer in (0, 2)]
        assert lib.chelsea_kv_cluster_read_ahead(llm.ctx, 0, at + n - WINDOW) == WINDOW
        turned = [queries(llm, layer, True) for layer in (0, 2)]
        llm.reset()
        assert llm._decode(tail, at, logits_last=False) == 0
        read_there = [queries(llm, layer, False) for layer in (0, 2)]
    for a, t, there in zip(read_at_0, turned, read_there):
        assert t.shape == there.shape == (WINDOW, there.shape[1])
        scale = float(np.abs(there).max())
        assert float(np.abs(t - there).max()) < tolerance * scale
        assert float(np.abs(a - there).max()) > 0.3 * scale


def sized_to(llm_tokens: int, **options: Any) -> dict[str, Any]:
    """A context the prompt fills, so that room for its chunks is made by merging before its end is read."""
    return dict(n_ctx=llm_tokens + 16, n_threads=2, verbose=False, kv_cluster=True, kv_cluster_ratio=0.25,
                kv_cluster_attn_window=WINDOW, **options)


def prompt_tokens(llm: Llama) -> list[int]:
    return llm.tokenize(varied_text(60))[:1100] + llm.tokenize(QUESTION, add_bos=False)


def merged(model_path: Path, n_ctx_room: int | None = None, **options: Any) -> tuple[list[list[float]], int]:
    """Cluster sizes of layer 0 after a prompt (with n_ctx_room, in a context of that size), and the rows of
    read-ahead queries still kept (-1: none can be)."""
    with Llama(str(model_path), n_ctx=64, verbose=False) as tok:
        tokens = prompt_tokens(tok)
    kwargs = sized_to(len(tokens), **options)
    if n_ctx_room is not None:
        kwargs["n_ctx"] = n_ctx_room
    with Llama(str(model_path), **kwargs) as llm:
        llm.eval(tokens)
        cells = llm.kv_cluster_stats()["cells"]
        return cluster_sizes(llm.ctx, 0, cells), lib.chelsea_kv_cluster_queries(llm.ctx, 0, 0, True, ffi.NULL, 0,
                                                                                ffi.NULL)


def test_lookahead_is_on_by_default() -> None:
    assert ClusterOptions().lookahead is True


def test_a_prompt_that_must_merge_is_read_at_its_end_first(model_path: Path) -> None:
    """Merged while it is fed, the prompt merges other cells with its end read first than without (where the room
    made for its chunks cannot read the score: as with the score off); once the prompt gets there the read-ahead
    queries are dropped (its own window holds them now)."""
    ahead, kept_after = merged(model_path)
    plain, _ = merged(model_path, kv_cluster_lookahead=False)
    blind, _ = merged(model_path, kv_cluster_attn_weight=0.0)
    assert ahead != plain and plain == blind
    assert kept_after == 0


def test_a_prompt_that_fits_reads_nothing_ahead(model_path: Path) -> None:
    """A prompt that fits its cells merges nothing before its end is read: the same merges as without lookahead."""
    ahead, _ = merged(model_path, n_ctx_room=8192)
    plain, _ = merged(model_path, n_ctx_room=8192, kv_cluster_lookahead=False)
    assert ahead == plain


def test_read_ahead_takes_its_cells_back(model_path: Path) -> None:
    with Llama(str(model_path), n_ctx=64, verbose=False) as tok:
        tokens = prompt_tokens(tok)
    with Llama(str(model_path), **sized_to(len(tokens))) as llm:
        assert llm.read_ahead(tokens, 0)
        assert read_kv_stats(llm.ctx).n_cells_used == 0 and llm.n_tokens == 0
        assert len(queries(llm, 0, True)) == WINDOW
        llm.drop_read_ahead()
        assert len(queries(llm, 0, True)) == 0
    with Llama(str(model_path), **sized_to(len(tokens), kv_cluster_lookahead=False)) as llm:
        assert not llm.read_ahead(tokens, 0)


def test_the_read_ahead_window_is_counted_in_the_kv_allocation(model_path: Path) -> None:
    """A second window of attn_window f32 queries per layer, allocated only with lookahead on."""
    def kv_bytes(**options: Any) -> int:
        with Llama(str(model_path), n_ctx=2048, verbose=False, kv_cluster=True, kv_cluster_attn_window=WINDOW,
                   **options) as llm:
            n_layer = int(lib.llama_model_n_layer(llm.model))
            n_embd = int(lib.llama_model_n_embd(llm.model))
            return read_kv_stats(llm.ctx).buffer_bytes, n_layer * n_embd * WINDOW * 4
    on, window_bytes = kv_bytes()
    off, _ = kv_bytes(kv_cluster_lookahead=False)
    assert on - off == window_bytes


def test_the_end_is_read_again_before_each_chunk_that_must_merge(model_path: Path) -> None:
    """Before a chunk whose room is made by merging, the end is read again after the text fed so far, in the
    attn_window cells the room made for the chunk before it left spare: nothing merges for that reading, its cells are
    taken back, and its queries replace the first reading's. The first layer's queries see only their own tokens, so
    they are the first reading's, turned to the same positions; a deeper layer's now read the text before them."""
    with Llama(str(model_path), n_ctx=64, verbose=False) as tok:
        tokens = prompt_tokens(tok)
    deep = 20
    with Llama(str(model_path), **sized_to(len(tokens), n_batch=128)) as llm:
        n_cells = llm.n_cells()
        assert llm.read_ahead(tokens, 0)
        first = [queries(llm, layer, True) for layer in (0, deep)]
        reads = 0
        last_read = 0
        for start in range(0, len(tokens), llm.n_batch):
            chunk = tokens[start:start + llm.n_batch]
            stats = llm.kv_cluster_stats()
            # READ_AGAIN_AFTER x attn_window tokens (128 here, one chunk) must come between two readings
            too_recent = llm.refresh_read_ahead(tokens, 0, start, len(chunk), start - READ_AGAIN_AFTER * WINDOW + 1)
            if start > 0 and llm.refresh_read_ahead(tokens, 0, start, len(chunk), last_read):
                assert not too_recent
                reads += 1
                last_read = start
                after = llm.kv_cluster_stats()
                assert (after["cells"], after["passes"], after["tokens"]) == (stats["cells"], stats["passes"], start)
                again = [queries(llm, layer, True) for layer in (0, deep)]
                scale = [float(np.abs(q).max()) for q in again]
                assert float(np.abs(again[0] - first[0]).max()) < 0.01 * scale[0]
                assert float(np.abs(again[1] - first[1]).max()) > 0.1 * scale[1]
            assert llm._decode(chunk, start, logits_last=False) == 0
            merged_for_it = llm.kv_cluster_stats()["passes"] > stats["passes"]
            if merged_for_it and start + 2 * llm.n_batch < len(tokens):
                assert n_cells - llm.kv_cluster_stats()["cells"] >= WINDOW   # the spare, left for the next reading
        assert reads >= 2
