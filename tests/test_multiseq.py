"""Clustering with several sequences in one context, and the cache operations that move cells between them.

chelsea_gguf.Llama drives sequence 0 only, so these tests build their contexts on its model with the C API
(tests/native_context.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import cell_positions, cluster_sizes
from chelsea_gguf.passkey import FILLER, passkey_prompt

from native_context import N_BATCH, NativeContext


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Llama]:
    with Llama(str(model_path), n_ctx=256, verbose=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def prompts(model: Llama) -> list[list[int]]:
    return [model.tokenize("Notes on the weather. " + FILLER * 40),
            model.tokenize(passkey_prompt(40, 0.5, seed=3).prompt)]


class SingleRun(NamedTuple):
    stats: dict[str, Any]
    continuation: list[int]
    last_logits: np.ndarray  # after the continuation's last token


def run_alone(model: Llama, prompts: list[list[int]], flash_attn: bool = True) -> list[SingleRun]:
    """Each prompt alone in a one-sequence context: compressed, then 8 greedy tokens."""
    runs = []
    for tokens in prompts:
        c = NativeContext(model, 2048, 1, True, flash_attn)
        try:
            c.feed(0, tokens)
            c.compress(0)
            stats = c.stats(0)
            runs.append(SingleRun(stats, c.greedy(0, 8), c.last_logits[0]))
        finally:
            c.close()
    return runs


@pytest.fixture(scope="module")
def single_runs(model: Llama, prompts: list[list[int]]) -> list[SingleRun]:
    return run_alone(model, prompts)


def test_per_sequence_streams_cluster_each_sequence_alone(model, prompts, single_runs) -> None:
    c = NativeContext(model, 2 * 2048, 2, unified=False)
    try:
        for seq, tokens in enumerate(prompts):
            c.feed(seq, tokens)
        for seq in (0, 1):
            c.compress(seq)
        for seq, (stats, continuation, last_logits) in enumerate(single_runs):
            got = c.stats(seq)
            assert {k: got[k] for k in ("tokens", "cells", "passes")} == {k: stats[k] for k in ("tokens", "cells", "passes")}
            assert c.greedy(seq, 8) == continuation
            # with several streams each layer adds its own bias to its mask; alone, one add makes every layer's
            # mask: the same cells and sizes must give the same logits
            assert np.array_equal(c.last_logits[seq], last_logits)
    finally:
        c.close()


def test_a_step_spanning_streams_gives_each_the_logits_of_its_own_step(model, prompts) -> None:
    # one ubatch holds both streams: each layer's mask is made per stream, and every KV head of a stream must get
    # that stream's mask (a repeat across streams and heads once handed head h of stream s another stream's)
    c = NativeContext(model, 2 * 2048, 2, unified=False, flash_attn=False)
    try:
        for seq, tokens in enumerate(prompts):
            c.feed(seq, tokens)
        for seq in (0, 1):
            c.compress(seq)
        fed = c.greedy_together([0, 1], 4)
        together = {seq: c.last_logits[seq] for seq in (0, 1)}
        for seq in (0, 1):
            c.next_pos[seq] -= 1
            lib.llama_memory_seq_rm(c.mem, seq, c.next_pos[seq], -1)
            c.feed(seq, fed[seq][-1:])
            assert np.array_equal(c.last_logits[seq], together[seq])
    finally:
        c.close()


def test_copied_sequence_shares_merged_cells_and_never_merges_them(model, prompts, single_runs) -> None:
    c = NativeContext(model, 2048, 2, unified=True)
    try:
        c.feed(0, prompts[0])
        c.compress(0)
        before = c.stats(0)
        n = before["cells"]
        sizes = cluster_sizes(c.ctx, 0, n)
        c.copy_sequence(0, 1)
        copied = c.stats(1)
        assert (copied["tokens"], copied["pos_merged_min"], copied["pos_merged_max"]) == \
               (before["tokens"], before["pos_merged_min"], before["pos_merged_max"])
        assert c.greedy(1, 8) == single_runs[0][1]
        c.feed(0, prompts[1][1:40])
        # shared cells stand for two sequences: neither may merge them
        assert c.compress(0) == 0 and c.compress(1) == 0
        assert cluster_sizes(c.ctx, 0, n) == sizes
        # once sequence 0 is gone, sequence 1 is alone again and clusters as before
        lib.llama_memory_seq_keep(c.mem, 1)
        assert lib.llama_memory_seq_pos_max(c.mem, 0) == -1
        assert c.compress(1) > 0
        after = c.stats(1)
        assert after["tokens"] == before["tokens"] + 8 and after["cells"] < n + 8
    finally:
        c.close()


def seq_state(c: NativeContext, seq: int) -> bytes:
    """llama_state_seq_get_data of one sequence: its K, V, cluster sizes and merge bookkeeping."""
    n = lib.llama_state_seq_get_size(c.ctx, seq)
    buf = ffi.new("uint8_t[]", n)
    assert lib.llama_state_seq_get_data(c.ctx, buf, n, seq) == n
    return bytes(ffi.buffer(buf, n))


def own_cells(c: NativeContext, seq: int) -> list[int]:
    return [i for i, pos in enumerate(cell_positions(c.ctx, seq)) if pos >= 0]


@pytest.mark.parametrize("flash_attn", [True, False], ids=["default", "transposed-v"])
def test_interleaved_sequences_in_one_unified_stream_cluster_as_if_alone(model, prompts, single_runs, flash_attn) -> None:
    if not flash_attn:
        single_runs = run_alone(model, prompts, flash_attn=False)
    c = NativeContext(model, 2 * 2048, 2, unified=True, flash_attn=flash_attn)
    try:
        # prompt batches alternate between the sequences, so their cells interleave in the one stream
        for start in range(0, max(map(len, prompts)), N_BATCH):
            for seq, tokens in enumerate(prompts):
                if start < len(tokens):
                    c.feed(seq, tokens[start:start + N_BATCH])
        cells = [own_cells(c, seq) for seq in (0, 1)]
        assert cells[0] != list(range(len(cells[0])))  # not packed from cell 0: the passes gather them
        # compressing one sequence leaves the other's K, V, sizes and bookkeeping byte for byte as they were
        other = seq_state(c, 1)
        assert c.compress(0) > 0
        assert seq_state(c, 1) == other
        assert c.compress(1) > 0
        cells = [own_cells(c, seq) for seq in (0, 1)]
        assert not set(cells[0]) & set(cells[1])
        for seq, (stats, _, _) in enumerate(single_runs):
            got = c.stats(seq)
            assert {k: got[k] for k in ("tokens", "cells", "passes")} == {k: stats[k] for k in ("tokens", "cells", "passes")}
            # the sequence's cells, and no other's, hold its tokens, in every layer and head
            for layer in (0, 15, 29):
                for head in cluster_sizes(c.ctx, layer, 2 * 2048, seq_id=seq):
                    assert sum(head[i] for i in cells[seq]) == got["tokens"]
        # llama.cpp's own attention kernels round differently when a sequence's cells lie elsewhere in the
        # stream (without clustering too: the second sequence's keys of layers 1.. differ by up to ~1 before any
        # merge), so merges of near-equal scores may differ and the continuations part after a few tokens
        for seq, (_, continuation, _) in enumerate(single_runs):
            assert c.greedy(seq, 8)[:4] == continuation[:4]
    finally:
        c.close()


def test_sequences_sharing_a_prefix_cluster_only_their_own_cells(model, prompts) -> None:
    c = NativeContext(model, 2048, 2, unified=True)
    try:
        c.feed(0, prompts[0])
        c.compress(0)
        c.copy_sequence(0, 1)
        shared = c.stats(1)
        c.feed(0, prompts[1][1:100])
        before = c.stats(0)
        positions = cell_positions(c.ctx, 0)
        sizes = cluster_sizes(c.ctx, 0, 2048)
        # sequence 1's own cells follow sequence 0's: it is gathered, the shared cells kept as they are
        c.feed(1, prompts[1][1:])
        assert c.compress(1) > 0
        assert c.stats(0) == before and cell_positions(c.ctx, 0) == positions
        assert [[s[i] for i in own_cells(c, 0)] for s in cluster_sizes(c.ctx, 0, 2048)] == \
               [[s[i] for i in own_cells(c, 0)] for s in sizes]
        after = c.stats(1)
        own = len(prompts[1]) - 1
        assert after["tokens"] == shared["tokens"] + own and after["cells"] < shared["cells"] + own
    finally:
        c.close()


def test_copy_that_would_split_merged_cells_is_refused(model, prompts) -> None:
    c = NativeContext(model, 2048, 2, unified=True)
    try:
        c.feed(0, prompts[0])
        c.compress(0)
        stats = c.stats(0)
        middle = (stats["pos_merged_min"] + stats["pos_merged_max"]) // 2
        c.copy_sequence(0, 1, middle, -1)
        assert lib.llama_memory_seq_pos_max(c.mem, 1) == -1  # nothing copied
        assert c.stats(0) == stats
    finally:
        c.close()


def test_cross_stream_copy_carries_cluster_sizes(model, prompts, single_runs) -> None:
    c = NativeContext(model, 2 * 2048, 2, unified=False)
    try:
        c.feed(0, prompts[0])
        c.compress(0)
        stats = c.stats(0)
        n = stats["cells"]
        c.copy_sequence(0, 1)  # a whole stream: the K/V copy happens at the next update
        assert c.greedy(1, 8) == single_runs[0][1]
        assert cluster_sizes(c.ctx, 0, n, seq_id=1) == cluster_sizes(c.ctx, 0, n, seq_id=0)
        assert c.stats(1)["tokens"] == stats["tokens"] + 8
    finally:
        c.close()


def test_inexact_position_moves_are_refused(model, prompts) -> None:
    c = NativeContext(model, 2048, 1, unified=True)
    try:
        c.feed(0, prompts[0])
        c.compress(0)
        stats = c.stats(0)
        positions = cell_positions(c.ctx)
        middle = (stats["pos_merged_min"] + stats["pos_merged_max"]) // 2
        lib.llama_memory_seq_div(c.mem, 0, -1, -1, 2)                       # self-extend style: not exact
        lib.llama_memory_seq_add(c.mem, 0, middle, -1, 5)                    # splits the merged region
        lib.llama_memory_seq_add(c.mem, 0, -1, -1, -stats["pos_merged_min"] - 1)  # would drop merged cells
        assert cell_positions(c.ctx) == positions
        assert c.stats(0) == stats
        lib.llama_memory_seq_add(c.mem, 0, middle + 10_000, -1, 5)           # past every cell: nothing moves
        lib.llama_memory_seq_add(c.mem, 0, -1, -1, 3)                        # the whole region: exact, done
        assert cell_positions(c.ctx)[:stats["cells"]] == [p + 3 for p in positions[:stats["cells"]]]
    finally:
        c.close()
