"""NaN/Inf in the KV cache is reported by clustering, and merging does not average it into finite cells.

A model that writes NaN into its cache is a tiny GGUF (tests/tiny_gguf.py) whose embedding of one token is NaN:
that token's keys and values are NaN in every layer, and everything after it from the second layer on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_gguf
from chelsea_gguf import Llama
from chelsea_gguf.cli import format_summary
from chelsea_gguf.llama import Timings

POISON = 5        # the token whose embedding is NaN
N_PROMPT = 400
OPTIONS = {"kv_cluster": True, "kv_cluster_ratio": 0.25, "kv_cluster_sinks": 4, "kv_cluster_recent": 16}


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_nan")
    return tiny_gguf.write_gguf(folder / "tiny-llama-nan.gguf", tiny_gguf.llama(),
                                nan_rows={"token_embd.weight": [POISON]})


def prompt(poisoned_at: int | None) -> list[int]:
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.choice([t for t in range(tiny_gguf.N_VOCAB) if t != POISON], N_PROMPT)]
    if poisoned_at is not None:
        tokens[poisoned_at] = POISON
    return tokens


def test_nan_in_the_cache_is_counted_only_when_there(nan_model: Path) -> None:
    with Llama(str(nan_model), n_ctx=512, n_threads=1, verbose=False, **OPTIONS) as llm:
        llm.eval(prompt(None))
        assert llm.kv_cluster_compress() > 0
        clean = llm.kv_cluster_stats()
        assert clean["nonfinite"] == 0

        llm.reset()
        llm.eval(prompt(200))
        assert llm.kv_cluster_compress() > 0
        poisoned = llm.kv_cluster_stats()
        # layer 0 holds the poisoned token's slices, layer 1 those of every token after it; both are in the
        # mergeable region [sinks, cells - recent) of the 400 cells
        assert poisoned["nonfinite"] >= tiny_gguf.N_HEAD
        # the cells and tokens still add up: merging went on around the NaN cells
        assert poisoned["tokens"] == N_PROMPT and poisoned["cells"] == clean["cells"]


def test_cli_warns_about_nan_in_the_cache(nan_model: Path) -> None:
    with Llama(str(nan_model), n_ctx=512, n_threads=1, verbose=False, **OPTIONS) as llm:
        llm.eval(prompt(100))
        llm.kv_cluster_compress()
        summary = format_summary(llm, Timings())
    assert "warning    : the KV cache holds NaN/Inf" in summary
