"""Soak test of online KV-cache clustering: thousands of decode steps, hundreds of compression passes.

One context on the default model generates token by token (temperature > 0, fixed seed, end-of-generation
tokens fed back like any other) with a short compression interval and a small matching chunk, so the cache
is compressed every few tokens. Every CHECK_EVERY steps the invariants are read from the native cache:
the tokens represented equal the tokens evaluated, the cells stay within budget + interval, packed low with
strictly increasing positions and exact sinks and recent tokens, every (layer, KV head) has sizes >= 1 that
sum to the tokens represented, the KV allocation never changes, and the process RSS does not grow (after a
warm-up). Now and then the uncompressed tail is removed with seq_rm and evaluated again.

CHELSEA_SOAK_STEPS overrides the number of decode steps (scripts/sanitize.sh runs fewer under ASan, where
the RSS bound is also skipped: ASan's quarantine holds freed memory on purpose).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import lib
from chelsea_gguf.cluster import cell_positions, cluster_sizes
from chelsea_gguf.passkey import FILLER
from chelsea_gguf.sampling import Sampler, SamplingParams

from native_context import N_BATCH, decode

pytestmark = pytest.mark.slow

STEPS = int(os.environ.get("CHELSEA_SOAK_STEPS", "2000"))
CHECK_EVERY = 100
ROLLBACK_EVERY = 500        # remove the last few tokens (uncompressed tail) and evaluate them again
WARMUP_STEPS = min(500, STEPS // 4)
RSS_GROWTH_LIMIT_MIB = 20.0
RATIO, INTERVAL, CHUNK, SINKS, RECENT = 0.2, 8, 16, 16, 64
SANITIZED = os.environ.get("CHELSEA_SANITIZE") == "1"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def check_invariants(llm: Llama, n_layers: int, buffer_bytes: int, n_cells_alloc: int) -> dict:
    stats = llm.kv_cluster_stats()
    tokens, n = stats["tokens"], stats["cells"]
    assert tokens == llm.n_tokens, "tokens represented != tokens evaluated"
    kv = llm.kv_stats()
    assert kv.tokens == tokens
    assert kv.buffer_bytes == buffer_bytes and kv.n_cells == n_cells_alloc, "the KV allocation changed"
    # within budget + interval (+1: the token just decoded), packed low
    budget = max(math.ceil(RATIO * tokens), SINKS + RECENT + 2)
    assert n <= budget + INTERVAL + 1, f"{n} cells for {tokens} tokens (budget {budget} + {INTERVAL})"
    assert kv.n_cells_used == kv.n_cells_span == n
    pos = cell_positions(llm.ctx)
    assert len(pos) == n_cells_alloc
    assert all(p == -1 for p in pos[n:])
    assert pos[0] >= 0 and all(a < b for a, b in zip(pos[:n], pos[1:n])), "positions not strictly increasing"
    assert pos[:SINKS] == list(range(SINKS)), "sinks moved"
    assert pos[n - RECENT:n] == list(range(tokens - RECENT, tokens)), "recent tokens moved"
    assert pos[n - 1] == tokens - 1
    for layer in range(n_layers):
        for head in cluster_sizes(llm.ctx, layer, n_cells_alloc):
            live = head[:n]
            assert min(live) >= 1.0, f"layer {layer}: a cluster size below 1"
            assert sum(live) == pytest.approx(tokens, abs=1e-3), f"layer {layer}: sizes do not sum to tokens"
            assert all(s == 1.0 for s in head[n:]), f"layer {layer}: stale sizes beyond the used cells"
            assert all(s == 1.0 for s in live[:SINKS]) and all(s == 1.0 for s in live[n - RECENT:])
    return stats


def test_soak_many_compressions(model_path: Path) -> None:
    prompt = "Notes on the weather. " + FILLER * 8
    # one thread: on a loaded machine, spinning worker threads that lose their core slow decoding tenfold
    with Llama(str(model_path), n_ctx=4096, n_batch=256, n_threads=1, seed=7, verbose=False, kv_cluster=True,
               kv_cluster_ratio=RATIO, kv_cluster_interval=INTERVAL, kv_cluster_chunk=CHUNK,
               kv_cluster_sinks=SINKS, kv_cluster_recent=RECENT) as llm:
        prompt_tokens = llm.tokenize(prompt)
        assert len(prompt_tokens) + STEPS + 8 <= llm.n_ctx()
        kv0 = llm.kv_stats()
        n_layers = lib.llama_model_n_layer(llm.model)
        buffer_bytes, n_cells_alloc = kv0.buffer_bytes, kv0.n_cells
        assert n_cells_alloc < llm.n_ctx()   # a real reduced allocation

        sampler = Sampler(SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234), llm.n_vocab())
        rng = random.Random(99)
        batch = lib.llama_batch_init(N_BATCH, 0, 1)
        try:
            llm.eval(prompt_tokens)
            llm.kv_cluster_compress()   # as generation does: start within budget
            check_invariants(llm, n_layers, buffer_bytes, n_cells_alloc)
            rss_start = None
            rss_peak = 0.0
            rollbacks = 0
            stats = None
            for step in range(1, STEPS + 1):
                token = sampler.sample(llm.ctx)
                llm.eval([token])
                if step % ROLLBACK_EVERY == 0:
                    # the tail is within the recent window, never merged: removal must succeed and be exact
                    # (through the C API: evaluated again at the same positions, the tokens of llm stay right)
                    k = rng.randint(1, 6)
                    tail = list(llm.input_ids[-k:])
                    mem = lib.llama_get_memory(llm.ctx)
                    before = llm.kv_cluster_stats()
                    assert lib.llama_memory_seq_rm(mem, 0, llm.n_tokens - k, -1)
                    after = llm.kv_cluster_stats()
                    assert after["tokens"] == before["tokens"] - k and after["cells"] == before["cells"] - k
                    decode(llm.ctx, batch, 0, tail, llm.n_tokens - k)
                    rollbacks += 1
                if step % CHECK_EVERY == 0 or step == STEPS:
                    stats = check_invariants(llm, n_layers, buffer_bytes, n_cells_alloc)
                    rss = rss_mib()
                    if step >= WARMUP_STEPS:
                        if rss_start is None:
                            rss_start = rss
                        rss_peak = max(rss_peak, rss)
        finally:
            lib.llama_batch_free(batch)
            sampler.close()

        assert stats is not None and stats["tokens"] == len(prompt_tokens) + STEPS
        # hundreds of compressions at the default step count (one every ~INTERVAL tokens)
        assert stats["compressions"] >= STEPS // (4 * INTERVAL)
        assert stats["passes"] >= stats["compressions"]
        assert stats["compression"] > 3.0
        assert rollbacks == STEPS // ROLLBACK_EVERY
        growth = rss_peak - rss_start
        print(f"\nsoak: {STEPS} decode steps, {stats['tokens']} tokens in {stats['cells']} cells, "
              f"{stats['compressions']} compressions, {stats['passes']} passes, {rollbacks} rollbacks, "
              f"KV buffer {buffer_bytes / 2**20:.2f} MiB ({n_cells_alloc} cells), "
              f"RSS {rss_start:.1f} -> peak {rss_peak:.1f} MiB (+{growth:.1f})")
        if not SANITIZED:
            assert growth < RSS_GROWTH_LIMIT_MIB, f"RSS grew {growth:.1f} MiB over the soak"
