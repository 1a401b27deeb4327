"""Compressing a document by what reading it again attends to: ``Llama.kv_cluster_compress(reread=True)``.

A document compressed before its questions are known (read once, asked many times, or an early chat turn) has
nothing to rank its merges by: the attention score reads the document's own end, which asks for little of it, and
the merges lose most of what later questions ask (docs/benchmarks.md). KVzip's signal does better: the model is
asked to repeat the text, and the cells it attends to while it does are the ones it needs to rebuild it.

Here the text is read again after KVzip's repeat prompt, a chunk at a time, in cells after the document that are
freed after each chunk. The C side keeps each chunk's queries (``chelsea_kv_cluster_reread``). A cell's score is the
most attention any of those queries pays it, in any layer and head, with the softmax over KVzip's subsample: the
first cells, the chunk's own cells and the re-read cells before the query. The scores, ranked, rank the merges of
one compression (``chelsea_kv_cluster_compress_ranked``).

It costs one more reading of the document: 1.4-1.6x its prompt time, 83% of it in decodes. Measured on 35 needles
asked after their document at R = 0.2 (bench/reread_ablation.py): SmolLM2-135M keeps 25 against 17 with
``kv_cluster_attn_weight=0`` and 2 by default (the full cache 32); Gemma-3-270M 20-22 against 14 (the full cache 35).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import cell_positions, read_stats
from chelsea_gguf.lookahead import decode_seq0

# KVzip's prompts: the first chunk is asked for from the start, each later one from the OVERLAP tokens before it
REPEAT_FIRST = "\n\nRepeat the previous context exactly.\n"
REPEAT_LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8
# the first cells every re-read softmax includes, as KVzip's subsample does (attention sinks draw much of it)
N_SINK = 4
# tokens per chunk (the prototype's), and the weight of the importance in a pair's score: on 35 needles asked after
# their document, 0.25 and 0.1 keep 25, 0.5 23, 0 17 (bench/results/reread_ablation_63.md)
CHUNK_TOKENS = 448
WEIGHT = 0.25
# the fewest document tokens a chunk may hold when the free cells are short
MIN_CHUNK_TOKENS = 32


@dataclass(frozen=True)
class Document:
    """Sequence 0 of a context, as a re-read sees it: ``chelsea_gguf.Llama`` and the llama-cpp-python drop-in each
    make one (``Llama.kv_cluster_compress``, ``chelsea_gguf.compat.kv_cluster_compress``)."""

    ctx: Any                                 # struct llama_context *
    tokens: Sequence[int]                    # the sequence's tokens, at positions 0..
    bos: int                                 # the model's BOS token
    tokenize: Callable[[str], list[int]]     # text to token ids, without a BOS

    @classmethod
    def of(cls, llm: Any) -> "Document":
        """Of a ``chelsea_gguf.Llama``."""
        return cls(llm.ctx, list(llm.input_ids), llm.token_bos(), lambda text: llm.tokenize(text, add_bos=False))


def compress_reread(doc: Document, weight: float = WEIGHT, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Score the cells of sequence 0 by a re-read of its tokens (:func:`reread_scores`), then compress it to budget
    ranking merges by the scores' ranks (:func:`compress_ranked`); returns the cells removed."""
    scores = reread_scores(doc, chunk_tokens)
    if scores.size == 0:
        return 0
    return compress_ranked(doc, ranks(scores), weight)


def ranks(scores: np.ndarray) -> np.ndarray:
    """Each score's rank among them, in [0, 1]: what matters is which cells the re-read needs more, not by how much
    (one needle draws hundreds of times the attention of another in some heads)."""
    return scores.argsort(kind="stable").argsort().astype(np.float32) / max(1, scores.size - 1)


