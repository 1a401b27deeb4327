"""Smoke tests of the benchmark machinery: per-token logits, the eviction baselines, the RULER-style tasks, the
retrieval items on varied text and the methods' classes.

Small contexts on the real default model, so this stays well under a minute on 2 cores; the benchmarks
themselves are smoke-run by ``python3 bench/run_all.py --quick``.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf.passkey import FILLER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baselines import ContextShift, Session, StreamingEviction, log_softmax  # noqa: E402
import haystacks  # noqa: E402
import key_eviction  # noqa: E402
import memory_bench  # noqa: E402
import methods  # noqa: E402
import ruler  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


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

    last = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm.ctx, -1), 4 * llm.n_vocab()), dtype=np.float32)
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


def rough_tokens(text: str) -> int:
    """A tokenizer stand-in for the builder tests: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def items() -> list[haystacks.RetrievalItem]:
    return haystacks.build_items(rough_tokens, [600, 900])


def test_items_hold_their_needle_inside_5_to_95_percent(items: list[haystacks.RetrievalItem]) -> None:
    assert len(items) == len(haystacks.HAYSTACKS) * len(haystacks.NEEDLE_KINDS) * len(haystacks.DEPTHS)
    assert len({it.item_id for it in items}) == len(items)
    assert {it.haystack for it in items} == set(haystacks.HAYSTACKS)
    assert {it.needle_kind for it in items} == set(haystacks.NEEDLE_KINDS)
    assert {haystacks.band(it.depth) for it in items} == {b for _, _, b in haystacks.BANDS}
    for it in items:
        assert it.context.count(it.needle) == 1, it.item_id
        assert it.answer in it.needle and it.answer not in it.context.replace(it.needle, ""), it.item_id
        assert 0.05 <= it.depth <= 0.95, (it.item_id, it.depth)
        before = it.context[:it.context.index(it.needle)]
        assert abs(rough_tokens(before) / rough_tokens(it.context) - it.depth) < 0.01   # code: the indent
        assert 0.9 * it.length <= rough_tokens(it.context) <= 1.15 * it.length, it.item_id
        assert it.prompt().startswith(it.context) and it.prompt().endswith(it.question)
        assert it.correct(f" {it.answer}.") and it.correct(f"{it.answer.upper()}!") and not it.correct(" nothing")


def test_items_are_deterministic(items: list[haystacks.RetrievalItem]) -> None:
    assert haystacks.build_items(rough_tokens, [600, 900]) == items
    quick = haystacks.build_items(rough_tokens, [300], quick=True)
    assert [it.haystack for it in quick] == list(haystacks.HAYSTACKS) and all(it.length == 300 for it in quick)


def test_generated_sentences_never_repeat(items: list[haystacks.RetrievalItem]) -> None:
    for it in items:
        if it.haystack == "sentences":
            sentences = [s for s in re.split(r"(?<=\.)\s+", it.context.replace(it.needle, "")) if s]
            assert len(sentences) == len(set(sentences)) > 20, it.item_id
    prose = [s for para in haystacks.prose_paragraphs() for s in para]
    assert len(prose) == len(set(prose))


def test_code_needle_is_a_comment_line(items: list[haystacks.RetrievalItem]) -> None:
    for it in items:
        if it.haystack == "code":
            line = next(ln for ln in it.context.splitlines() if it.needle in ln)
            assert line.strip() == f"# {it.needle}"


