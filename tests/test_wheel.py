"""`pip wheel .` from a clean clone gives a wheel that runs in a fresh virtual environment: chelsea-run and the
llama_cpp drop-in, with the libraries inside the package (no LD_LIBRARY_PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout to clone")
    clone = tmp_path_factory.mktemp("clone") / "chelsea-gguf"
    run("git", "clone", "-q", ROOT, clone)
    # ccache keys on paths relative to the clone: the objects of the checkout's own build are reused
    env = {**os.environ, "CCACHE_BASEDIR": str(clone)}
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ".", "-w", clone / "dist", cwd=clone, env=env)
    (found,) = (clone / "dist").glob("chelsea_gguf-*.whl")
    return found


def test_wheel_holds_the_libraries_and_no_links(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        links = [i.filename for i in z.infolist() if (i.external_attr >> 16) & 0o170000 == 0o120000]
    for lib in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        assert f"chelsea_gguf/lib/{lib}" in names
    assert any(n.startswith("chelsea_gguf/_chelsea_native") for n in names)
    assert "chelsea_gguf/_ffi_build.py" not in names and not links


def test_wheel_runs_in_a_fresh_venv(wheel: Path, tmp_path: Path, model_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    # as a fresh shell would have it: nothing pointing at this checkout's install (chelsea_gguf.compat, imported by
    # other tests in this process, sets LLAMA_CPP_LIB_PATH to its libraries)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "LLAMA_CPP_LIB_PATH")}
    run(bin_dir / "python", "-m", "pip", "install", "-q", wheel, env=env)
    out = run(bin_dir / "chelsea-run", model_path, "-p", "The capital of France is", "-n", "6", "--temp", "0",
              cwd=tmp_path, env=env)
    assert "Paris" in out.stdout and "KV clustering at ratio" in out.stderr
    # the drop-in: llama-cpp-python's Python side, without its own llama.cpp build, on the wheel's libllama
    run(bin_dir / "python", "-m", "pip", "install", "-q", "llama-cpp-python==0.3.36",
        env={**env, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"})
    code = ("import chelsea_gguf.compat, llama_cpp, sys\n"
            f"llm = llama_cpp.Llama({str(model_path)!r}, n_ctx=2048, kv_cluster=True, verbose=False)\n"
            "text = llm('The capital of France is', max_tokens=6, temperature=0)['choices'][0]['text']\n"
            "print(text, llm.kv_cluster_stats()['cells'], llama_cpp.__file__)\n")
    drop_in = run(bin_dir / "python", "-c", code, cwd=tmp_path, env=env)
    assert "Paris" in drop_in.stdout and str(env_dir) in drop_in.stdout
