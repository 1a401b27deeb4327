"""Smoke tests of the benchmark machinery: per-token logits, the eviction baselines, the RULER-style tasks.

Small contexts on the real default model, so this stays well under a minute on 2 cores; the benchmarks
themselves are smoke-run by ``python3 bench/run_all.py --quick``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf.baselines import ContextShift, Session, StreamingEviction, log_softmax
from chelsea_gguf.passkey import FILLER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_bench  # noqa: E402
import ruler  # noqa: E402


@pytest.fixture(scope="module")
def llm(model_path: Path) -> Iterator[Llama]:
    # one thread: on a busy 2-core machine llama.cpp's two spinning threads are several times slower
    with Llama(str(model_path), n_ctx=512, n_batch=256, n_threads=1, verbose=False) as model:
        yield model


@pytest.fixture(scope="module")
def tokens(llm: Llama) -> list[int]:
    return llm.tokenize(FILLER * 16)[:320]


def test_session_logits_match_eval(llm: Llama, tokens: list[int]) -> None:
    with Session(llm, chunk=64) as s:
        rows = s.feed(tokens, logits_from=len(tokens) - 3)
    assert rows.shape == (3, llm.n_vocab())
    llm.reset()
    llm.eval(tokens)
    from chelsea_gguf._lib import ffi, lib

    last = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm._ctx, -1), 4 * llm.n_vocab()), dtype=np.float32)
    np.testing.assert_allclose(rows[-1], last, rtol=1e-3, atol=1e-3)
    lp = log_softmax(rows)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-6)


def test_streaming_eviction_keeps_sinks_and_window(llm: Llama, tokens: list[int]) -> None:
    policy = StreamingEviction(capacity=128, n_sink=4)
    with Session(llm, policy) as s:
        s.feed(tokens)
        assert s.cells_used() <= 128
        mem = s.mem
        from chelsea_gguf._lib import lib

        # original positions kept: the newest is the last token's, the oldest a sink
        assert lib.llama_memory_seq_pos_max(mem, 0) == len(tokens) - 1
        assert lib.llama_memory_seq_pos_min(mem, 0) == 0


def test_context_shift_reindexes(llm: Llama, tokens: list[int]) -> None:
    policy = ContextShift(capacity=128, n_keep=4)
    with Session(llm, policy) as s:
        s.feed(tokens)
        from chelsea_gguf._lib import lib

        assert s.cells_used() <= 128
        assert lib.llama_memory_seq_pos_max(s.mem, 0) == s.n_past - 1 < 128
        out = s.greedy(llm.tokenize(" The grass is"), 3)
    assert len(out) == 3


@pytest.mark.parametrize("name", sorted(ruler.GENERATORS))
def test_ruler_tasks_are_seeded_and_scorable(name: str) -> None:
    a = ruler.GENERATORS[name](40, random.Random(7))
    b = ruler.GENERATORS[name](40, random.Random(7))
    assert a == b
    assert a.score(" " + ", ".join(a.answers) + ".") == 1.0
    assert a.score(" nothing") == 0.0
    for ans in a.answers:
        assert ans in a.prompt


def test_memory_bench_reads_kv_and_compute_buffers() -> None:
    model = next(iter(memory_bench.MODELS))
    rows = [memory_bench.measure(model, 8192, m, flash_attn=True)
            for m in (memory_bench.FULL, memory_bench.chelsea(0.2))]
    memory_bench.add_ratios(rows)
    full, clustered = rows
    assert full["kv_ratio"] == 1.0 and 0.2 < clustered["kv_ratio"] < 0.35
    assert clustered["compute_mib"] > 0 and clustered["total_mib"] < full["total_mib"]
    assert "| chelsea R=0.2 |" in memory_bench.markdown(rows, {"commit": "x", "date": "d", "command": "c", "wall_s": 1})



def test_decode_bench_runs_bursts_in_rounds() -> None:
    import argparse

    import decode_bench

    args = argparse.Namespace(n_gen=4, reps=2, model="smollm2", threads=1)
    procs = [decode_bench.ConfigProcess(c, [300], args) for c in ("full f16", "chelsea R=0.2")]
    try:
        rows = decode_bench.measure_depth(procs, 300, args.reps)
    finally:
        for p in procs:
            p.close()
    assert all(p.proc.returncode == 0 for p in procs)
    decode_bench.add_ratios(rows)
    full, clustered = rows
    assert [r["config"] for r in rows] == ["full f16", "chelsea R=0.2"]
    assert len(full["decode_bursts"]) == len(clustered["decode_bursts"]) == 2
    assert full["decode_speedup"] == 1.0 and clustered["decode_speedup"] > 0
    assert full["prompt_tokens"] == clustered["prompt_tokens"] == 300
    assert "cluster_ms" in clustered and "cluster_ms" not in full


def test_recent_window_refuses_a_window_the_budget_cannot_hold() -> None:
    import recent_window

    methods = recent_window.methods_for({0.1: [64, 256]})
    recent_window.check_same_cells(methods, 3072)
    with pytest.raises(SystemExit, match="recent=256: at 2048 tokens the budget 205 is below"):
        recent_window.check_same_cells(methods, 2048)
