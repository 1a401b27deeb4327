"""Reading a prompt's end first (``kv_cluster_lookahead``), for ``Llama.eval`` and the llama-cpp-python drop-in.

A prompt usually ends with what it asks. When clustering must merge while a prompt is fed (it does not fit the
cells), the merges made before its end is read cannot know what it asks; reading the end first lets them rank by
it (the attention score, ``kv_cluster_attn_weight``), as the compression after the prompt does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chelsea_gguf._lib import lib
from chelsea_gguf.cluster import ClusterOptions, read_stats


def read_ahead(ctx: Any, options: ClusterOptions | None, tokens: Sequence[int], base: int, n_batch: int) -> bool:
    """Before tokens fed into sequence 0 at positions base...: if clustering must merge while they are fed, decode
    their last attn_window tokens (after their first, the BOS, when base is 0) at positions base..., keep those
    queries (the C side turns them to where the prompt has them) and take their cells back. True if the queries
    are kept: they are dropped once the prompt reaches them, or by :func:`drop`."""
    if options is None or not options.lookahead or options.attn_weight <= 0:
        return False
    window = options.attn_window
    ahead = (list(tokens[:1]) if base == 0 else []) + list(tokens[-window:])
    if len(tokens) <= len(ahead) or len(ahead) > n_batch:
        return False
    if read_stats(ctx).cells + len(tokens) <= int(lib.llama_n_ctx(ctx)):
        return False   # it fits: the compression after it reads the prompt's own end
    batch = lib.llama_batch_init(len(ahead), 0, 1)
    try:
        for i, tok in enumerate(ahead):
            batch.token[i] = tok
            batch.pos[i] = base + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        batch.n_tokens = len(ahead)
        decoded = lib.llama_decode(ctx, batch) == 0
    finally:
        lib.llama_batch_free(batch)
    kept = decoded and lib.chelsea_kv_cluster_read_ahead(ctx, 0, base + len(tokens) - window) > 0
    if not lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, base, -1):
        raise RuntimeError(f"could not take back the {len(ahead)} tokens read ahead of the prompt at position {base}")
    return kept


def drop(ctx: Any) -> None:
    """Forget the queries read_ahead kept (a prompt fed to its end drops them by itself)."""
    lib.chelsea_kv_cluster_read_ahead(ctx, 0, -1)
