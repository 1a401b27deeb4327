"""Shared fixtures: the real default model, loaded once per session where a test only reads from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chelsea_gguf import Llama
from chelsea_gguf.models import smollm2_path


@pytest.fixture(scope="session")
def model_path() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def llm(model_path: Path) -> Iterator[Llama]:
    with Llama(str(model_path), n_ctx=2048, n_batch=512, seed=1234, verbose=False) as model:
        yield model