def test_chat_items_give_the_fact_early_and_ask_last() -> None:
    chats = haystacks.build_chat_items(rough_tokens, [500, 800])
    assert chats == haystacks.build_chat_items(rough_tokens, [500, 800])
    for c in chats:
        msgs = c.messages()
        assert msgs[-1]["role"] == "user" and c.answer not in msgs[-1]["content"]
        fact_turn = next(i for i, m in enumerate(msgs) if c.answer in m["content"])
        assert msgs[fact_turn]["role"] == "user" and fact_turn < len(msgs) // 2 and len(msgs) >= 8
        assert [m["role"] for m in msgs[:-1]] == ["user", "assistant"] * ((len(msgs) - 1) // 2)


def test_keydiff_and_knorm_scores() -> None:
    rng = np.random.default_rng(0)
    n_layer, n_cells, n_head, dim = 3, 40, 2, 8
    base = rng.normal(size=(n_layer, 1, n_head, dim))
    keys = np.repeat(base, n_cells, axis=1) + 0.05 * rng.normal(size=(n_layer, n_cells, n_head, dim))
    keys[:, 7] = -base[:, 0] * 3           # the distinctive key (opposite the mean): KeyDiff keeps it first
    keys[:, 9] *= 10                       # a long key along the mean: Knorm evicts it first
    flat = keys.reshape(n_layer, n_cells, n_head * dim).astype(np.float32)
    held = np.ones(n_cells, dtype=bool)
    kd = key_eviction.keydiff_scores(flat, n_head, held)
    kn = key_eviction.knorm_scores(flat, n_head, held)
    assert kd.shape == kn.shape == (n_cells,)
    assert int(np.argmax(kd)) == 7 and kd[7] == pytest.approx(1.0, abs=0.05)
    assert int(np.argmin(kn)) == 9
    positions = np.arange(n_cells)
    positions[30:] = -1                    # empty cells are never chosen
    gone = key_eviction.cells_to_evict(kn, positions, n_past=30, n_evict=3, n_sink=4, n_recent=8)
    assert 9 in gone and all(4 <= p < 22 for p in gone) and len(gone) == 3
    with pytest.raises(RuntimeError, match="only 18 may go"):
        key_eviction.cells_to_evict(kd, positions, n_past=30, n_evict=19, n_sink=4, n_recent=8)


def test_methods_know_their_keywords_and_cells() -> None:
    n_ctx = 4096
    cells = methods.chelsea_cells(0.25, n_ctx)
    assert methods.FULL.llama_kwargs() == {} and methods.FULL.n_cells_for(n_ctx) == n_ctx
    assert methods.full_quantized("q4_0").llama_kwargs() == {"type_k": "q4_0", "type_v": "q4_0", "flash_attn": True}
    kw = methods.chelsea(0.25, type_kv="q8_0").llama_kwargs()
    assert kw["kv_cluster"] and kw["kv_cluster_ratio"] == 0.25 and kw["type_k"] == "q8_0"
    assert methods.random_merge(0.2).llama_kwargs()["kv_cluster_random_pairs"]
    for make in (methods.streaming, methods.context_shift, methods.keydiff, methods.knorm):
        m = make(0.25)
        assert m.n_cells_for(n_ctx) == cells < n_ctx and m.llama_kwargs() == {} and m.name.endswith("R=0.25")
    assert {m.kind for m in (methods.keydiff(0.2), methods.knorm(0.2), methods.streaming(0.2))} == {
        "keydiff", "knorm", "streaming"}


def test_key_eviction_keeps_sinks_recent_and_capacity(llm: Llama, tokens: list[int]) -> None:
    try:
        key_eviction.lib.chelsea_kv_keys
    except AttributeError:
        pytest.skip("this library has no chelsea_kv_keys")
    from chelsea_gguf._lib import lib
    from chelsea_gguf.cluster import cell_positions

    for score in ("keydiff", "knorm"):
        policy = key_eviction.KeyScoredEviction(128, lib.llama_model_n_head_kv(llm.model), score, 4, 16, name=score)
        with Session(llm, policy) as s:
            s.feed(tokens)
            held = sorted(p for p in cell_positions(s.ctx) if p >= 0)
            assert len(held) <= 128 and policy.evictions > 0
            assert held[:4] == [0, 1, 2, 3]                          # sinks
            assert held[-16:] == list(range(len(tokens) - 16, len(tokens)))   # the recent window
            out = s.greedy(llm.tokenize(" The grass is"), 3)
        assert len(out) == 3


def test_retrieval_quick_runs_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "retrieval.py"), "--quick", "--out", str(tmp_path)],
                          cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "retrieval_quick.json").read_text())
    rows = data["rows"]
    methods_run = data["meta"]["methods"]
    assert methods_run[:2] == ["full f16", "chelsea R=0.25"]
    assert len(rows) == 4 * len(methods_run) and {r["haystack"] for r in rows} == {"prose", "sentences", "code", "chat"}
    assert all(r["cells_held"] > 0 and r["seconds"] > 0 for r in rows)
    full = {r["item_id"]: r["cells_held"] for r in rows if r["method"] == "full f16"}
    budget = {r["item_id"]: r["cells_held"] for r in rows if r["method"] == "chelsea R=0.25"}
    for r in rows:
        if r["method"] != "full f16":   # after the prompt every method keeps Chelsea's budget (+ the answer)
            assert r["cells_held"] < full[r["item_id"]] and abs(r["cells_held"] - budget[r["item_id"]]) <= 26, r
    assert "| full f16 |" in (tmp_path / "retrieval_quick.md").read_text()
