"""Stock llama-cpp-python (``llama_cpp``) on our patched libllama through ``chelsea_gguf.compat``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

if importlib.util.find_spec("llama_cpp") is None:  # importing it here would load it before the shim
    pytest.skip("llama-cpp-python is not installed (scripts/install.sh installs it)", allow_module_level=True)

from chelsea_gguf import compat  # noqa: E402  (before any use of llama_cpp)
from chelsea_gguf._lib import library_dir  # noqa: E402
from chelsea_gguf.passkey import FILLER, passkey_prompt  # noqa: E402

llama_cpp = compat.install()

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
LONG_NOTES = "Notes on the weather. " + FILLER * 40   # ~900 tokens: merged well before the end


def make(model_path: Path, **kwargs) -> "llama_cpp.Llama":
    return llama_cpp.Llama(str(model_path), verbose=False, seed=7, **kwargs)


def text(completion: dict) -> str:
    return completion["choices"][0]["text"]


@pytest.fixture(scope="module")
def clustered(model_path: Path) -> Iterator["llama_cpp.Llama"]:
    llm = make(model_path, n_ctx=4096, kv_cluster=True, kv_cluster_ratio=0.25)
    yield llm
    llm.close()


def test_llama_cpp_runs_on_our_library() -> None:
    assert compat.llama_cpp_library().resolve().parent == library_dir().resolve()
    assert compat.install() is llama_cpp  # idempotent


def test_physical_cells_below_the_logical_context(clustered) -> None:
    assert clustered.n_ctx() == 4096
    cells = llama_cpp.llama_n_ctx(clustered.ctx)
    assert cells < 4096 // 2
    assert clustered.input_ids.shape == (4096,)


def test_n_ctx_0_is_the_training_context_with_clustering(model_path: Path) -> None:
    llm = make(model_path, n_ctx=0, kv_cluster=True, kv_cluster_ratio=0.25)
    try:
        assert llm.n_ctx() == 8192 and llama_cpp.llama_n_ctx(llm.ctx) < 8192 // 2
    finally:
        llm.close()


@pytest.mark.slow
def test_small_clustered_gemma_context_keeps_room_beside_the_window() -> None:
    """As chelsea_gguf.Llama: at least window + ubatch cells, or the second prompt batch finds no slot."""
    from chelsea_gguf.models import gemma3_270m_path

    llm = llama_cpp.Llama(str(gemma3_270m_path()), n_ctx=1100, n_batch=256, kv_cluster=True, kv_cluster_ratio=0.2,
                          verbose=False)
    try:
        assert llama_cpp.llama_n_ctx(llm.ctx) == 512 + 256
        tokens = llm.tokenize(("The lantern by the harbour flickered while ships came in. " * 120).encode())[:1060]
        llm.eval(tokens)
        assert llm.kv_cluster_stats()["tokens"] == 1060
    finally:
        llm.close()


def test_passkey_through_llama_cpp_with_clustering(clustered) -> None:
    """~2.9k tokens in a context of ~1.5k cells: only a clustered cache can hold it, and it must still find the key."""
    p = passkey_prompt(120, 0.3, seed=11)
    n_prompt = len(clustered.tokenize(p.prompt.encode()))
    assert n_prompt > llama_cpp.llama_n_ctx(clustered.ctx)
    answer = text(clustered(p.prompt, max_tokens=8, temperature=0.0))
    assert p.retrieved(answer), answer
    stats = clustered.kv_cluster_stats()
    assert stats["passes"] > 0 and stats["compression"] > 2.5


def test_chat_streaming_with_clustering(clustered) -> None:
    p = passkey_prompt(60, 0.5, seed=5)
    chunks = list(clustered.create_chat_completion(
        messages=[{"role": "user", "content": p.prompt}], max_tokens=12, temperature=0.0, stream=True))
    reply = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply.strip()
    assert clustered.kv_cluster_stats()["passes"] > 0


def test_state_round_trip_with_merged_cells(clustered) -> None:
    clustered.reset()
    clustered(LONG_NOTES, max_tokens=2, temperature=0.0)
    before = clustered.kv_cluster_stats()
    assert before["passes"] > 0
    state = clustered.save_state()
    follow = LONG_NOTES + " Tomorrow it will"
    expected = text(clustered(follow, max_tokens=8, temperature=0.0))
    clustered.load_state(state)
    after = clustered.kv_cluster_stats()
    assert (after["tokens"], after["cells"], after["pos_merged_min"], after["pos_merged_max"]) == \
           (before["tokens"], before["cells"], before["pos_merged_min"], before["pos_merged_max"])
    assert text(clustered(follow, max_tokens=8, temperature=0.0)) == expected


def test_prompt_cache_reuse_matches_a_fresh_context(model_path: Path, clustered) -> None:
    """LlamaRAMCache restores states with merged cells, the same way every time, and a new prompt that shares
    only part of a compressed prefix makes llama_cpp's partial seq_rm fail: it must re-evaluate and answer
    exactly like a fresh context. (A restored prompt is not compared with its first answer: llama_cpp
    re-evaluates the last prompt token, which then attends to the compressed prefix, while the first answer
    came before the compression.)"""
    clustered.reset()
    clustered.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=1 << 30))
    try:
        clustered(LONG_NOTES + " Summary:", max_tokens=8, temperature=0.0)
        assert len(clustered.cache.cache_state) == 1
        restored = []
        for _ in range(2):
            clustered(PROMPT, max_tokens=4, temperature=0.0)  # the context moves on; the cache keeps the state
            restored.append(text(clustered(LONG_NOTES + " Summary:", max_tokens=8, temperature=0.0)))
        assert restored[0] == restored[1]
        assert clustered.kv_cluster_stats()["passes"] > 0
        branch = LONG_NOTES[: len(LONG_NOTES) // 2] + " In short, the weather"
        reused = text(clustered(branch, max_tokens=8, temperature=0.0))
    finally:
        clustered.set_cache(None)
    fresh_llm = make(model_path, n_ctx=4096, kv_cluster=True, kv_cluster_ratio=0.25)
    try:
        assert text(fresh_llm(branch, max_tokens=8, temperature=0.0)) == reused
    finally:
        fresh_llm.close()


def test_a_prompt_that_must_merge_is_read_at_its_end_first(model_path: Path) -> None:
    """The drop-in reads a prompt's end first as chelsea_gguf.Llama does (kv_cluster_lookahead): the same merges,
    and other ones than without it."""
    from chelsea_gguf import Llama
    from chelsea_gguf.cluster import cluster_sizes

    from test_merge_ranking import varied_text

    options = dict(kv_cluster=True, kv_cluster_ratio=0.25, kv_cluster_attn_window=8, n_threads=2, n_batch=512)
    with Llama(str(model_path), n_ctx=64, verbose=False) as tok:
        tokens = tok.tokenize(varied_text(60))[:1100] + tok.tokenize(" Question: what was near the harbour?",
                                                                     add_bos=False)
    n_ctx = len(tokens) + 16   # the prompt fills it: room for its chunks is made by merging
    with Llama(str(model_path), n_ctx=n_ctx, verbose=False, **options) as ours:
        ours.eval(tokens)
        expected = cluster_sizes(ours.ctx, 0, ours.kv_cluster_stats()["cells"])
    merged = {}
    for lookahead in (True, False):
        llm = make(model_path, n_ctx=n_ctx, kv_cluster_lookahead=lookahead, **options)
        llm.eval(tokens)
        merged[lookahead] = cluster_sizes(compat._context_pointer(llm), 0, llm.kv_cluster_stats()["cells"])
        llm.close()
    assert merged[True] == expected and merged[False] != expected


def test_compress_with_a_reread_as_chelsea_gguf_does(model_path: Path) -> None:
    """llm.kv_cluster_compress(reread=True) on the drop-in merges as chelsea_gguf.Llama's does, and other cells than
    a plain compression."""
    from chelsea_gguf import Llama
    from chelsea_gguf.cluster import cluster_sizes

    from test_merge_ranking import varied_text

    options = dict(n_ctx=4096, kv_cluster=True, kv_cluster_ratio=0.2, n_threads=2)
    with Llama(str(model_path), verbose=False, **options) as ours:
        tokens = ours.tokenize(varied_text(45))[:700]
        ours.eval(tokens)
        removed = ours.kv_cluster_compress(reread=True)
        expected = cluster_sizes(ours.ctx, 0, ours.kv_cluster_stats()["cells"])
    got = {}
    for reread in (True, False):
        llm = make(model_path, **options)
        llm.eval(tokens)
        assert llm.kv_cluster_compress(reread=reread) == removed
        got[reread] = cluster_sizes(compat._context_pointer(llm), 0, llm.kv_cluster_stats()["cells"])
        if reread:
            assert llm.n_tokens == len(tokens)
            assert text(llm.create_completion(tokens + llm.tokenize(b" The", add_bos=False), max_tokens=4,
                                              temperature=0.0))
        llm.close()
    assert got[True] == expected and got[False] != expected


def test_reset_starts_over(clustered) -> None:
    clustered.reset()
    a = text(clustered(PROMPT, max_tokens=6, temperature=0.0))
    clustered(LONG_NOTES, max_tokens=2, temperature=0.0)
    clustered.reset()
    assert text(clustered(PROMPT, max_tokens=6, temperature=0.0)) == a


def test_without_kv_cluster_llama_is_stock(model_path: Path) -> None:
    llm = make(model_path, n_ctx=1024)
    try:
        assert llm.kv_cluster_options is None
        assert llm.n_ctx() == llama_cpp.llama_n_ctx(llm.ctx) == 1024
        with pytest.raises(RuntimeError, match="kv_cluster is off"):
            llm.kv_cluster_stats()
        assert text(llm(PROMPT, max_tokens=4, temperature=0.0)).strip()
        state = llm.__getstate__()
        assert "kv_cluster" not in state and state["n_ctx"] == 1024
    finally:
        llm.close()


def test_bad_cluster_keyword_is_named(model_path: Path) -> None:
    with pytest.raises(ValueError, match="kv_cluster_ratio"):
        make(model_path, n_ctx=1024, kv_cluster=True, kv_cluster_ratio=1.5)
    with pytest.raises(TypeError, match="kv_cluster_ratoi"):
        compat.set_cluster_defaults(kv_cluster=True, kv_cluster_ratoi=0.2)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_llama_cpp_on_another_library_is_refused(tmp_path: Path) -> None:
    """A second libllama in the process (a copy elsewhere) must be refused, not mixed with ours."""
    other = tmp_path / "lib"
    shutil.copytree(library_dir(), other)
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(other)}
    after_import = _run("import llama_cpp\nimport chelsea_gguf.compat", env)
    assert after_import.returncode != 0
    assert "already imported with its own libllama" in after_import.stderr
    before_import = _run("import chelsea_gguf.compat", env)
    assert before_import.returncode != 0
    assert "points at another llama.cpp build" in before_import.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_openai_server_with_clustering(model_path: Path, tmp_path: Path) -> None:
    port = _free_port()
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "chelsea_gguf.server", "--model", str(model_path), "--n_ctx", "4096",
         "--kv-ratio", "0.25", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        p = passkey_prompt(120, 0.25, seed=21)  # ~2.9k tokens: more than the server's ~1.5k cells
        reply = _post(base + "/v1/completions", {"prompt": p.prompt, "max_tokens": 8, "temperature": 0.0}, 600)
        assert p.retrieved(reply["choices"][0]["text"]), reply
        chat = _post(base + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": passkey_prompt(60, 0.5, seed=4).prompt}],
            "max_tokens": 16, "temperature": 0.0}, 600)
        assert chat["choices"][0]["message"]["content"].strip()
        assert chat["usage"]["prompt_tokens"] > 1000
    finally:
        server.terminate()
        server.wait(timeout=30)
    logged = (tmp_path / "server.log").read_text()
    assert "cluster-size buffer size" in logged  # llama.cpp's own log: the cache is clustered
