"""A clustered llama_context driven through the C API, for tests that need several sequences or context
parameters that ``chelsea_gguf.Llama`` does not expose (it drives sequence 0 only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import ClusterOptions, enable, read_stats

DEFAULT_OPTIONS = ClusterOptions(ratio=0.25)
N_BATCH = 512


def decode(ctx: Any, batch: Any, seq: int, tokens: list[int], pos: int) -> int:
    """Decode tokens into sequence seq at positions pos, pos + 1, ... (N_BATCH at a time, logits for the last of
    each batch) through the C API alone; returns the position after the last."""
    for start in range(0, len(tokens), N_BATCH):
        chunk = tokens[start:start + N_BATCH]
        for i, tok in enumerate(chunk):
            batch.token[i] = tok
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == len(chunk) - 1
        batch.n_tokens = len(chunk)
        assert lib.llama_decode(ctx, batch) == 0
        pos += len(chunk)
    return pos


class NativeContext:
    """A llama_context with n_seq_max sequences on a loaded model, clustered, fed token by token list.

    n_outputs_max = 1 reserves logits for one token per batch only (llama.cpp's default is one per batch
    token), so that the compute buffers hold little besides attention."""

    def __init__(self, llm: Llama, n_ctx: int, n_seq_max: int, unified: bool, flash_attn: bool = True,
                 options: ClusterOptions = DEFAULT_OPTIONS, n_outputs_max: int = 0) -> None:
        params = lib.llama_context_default_params()
        if not flash_attn:
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # V is stored transposed
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = n_seq_max
        params.kv_unified = unified
        params.n_outputs_max = n_outputs_max
        params.n_threads = params.n_threads_batch = 2
        self.ctx = lib.llama_init_from_model(llm.model, params)
        assert self.ctx != ffi.NULL
        enable(self.ctx, options)
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(N_BATCH, 0, n_seq_max)
        self.n_vocab = llm.n_vocab()
        self.next_pos: dict[int, int] = {}
        self.last_logits: dict[int, np.ndarray] = {}  # of each sequence's last fed token

    def close(self) -> None:
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)

    def feed(self, seq: int, tokens: list[int]) -> None:
        self.next_pos[seq] = decode(self.ctx, self.batch, seq, tokens, self.next_pos.get(seq, 0))
        self.last_logits[seq] = self.logits_at(-1)

    def logits_at(self, i: int) -> np.ndarray:
        """A copy of the logits of output i of the last batch (-1: its last)."""
        return np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(self.ctx, i), 4 * self.n_vocab),
                             dtype=np.float32).copy()

    def copy_sequence(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)
        if lib.llama_memory_seq_pos_max(self.mem, dst) >= 0:
            self.next_pos[dst] = self.next_pos[src]
            self.last_logits[dst] = self.last_logits[src]

    def greedy(self, seq: int, n: int) -> list[int]:
        """n greedy tokens continuing seq."""
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.last_logits[seq])))
            self.feed(seq, out[-1:])
        return out

    def greedy_together(self, seqs: list[int], n: int) -> dict[int, list[int]]:
        """n greedy tokens continuing each of seqs, one batch per step holding a token of every sequence (with
        several streams, a ubatch that spans them)."""
        out: dict[int, list[int]] = {seq: [] for seq in seqs}
        for _ in range(n):
            for i, seq in enumerate(seqs):
                out[seq].append(int(np.argmax(self.last_logits[seq])))
                self.batch.token[i] = out[seq][-1]
                self.batch.pos[i] = self.next_pos[seq]
                self.batch.n_seq_id[i] = 1
                self.batch.seq_id[i][0] = seq
                self.batch.logits[i] = True
            self.batch.n_tokens = len(seqs)
            assert lib.llama_decode(self.ctx, self.batch) == 0
            for i, seq in enumerate(seqs):
                self.next_pos[seq] += 1
                self.last_logits[seq] = self.logits_at(i)
        return out

    def compress(self, seq: int) -> int:
        return int(lib.chelsea_kv_cluster_compress(self.ctx, seq))

    def stats(self, seq: int) -> dict[str, Any]:
        return read_stats(self.ctx, seq).as_dict()