def reread_scores(doc: Document, chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """Per position of sequence 0, the most attention a re-read of its tokens pays the position's cell in any cache
    layer and KV head (the first N_SINK: 1). The context must hold its tokens uncompressed, with room after them for a
    chunk and its prompt; it is left as it was, but for the logits of the last token."""
    tokens = list(doc.tokens)
    n_doc = len(tokens)
    if n_doc == 0:
        return np.zeros(0, dtype=np.float32)
    ctx = doc.ctx
    stats = read_stats(ctx)
    if stats.cells != n_doc:
        raise ValueError(f"kv_cluster_compress(reread=True): the context is already compressed ({stats.cells} cells "
                         f"hold {stats.tokens} tokens); a re-read scores a document fed whole, before any merge: give "
                         f"it a context whose cells hold the document and a chunk (n_ctx, kv_cluster_ratio)")
    first = doc.tokenize(REPEAT_FIRST)
    later = doc.tokenize(REPEAT_LATER)
    newline = doc.tokenize("\n")
    overhead = max(len(first), len(later) + OVERLAP + len(newline))
    n_cells = int(lib.llama_n_ctx(ctx))
    room = min(n_cells - n_doc, int(lib.llama_n_ubatch(ctx)))
    chunk_tokens = min(chunk_tokens, room - overhead)
    if chunk_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(f"kv_cluster_compress(reread=True): {n_cells - n_doc} free cells after the "
                         f"{n_doc} tokens (n_ubatch {lib.llama_n_ubatch(ctx)}); a re-read needs "
                         f"{overhead + MIN_CHUNK_TOKENS} at least: give the context more cells (n_ctx)")
    body_start = 1 if tokens[0] == doc.bos else 0
    if lib.chelsea_kv_cluster_reread(ctx, 0, chunk_tokens + overhead) != 0:
        raise RuntimeError("kv_cluster_compress(reread=True): the re-read's query buffers could not be allocated")
    memory = lib.llama_get_memory(ctx)
    best = np.zeros(n_doc, dtype=np.float32)
    best[:min(N_SINK, n_doc)] = 1.0
    try:
        for c0 in range(body_start, n_doc, chunk_tokens):
            c1 = min(n_doc, c0 + chunk_tokens)
            prompt = first if c0 == body_start else later + tokens[c0 - OVERLAP:c0] + newline
            best[c0:c1] = np.maximum(best[c0:c1], _read_chunk(ctx, n_doc, prompt + tokens[c0:c1], c0, c1))
            lib.llama_memory_seq_rm(memory, 0, n_doc, -1)
    finally:
        lib.chelsea_kv_cluster_reread(ctx, 0, 0)
        lib.llama_memory_seq_rm(memory, 0, n_doc, -1)
    return best


def compress_ranked(doc: Document, importance: np.ndarray, weight: float = WEIGHT) -> int:
    """Compress sequence 0 to budget with merges ranked by importance[p] in [0, 1] of position p
    (``chelsea_kv_cluster_compress_ranked``), then decode its last token again, so that its logits are those of the
    compressed context; returns the cells removed."""
    importance = np.ascontiguousarray(importance, dtype=np.float32)
    removed = lib.chelsea_kv_cluster_compress_ranked(doc.ctx, 0, ffi.cast("float *", importance.ctypes.data),
                                                     importance.size, weight)
    if removed < 0:
        raise ValueError(f"compress_ranked: rejected (importance in [0, 1] and weight in [0, 100], got weight "
                         f"{weight}, importance {float(importance.min(initial=0)):g} .. "
                         f"{float(importance.max(initial=0)):g})")
    if doc.tokens:
        _restore_last_logits(doc.ctx, doc.tokens)
    return int(removed)


def _read_chunk(ctx: Any, n_doc: int, reread: Sequence[int], c0: int, c1: int) -> np.ndarray:
    """Decode `reread` after the n_doc tokens of sequence 0 and return, for positions [c0, c1), the most attention
    the re-read's queries pay each cell in any cache layer and KV head; the caller frees the re-read's cells."""
    _decode(ctx, reread, n_doc, logits_last=False)
    cell_of = {p: i for i, p in enumerate(cell_positions(ctx)) if p >= 0}
    sinks = [cell_of[p] for p in range(min(N_SINK, c0))]
    sel = np.array(sinks + [cell_of[p] for p in range(c0, c1)] +
                   [cell_of[p] for p in range(n_doc, n_doc + len(reread))])
    n_pre = len(sel) - len(reread)
    model = lib.llama_get_model(ctx)
    n_head = int(lib.llama_model_n_head(model))
    n_head_kv = int(lib.llama_model_n_head_kv(model))
    scores = np.zeros(c1 - c0, dtype=np.float32)
    layer = 0
    while (q := _queries(ctx, layer)) is not None:
        queries, scale = q
        keys = _keys(ctx, layer, int(sel.max()) + 1)[sel]
        attn = subsample_attention(queries, keys, n_head, n_head_kv, n_pre, scale)
        scores = np.maximum(scores, attn[:, len(sinks):len(sinks) + c1 - c0].max(axis=0))
        layer += 1
    return scores


def subsample_attention(queries: np.ndarray, keys: np.ndarray, n_head: int, n_head_kv: int, n_pre: int,
                        scale: float) -> np.ndarray:
    """Softmax attention of query rows [rows, n_head*d] over key rows [n_pre + rows, n_head_kv*d], where row r may
    read the first n_pre keys and the keys n_pre..n_pre+r (its own and the re-read before it); returns the most any
    query of a KV head's group pays each key, [n_head_kv, n_pre + rows]."""
    rows = queries.shape[0]
    d = queries.shape[1] // n_head
    group = n_head // n_head_kv
    q = queries.reshape(rows, n_head_kv, group, d).transpose(1, 2, 0, 3).reshape(n_head_kv, group * rows, d)
    k = keys.reshape(len(keys), n_head_kv, d).transpose(1, 2, 0)
    logits = (q @ k).reshape(n_head_kv, group, rows, len(keys)) * scale
    logits[..., n_pre:][..., np.triu(np.ones((rows, rows), dtype=bool), 1)] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return p.max(axis=(1, 2))


def _queries(ctx: object, layer: int) -> tuple[np.ndarray, float] | None:
    """The last re-read chunk's queries of cache layer `layer` [rows, n_embd_q] and their KQ scale; None past the
    last layer."""
    n_embd = ffi.new("int32_t *")
    scale = ffi.new("float *")
    rows = lib.chelsea_kv_cluster_reread_queries(ctx, 0, layer, ffi.NULL, 0, n_embd, scale)
    if rows < 0:
        return None
    out = np.empty((rows, n_embd[0]), dtype=np.float32)
    lib.chelsea_kv_cluster_reread_queries(ctx, 0, layer, ffi.cast("float *", out.ctypes.data), out.size, ffi.NULL,
                                          ffi.NULL)
    return out, float(scale[0])


def _keys(ctx: object, layer: int, n_cells: int) -> np.ndarray:
    """The keys of cache layer `layer`, cells [0, n_cells), as f32 [n_cells, n_embd_k]."""
    width = lib.chelsea_kv_keys(ctx, 0, layer, ffi.NULL, 0)
    out = np.empty((n_cells, width), dtype=np.float32)
    if lib.chelsea_kv_keys(ctx, 0, layer, ffi.cast("float *", out.ctypes.data), n_cells) != width:
        raise RuntimeError(f"chelsea_kv_keys: layer {layer} could not be read")
    return out


def _decode(ctx: Any, tokens: Sequence[int], base: int, logits_last: bool) -> None:
    """decode_seq0, raising if llama_decode fails."""
    rc = decode_seq0(ctx, tokens, base, logits_last)
    if rc != 0:
        raise RuntimeError(f"kv_cluster_compress(reread=True): llama_decode failed with code {rc} at position {base}")


def _restore_last_logits(ctx: Any, tokens: Sequence[int]) -> None:
    """The re-read's decodes replaced the last token's logits: decode it again (it is in the exact recent cells)."""
    n = len(tokens)
    if not lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, n - 1, -1):
        raise RuntimeError("kv_cluster_compress(reread=True): the last token's cell could not be read again")
    _decode(ctx, [tokens[-1]], n - 1, logits_last=True)
