"""Llama(progress=callable): called before and after each batch of a prompt, for programs that show their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from chelsea_gguf import Llama


def test_progress_counts_each_batch_of_the_prompt(model_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    with Llama(str(model_path), n_ctx=2048, n_batch=128, verbose=False, kv_cluster=True,
               progress=lambda done, total: calls.append((done, total))) as llm:
        tokens = llm.tokenize("The orchard lay east of the mill, past the river. " * 30)
        llm(tokens, max_tokens=2, temperature=0.0)
    total = len(tokens)
    assert calls[0] == (0, total)
    assert [d for d, _ in calls[1:]] == [min(i + 128, total) for i in range(0, total, 128)]
    assert {t for _, t in calls} == {total}  # the generated tokens (one at a time) report nothing


def test_progress_must_be_callable(model_path: Path) -> None:
    with pytest.raises(ValueError, match=r"progress: expected a callable\(done, total\), got 5"):
        Llama(str(model_path), n_ctx=512, verbose=False, progress=5)
