"""Compressing a document by a re-read of it (Llama.kv_cluster_compress(reread=True), chelsea_gguf.reread): the
re-read's queries are kept apart from the attention window, the scoring is softmax attention over KVzip's subsample,
and a ranked compression keeps the positions it is told matter. On the real default model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import cell_positions, cluster_sizes
from chelsea_gguf.reread import _keys, _queries, subsample_attention

from test_merge_ranking import varied_text
from test_read_ahead import queries as window_queries

WINDOW = 16


def reference_attention(q: np.ndarray, k: np.ndarray, n_head: int, n_head_kv: int, n_pre: int,
                        scale: float) -> np.ndarray:
    """subsample_attention, one head and one query at a time."""
    rows, d = q.shape[0], q.shape[1] // n_head
    out = np.zeros((n_head_kv, len(k)))
    for h in range(n_head):
        kv = h // (n_head // n_head_kv)
        for r in range(rows):
            visible = n_pre + r + 1
            logits = k[:visible, kv * d:(kv + 1) * d] @ q[r, h * d:(h + 1) * d] * scale
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[kv, :visible] = np.maximum(out[kv, :visible], p)
    return out


@pytest.mark.parametrize(("n_head", "n_head_kv"), [(9, 3), (4, 1), (2, 2)])
def test_subsample_attention_matches_a_per_head_loop(n_head: int, n_head_kv: int) -> None:
    rng = np.random.default_rng(1)
    d, rows, n_pre = 8, 5, 7
    q = rng.normal(size=(rows, n_head * d)).astype(np.float32)
    k = rng.normal(size=(n_pre + rows, n_head_kv * d)).astype(np.float32)
    got = subsample_attention(q, k, n_head, n_head_kv, n_pre, 0.35)
    np.testing.assert_allclose(got, reference_attention(q, k, n_head, n_head_kv, n_pre, 0.35), rtol=1e-5, atol=1e-6)


def test_the_reread_keeps_its_queries_apart_from_the_attention_window(model_path: Path) -> None:
    """The same tokens at the same positions give the re-read the queries the window had, and the window keeps them."""
    with Llama(str(model_path), n_ctx=2048, n_threads=2, verbose=False, kv_cluster=True,
               kv_cluster_attn_window=WINDOW) as llm:
        tokens = llm.tokenize(varied_text(20))[:300]
        llm.eval(tokens)
        window = [window_queries(llm, layer, False) for layer in (0, 5)]
        assert window[0].shape[0] == WINDOW
        assert lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), 0, len(tokens) - WINDOW, -1)
        assert _queries(llm.ctx, 0) is None          # no re-read yet
        assert lib.chelsea_kv_cluster_reread(llm.ctx, 0, 64) == 0
        try:
            assert llm._decode(tokens[-WINDOW:], len(tokens) - WINDOW, logits_last=False) == 0
            reread = [_queries(llm.ctx, layer) for layer in (0, 5)]
        finally:
            assert lib.chelsea_kv_cluster_reread(llm.ctx, 0, 0) == 0
        assert _queries(llm.ctx, 0) is None
        after = [window_queries(llm, layer, False) for layer in (0, 5)]
    for w, r, a in zip(window, reread, after):
        assert r is not None
        got, scale = r
        assert got.shape == w.shape and 0.0 < scale < 1.0
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))
        np.testing.assert_array_equal(a, w)


def test_reread_arguments_are_checked(model_path: Path) -> None:
    with Llama(str(model_path), n_ctx=1024, n_threads=2, verbose=False, kv_cluster=True) as llm:
        llm.eval(llm.tokenize(varied_text(5)))
        n_ubatch = int(lib.llama_n_ubatch(llm.ctx))
        assert lib.chelsea_kv_cluster_reread(llm.ctx, 0, n_ubatch + 1) == -1
        assert lib.chelsea_kv_cluster_reread(llm.ctx, 0, -1) == -1
        assert lib.chelsea_kv_cluster_reread(llm.ctx, 0, 0) == 0      # stopping none is fine
        bad = ffi.new("float[]", [0.5, 1.5])
        assert lib.chelsea_kv_cluster_compress_ranked(llm.ctx, 0, bad, 2, 0.25) == -1
        good = ffi.new("float[]", [0.5, 1.0])
        assert lib.chelsea_kv_cluster_compress_ranked(llm.ctx, 0, good, 2, -1.0) == -1
        assert lib.chelsea_kv_cluster_compress_ranked(llm.ctx, 0, good, 2, float("nan")) == -1
    with Llama(str(model_path), n_ctx=1024, n_threads=2, verbose=False) as plain:
        assert lib.chelsea_kv_cluster_reread(plain.ctx, 0, 8) == -1
        with pytest.raises(RuntimeError, match="kv_cluster is off"):
            plain.kv_cluster_compress(reread=True)


def layer_keys(llm: Llama, layer: int, n_cells: int) -> np.ndarray:
    return _keys(llm.ctx, layer, n_cells)


def exact_share(before: np.ndarray, after: np.ndarray, sizes: list[list[float]], n_head_kv: int,
                positions: range) -> float:
    """The share of (token at `positions`, KV head) whose key before the compression some cell of that head still
    holds alone (cluster size 1). Each head compacts its own cells, so a cell's position says nothing of what a head
    keeps in it: the keys do."""
    d = before.shape[1] // n_head_kv
    kept = 0
    for h in range(n_head_kv):
        alone = after[[c for c in range(len(after)) if sizes[h][c] == 1.0], h * d:(h + 1) * d]
        for p in positions:
            kept += bool(np.any(np.all(alone == before[p, h * d:(h + 1) * d], axis=1)))
    return kept / (n_head_kv * len(positions))


@contextmanager
def fed(model_path: Path, n_ctx: int, ratio: float, n_sentences: int, n_tokens: int) -> Iterator[tuple[Llama, list[int]]]:
    """A clustered context at R = ratio holding the first n_tokens of varied text, uncompressed."""
    with Llama(str(model_path), n_ctx=n_ctx, n_threads=2, verbose=False, kv_cluster=True,
               kv_cluster_ratio=ratio) as llm:
        tokens = llm.tokenize(varied_text(n_sentences))[:n_tokens]
        llm.eval(tokens)
        yield llm, tokens


def test_a_ranked_compression_keeps_the_positions_that_matter_exact(model_path: Path) -> None:
    span = range(300, 360)
    results = {}
    for ranked in (False, True):
        with fed(model_path, 2048, 0.25, 60, 1000) as (llm, tokens):
            before = layer_keys(llm, 3, len(tokens))
            if ranked:
                importance = np.zeros(len(tokens), dtype=np.float32)
                importance[span.start:span.stop] = 1.0
                removed = lib.chelsea_kv_cluster_compress_ranked(
                    llm.ctx, 0, ffi.cast("float *", importance.ctypes.data), len(tokens), 4.0)
            else:
                removed = lib.chelsea_kv_cluster_compress(llm.ctx, 0)
            cells = llm.kv_cluster_stats()["cells"]
            n_head_kv = int(lib.llama_model_n_head_kv(llm.model))
            share = exact_share(before, layer_keys(llm, 3, cells), cluster_sizes(llm.ctx, 3, cells), n_head_kv, span)
            results[ranked] = (removed, share)
    assert results[True][0] == results[False][0] > 0            # the same budget
    assert results[True][1] >= 0.9                                # merged last: nearly all kept exact
    assert results[False][1] < 0.5


def test_compress_with_a_reread_leaves_the_context_as_a_compression_does(model_path: Path) -> None:
    results = {}
    for reread in (False, True):
        with fed(model_path, 4096, 0.2, 45, 700) as (llm, tokens):
            removed = llm.kv_cluster_compress(reread=reread)
            stats = llm.kv_cluster_stats()
            positions = sorted(p for p in cell_positions(llm.ctx) if p >= 0)
            logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm.ctx, -1), 4 * llm.n_vocab()),
                                   dtype=np.float32)
            assert list(llm.input_ids) == tokens
            assert positions[-1] == len(tokens) - 1                  # no cell of the re-read is left
            assert int(np.argmax(logits)) != 0 and np.isfinite(logits).all()
            text = llm.create_completion(tokens + llm.tokenize(" The", add_bos=False), max_tokens=4,
                                         temperature=0.0)["choices"][0]["text"]
            results[reread] = (removed, stats["cells"], stats["tokens"], text)
    assert results[True][:3] == results[False][:3]
    assert results[True][0] > 0 and results[True][2] == 700
    assert results[True][3]


def test_a_reread_needs_an_uncompressed_context_with_room(model_path: Path) -> None:
    with fed(model_path, 4096, 0.2, 30, 500) as (llm, tokens):
        llm.kv_cluster_compress()
        with pytest.raises(ValueError, match="already compressed"):
            llm.kv_cluster_compress(reread=True)
        assert list(llm.input_ids) == tokens
    # a context whose cells the document fills has no room for a chunk
    with Llama(str(model_path), n_ctx=1100, n_threads=2, verbose=False, kv_cluster=True, kv_cluster_ratio=0.5,
               n_batch=64) as llm:
        tokens = llm.tokenize(varied_text(80))[:llm.n_cells() - 8]
        llm.eval(tokens)
        assert llm.kv_cluster_stats()["cells"] == len(tokens)
        with pytest.raises(ValueError, match="free cells"):
            llm.kv_cluster_compress(reread=True)
