"""Eviction by a score of each cell's keys, done in llama.cpp: KeyDiff and Knorm at Chelsea's cells.

Before each prompt chunk that does not fit the cells allocated (the same as Chelsea's at that R), every held
cell except the ``n_sink`` first tokens and the ``n_recent`` last ones is scored from its cached keys (read with
``chelsea_kv_keys``, after RoPE, every layer that has K/V), and the lowest-scored cells' positions are removed
with ``llama_memory_seq_rm``: only as many as the chunk lacks room for. Kept tokens keep their positions, as with
the streaming baseline. A llama.cpp cell is shared by every layer and KV head, so a cell's score is the mean
over (layer, KV head) of the per-head score:

* KeyDiff (Park et al., arXiv 2504.15364; kvpress ``KeyDiffPress``): minus the cosine similarity of the key
  to the head's anchor, the mean of the head's normalised keys over the held cells: distinctive keys stay.
* Knorm (kvpress ``KnormPress``): minus the key's L2 norm, so the highest-norm keys go; the norm is taken
  relative to the head's mean norm over the held cells, so every (layer, head) weighs the same in the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import cell_positions

EPS = 1e-6
KeyScore = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


def _per_head(keys: np.ndarray, n_head_kv: int) -> np.ndarray:
    """[n_layer, n_cells, n_embd_k] -> [n_layer, n_cells, n_head_kv, head_dim]."""
    n_layer, n_cells, n_embd = keys.shape
    if n_embd % n_head_kv:
        raise ValueError(f"key width {n_embd} is not a multiple of {n_head_kv} KV heads")
    return keys.reshape(n_layer, n_cells, n_head_kv, n_embd // n_head_kv)


def keydiff_scores(keys: np.ndarray, n_head_kv: int, held: np.ndarray) -> np.ndarray:
    """Score per cell (higher: keep): minus the cosine of each key to its head's anchor (the mean of the held
    cells' normalised keys), averaged over layers and KV heads. keys [n_layer, n_cells, n_embd_k]; held: bool
    [n_cells], the cells that hold a token (the anchor's members)."""
    k = _per_head(keys.astype(np.float32, copy=False), n_head_kv)
    unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), EPS)
    anchor = unit[:, held].mean(axis=1, keepdims=True)
    anchor /= np.maximum(np.linalg.norm(anchor, axis=-1, keepdims=True), EPS)
    cosine = (unit * anchor).sum(axis=-1)                 # [n_layer, n_cells, n_head_kv]
    return -cosine.mean(axis=(0, 2))


def knorm_scores(keys: np.ndarray, n_head_kv: int, held: np.ndarray) -> np.ndarray:
    """Score per cell (higher: keep): minus the key's L2 norm relative to its head's mean norm over the held
    cells, averaged over layers and KV heads."""
    norms = np.linalg.norm(_per_head(keys.astype(np.float32, copy=False), n_head_kv), axis=-1)
    rel = norms / np.maximum(norms[:, held].mean(axis=1, keepdims=True), EPS)
    return -rel.mean(axis=(0, 2))


SCORES: dict[str, KeyScore] = {"keydiff": keydiff_scores, "knorm": knorm_scores}


def cells_to_evict(scores: np.ndarray, positions: np.ndarray, n_past: int, n_evict: int, n_sink: int,
                   n_recent: int) -> np.ndarray:
    """Positions of the n_evict lowest-scored held cells outside the sinks and the recent window (ties: the
    older first)."""
    candidates = np.flatnonzero((positions >= n_sink) & (positions < n_past - n_recent))
    if n_evict > len(candidates):
        raise RuntimeError(f"{n_evict} cells to evict but only {len(candidates)} may go "
                           f"({n_sink} sinks and {n_recent} recent are kept)")
    order = np.lexsort((positions[candidates], scores[candidates]))
    return np.sort(positions[candidates[order[:n_evict]]])


MAX_KEY_WIDTH = 1 << 16   # floats: wider than any model's n_embd_k


def read_keys(ctx: object, n_cells: int) -> np.ndarray:
    """Keys of every cache layer with K/V for cells [0, n_cells) of sequence 0: [n_layer, n_cells, n_embd_k]."""
    probe = ffi.new("float[]", MAX_KEY_WIDTH)
    layers: list[np.ndarray] = []
    while (n_embd := lib.chelsea_kv_keys(ctx, 0, len(layers), probe, 1)) > 0:   # the row width, one cell read
        buf = ffi.new("float[]", n_embd * n_cells)
        if lib.chelsea_kv_keys(ctx, 0, len(layers), buf, n_cells) != n_embd:
            raise RuntimeError(f"chelsea_kv_keys: layer {len(layers)} changed width")
        layers.append(np.frombuffer(ffi.buffer(buf), dtype=np.float32).reshape(n_cells, n_embd).copy())
    if not layers:
        raise RuntimeError("chelsea_kv_keys returned no layer")
    return np.stack(layers)


@dataclass
class KeyScoredEviction:
    """Evicts the lowest-scored cells (see the module docstring) so that each chunk fits `capacity` cells."""

    capacity: int              # physical cells the sequence may hold
    n_head_kv: int
    score: str = "keydiff"     # a key of SCORES
    n_sink: int = 16
    n_recent: int = 64
    name: str = "keydiff"
    evictions: int = 0         # make_room calls that evicted
    seconds: float = 0.0       # spent scoring and evicting

    def max_chunk(self) -> int:
        return max(1, min((self.capacity - self.n_sink) // 2, self.capacity - self.n_sink - self.n_recent))

    def make_room(self, session: "object", n_new: int) -> None:
        import time

        ctx, mem, n_past = session.ctx, session.mem, session.n_past  # type: ignore[attr-defined]
        positions = np.asarray(cell_positions(ctx), dtype=np.int64)
        held = positions >= 0
        over = int(held.sum()) + n_new - self.capacity
        if over <= 0:
            return
        t0 = time.perf_counter()
        scores = SCORES[self.score](read_keys(ctx, len(positions)), self.n_head_kv, held)
        for p in cells_to_evict(scores, positions, n_past, over, self.n_sink, self.n_recent):
            if not lib.llama_memory_seq_rm(mem, 0, int(p), int(p) + 1):
                raise RuntimeError(f"seq_rm [{p}, {p + 1}) refused")
        self.evictions += 1
        self.seconds += time.perf_counter() - t0
