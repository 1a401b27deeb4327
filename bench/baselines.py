"""Per-token logits and the eviction baselines Chelsea is compared against (benchmark code, not the package's).

``Session`` feeds one sequence into a ``Llama``'s context in chunks, straight through ``llama_decode``, and
returns the logits of every position asked for (``Llama.eval`` keeps only the last one). An optional
eviction policy runs before each chunk, on a context allocated with the same number of physical cells as
Chelsea would use:

* ``StreamingEviction`` -- StreamingLLM (Xiao et al., 2023): the first ``n_sink`` tokens plus the most
  recent window; the oldest non-sink cells are dropped with ``llama_memory_seq_rm``. Positions are **not**
  re-indexed: kept tokens keep their original RoPE positions, exactly as Chelsea's clustered cells do, so
  the two differ only in what they keep (the contexts benchmarked stay inside the models' trained length).
* ``ContextShift`` -- llama.cpp's own context shift (``tools/main``): when the cache is full, keep
  ``n_keep`` tokens, discard half of the rest (``seq_rm``) and shift the remainder down (``seq_add``), so
  positions are re-indexed and stay below the allocated size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.llama import Llama


class EvictionPolicy(Protocol):
    name: str
    capacity: int        # physical cells the sequence may hold

    def max_chunk(self) -> int:
        """Most tokens one decode may add (the cache must be able to hold them next to what it keeps)."""
        ...

    def make_room(self, session: "Session", n_new: int) -> None:
        """Evict so that n_new more tokens fit."""
        ...


@dataclass
class StreamingEviction:
    """Sinks + recent window, original positions kept (see module docstring)."""

    capacity: int        # physical cells the sequence may hold
    n_sink: int = 16
    name: str = "streaming"
    lo: int = -1         # first kept position after the sinks (-1: nothing evicted yet)

    def max_chunk(self) -> int:
        return max(1, (self.capacity - self.n_sink) // 2)

    def make_room(self, session: "Session", n_new: int) -> None:
        lo = self.n_sink if self.lo < 0 else self.lo
        held = min(session.n_past, self.n_sink) + max(0, session.n_past - lo)
        over = held + n_new - self.capacity
        if over <= 0:
            return
        if not lib.llama_memory_seq_rm(session.mem, 0, lo, lo + over):
            raise RuntimeError(f"seq_rm [{lo}, {lo + over}) refused")
        self.lo = lo + over


@dataclass
class ContextShift:
    """llama.cpp's context shift: keep n_keep, discard half of the rest, shift positions down."""

    capacity: int
    n_keep: int = 16
    name: str = "context shift"

    def max_chunk(self) -> int:
        return max(1, (self.capacity - self.n_keep) // 2)

    def make_room(self, session: "Session", n_new: int) -> None:
        # the loop of llama.cpp tools/main/main.cpp (n_past + batch > n_ctx), repeated if one halving is short
        while session.n_past + n_new > self.capacity:
            n_left = session.n_past - self.n_keep
            n_discard = n_left // 2
            if n_discard <= 0:
                raise RuntimeError(f"context shift cannot make room for {n_new} tokens")
            if not lib.llama_memory_seq_rm(session.mem, 0, self.n_keep, self.n_keep + n_discard):
                raise RuntimeError("seq_rm refused during context shift")
            lib.llama_memory_seq_add(session.mem, 0, self.n_keep + n_discard, session.n_past, -n_discard)
            session.n_past -= n_discard


class Session:
    """One sequence fed chunk by chunk into llm's context (cleared first), with per-token logits."""

    def __init__(self, llm: Llama, policy: EvictionPolicy | None = None, chunk: int | None = None,
                 budget: Callable[[int], int] | None = None) -> None:
        llm.reset()
        self.llm = llm
        self.budget = budget   # cells a policy keeps once the prompt is in, for the tokens seen (None: capacity)
        self.ctx = llm.ctx
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = llm.n_vocab()
        self.policy = policy
        size = chunk or llm.n_batch
        if policy is not None:
            size = min(size, policy.max_chunk())
        self.chunk = max(1, min(size, llm.n_batch))
        self.batch = lib.llama_batch_init(self.chunk, 0, 1)
        self.n_past = 0      # next position (the policy may lower it when it re-indexes)
        self.n_fed = 0       # tokens fed so far

    def close(self) -> None:
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def feed(self, tokens: Sequence[int], logits_from: int | None = None) -> np.ndarray:
        """Append tokens; return float32 logits [rows, n_vocab] for tokens[logits_from:] (all rows from
        that index on), or for the last token only when logits_from is None."""
        n = len(tokens)
        first = n - 1 if logits_from is None else max(0, logits_from)
        out = np.empty((max(0, n - first), self.n_vocab), dtype=np.float32)
        # as Llama.eval: a clustered cache that must merge while the prompt is fed reads the prompt's end first.
        # Not when the logits of every position are asked for: they stand in for generated tokens (quality_kld.py),
        # whose future a real generation does not know, and the read-ahead would let it choose what stays
        read_ahead = self.policy is None and logits_from is None and self.llm.read_ahead(tokens, self.n_past)
        try:
            self._feed(tokens, first, out, read_ahead)
        finally:
            if read_ahead:
                self.llm.drop_read_ahead()
        return out

    def _feed(self, tokens: Sequence[int], first: int, out: np.ndarray, read_ahead: bool = False) -> None:
        n = len(tokens)
        base = last_read = self.n_past
        for start in range(0, n, self.chunk):
            part = tokens[start:start + self.chunk]
            if self.policy is not None:
                self.policy.make_room(self, len(part))
            if read_ahead and start > 0 and self.llm.refresh_read_ahead(tokens, base, self.n_past, len(part), last_read):
                last_read = self.n_past
            b = self.batch
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if start + i >= first else 0
            b.n_tokens = len(part)
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at position {self.n_past} "
                                   f"({self.llm.n_cells()} cells, policy {getattr(self.policy, 'name', None)})")
            for i in range(len(part)):
                if start + i >= first:
                    ptr = lib.llama_get_logits_ith(self.ctx, i)
                    out[start + i - first] = np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
            self.n_past += len(part)
            self.n_fed += len(part)

    def settle(self) -> None:
        """After a prompt: compress a clustered cache to its budget, as ``Llama.generate_tokens`` does; a policy
        with a budget evicts down to it (the cells Chelsea keeps once it compresses), so that both generate from
        the same number of cells."""
        if self.llm.kv_cluster_options is not None:
            lib.chelsea_kv_cluster_compress(self.ctx, 0)
        elif self.policy is not None and self.budget is not None:
            # room for (capacity - budget) new tokens leaves at most `budget` cells held
            self.policy.make_room(self, max(0, self.policy.capacity - self.budget(self.n_fed)))

    def cells_used(self) -> int:
        return self.llm.kv_stats().n_cells_used

    def greedy(self, prompt: Sequence[int], n_gen: int) -> list[int]:
        """Feed the prompt, then generate up to n_gen tokens greedily (argmax), stopping at end-of-generation."""
        logits = self.feed(prompt)[-1]
        self.settle()
        out: list[int] = []
        vocab = lib.llama_model_get_vocab(self.llm.model)
        for _ in range(n_gen):
            tok = int(np.argmax(logits))
            if lib.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            logits = self.feed([tok])[-1]
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (KL divergence of nearly equal distributions needs the precision)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
