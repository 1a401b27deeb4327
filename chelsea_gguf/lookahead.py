"""Reading a prompt's end first (``kv_cluster_lookahead``), for ``Llama.eval`` and the llama-cpp-python drop-in.

A prompt usually ends with what it asks. When clustering must merge while a prompt is fed (it does not fit the
cells), the merges made before its end is read cannot know what it asks; reading the end first lets them rank by
it (the attention score, ``kv_cluster_attn_weight``), as the compression after the prompt does.

Read alone, the end asks in general terms: the queries of its deeper layers, which would point at a needle (a
number, a name) in the text before them, have not seen that text. So before each later chunk whose room must be made
by merging, the end is read again after the text fed so far (:func:`refresh`), in the cells the C side keeps spare
for it, and the merges that make the room rank by what it asks of that text. It is read again once at least
READ_AGAIN_AFTER times attn_window tokens have been fed since it was last read, so the readings put at most about
1/READ_AGAIN_AFTER more tokens through the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chelsea_gguf._lib import lib
from chelsea_gguf.cluster import ClusterOptions, read_stats

# measured on the 63 varied-text needles (R = 0.2, n_batch 256, docs/method.md): reading the end again before every
# other chunk that merges retrieved as many as before every one (49 and 48 of the same 52), at half the time
READ_AGAIN_AFTER = 16


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
    return _read_end(ctx, ahead, base, base + len(tokens) - window)


def refresh(ctx: Any, options: ClusterOptions, tokens: Sequence[int], base: int, n_past: int, n_next: int,
            last_read: int) -> bool:
    """Between two chunks of tokens whose end :func:`read_ahead` kept (fed at positions base..., the sequence at
    n_past tokens, the end last read when it was at last_read): when the next n_next must merge to fit and
    READ_AGAIN_AFTER x attn_window tokens came since, read the end again at positions n_past..., after the text fed so
    far, keep its queries in place of the earlier ones and take its cells back. True if read; False when the next
    chunk fits, when the end was read too recently, or when no attn_window cells are free to read it in without
    merging first."""
    window = options.attn_window
    if n_past - last_read < READ_AGAIN_AFTER * window or len(tokens) <= window:
        return False
    n_cells = int(lib.llama_n_ctx(ctx))
    used = read_stats(ctx).cells
    # the C side merges before the next chunk when it and attn_window spare cells do not fit (chelsea_schedule)
    if used + n_next + window <= n_cells or used + window > n_cells:
        return False
    return _read_end(ctx, list(tokens[-window:]), n_past, base + len(tokens) - window)


def decode_seq0(ctx: Any, tokens: Sequence[int], pos0: int, logits_last: bool = False) -> int:
    """llama_decode of tokens into sequence 0 at positions pos0..., in a batch of their own (the readings ahead here
    and chelsea_gguf.reread's, beside the caller's prompt); its return code."""
    batch = lib.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if logits_last and i == len(tokens) - 1 else 0
        batch.n_tokens = len(tokens)
        return int(lib.llama_decode(ctx, batch))
    finally:
        lib.llama_batch_free(batch)


def _read_end(ctx: Any, ahead: list[int], pos0: int, pos_first: int) -> bool:
    """Decodes `ahead` into sequence 0 at positions pos0..., keeps the queries of its last attn_window tokens turned
    to positions pos_first..., and takes its cells back."""
    decoded = decode_seq0(ctx, ahead, pos0) == 0
    kept = decoded and lib.chelsea_kv_cluster_read_ahead(ctx, 0, pos_first) > 0
    if not lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, pos0, -1):
        raise RuntimeError(f"could not take back the {len(ahead)} tokens read ahead of the prompt at position {pos0}")
    return kept


def drop(ctx: Any) -> None:
    """Forget the queries read_ahead kept (a prompt fed to its end drops them by itself)."""
    lib.chelsea_kv_cluster_read_ahead(ctx, 0, -1)
