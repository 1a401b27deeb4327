"""Models whose cache cannot be clustered are refused with an error naming the reason.

No real recurrent, hybrid, MLA, M-RoPE or ALiBi model is at hand, so each is a tiny GGUF generated here
(tests/tiny_gguf.py). Each one also loads and decodes with clustering off: the refusal is the clustering's,
not a broken file. A tiny plain transformer built the same way is clustered, as the control.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import tiny_gguf
from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib

Builder = Callable[[], tiny_gguf.TinySpec]

# (builder, kind, what the error must say): the messages of chelsea_kv_cluster_enable and
# llama_kv_cache::chelsea_enable (native/src/chelsea-kv.cpp)
REFUSED: list[tuple[Builder, str, str]] = [
    (tiny_gguf.mamba, "recurrent", r"recurrent models .*no KV cache to cluster"),
    (tiny_gguf.jamba, "hybrid", r"hybrid recurrent/attention models cannot be clustered"),
    (tiny_gguf.lfm2, "hybrid-swa", r"hybrid recurrent/attention models cannot be clustered"),
    (tiny_gguf.deepseek2, "MLA", r"multi-head latent attention \(MLA\) cannot be clustered"),
    (tiny_gguf.qwen2vl, "M-RoPE", r"multi-dimensional positions \(M-RoPE\) cannot be clustered"),
    (tiny_gguf.bloom, "ALiBi", r"ALiBi position biases cannot be clustered"),
]
def cases() -> list[object]:
    return [pytest.param(b.__name__, reason, id=f"{kind}-{b.__name__}") for b, kind, reason in REFUSED]


PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny_gguf")
    builders = [tiny_gguf.llama, *(b for b, _, _ in REFUSED)]
    return {b.__name__: tiny_gguf.write_gguf(folder / f"tiny-{b.__name__}.gguf", b()) for b in builders}


def last_logits(llm: Llama) -> np.ndarray:
    ptr = lib.llama_get_logits_ith(llm.ctx, -1)
    return np.frombuffer(ffi.buffer(ptr, 4 * llm.n_vocab()), dtype=np.float32).copy()


def decode_a_few(llm: Llama) -> None:
    """A prompt then two single-token steps; the logits stay finite."""
    llm.eval(PROMPT)
    for _ in range(2):
        logits = last_logits(llm)
        assert np.isfinite(logits).all()
        llm.eval([int(np.argmax(logits))])
    assert llm.n_tokens == len(PROMPT) + 2
    assert np.isfinite(last_logits(llm)).all()


@pytest.mark.parametrize(("arch", "reason"), cases())
def test_clustering_is_refused_naming_the_reason(tiny_models: dict[str, Path], arch: str, reason: str) -> None:
    with pytest.raises(ValueError, match=rf"^kv_cluster: .*{reason}"):
        Llama(str(tiny_models[arch]), n_ctx=256, kv_cluster=True, verbose=False)


@pytest.mark.parametrize("arch", [b.__name__ for b, _, _ in REFUSED])
def test_the_same_model_runs_unclustered(tiny_models: dict[str, Path], arch: str) -> None:
    with Llama(str(tiny_models[arch]), n_ctx=256, n_threads=1, kv_cluster=False, verbose=False) as llm:
        assert llm.n_vocab() == tiny_gguf.N_VOCAB
        assert llm.model_description().startswith(arch)
        decode_a_few(llm)


@pytest.mark.parametrize(("arch", "reason"), cases())
def test_cli_refuses_without_traceback(tiny_models: dict[str, Path], arch: str, reason: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "chelsea_gguf.cli", str(tiny_models[arch]), "--kv-cluster",
                           "-p", "hi", "-n", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("chelsea-run: error: kv_cluster: "), proc.stderr
    assert re.search(reason, last), proc.stderr


def test_control_a_plain_transformer_is_clustered(tiny_models: dict[str, Path]) -> None:
    """The generator is not what gets refused: the same kind of file, as a llama, clusters and decodes."""
    with Llama(str(tiny_models["llama"]), n_ctx=256, n_threads=1, kv_cluster=True, verbose=False) as llm:
        assert llm.kv_cluster_options is not None
        decode_a_few(llm)
        assert llm.kv_cluster_stats()["tokens"] == len(PROMPT) + 2


def test_hybrid_with_sliding_window_is_still_refused(tiny_models: dict[str, Path]) -> None:
    """Whatever the message (see HYBRID_ISWA_UNNAMED), the LFM2-with-SWA cache is never clustered."""
    with pytest.raises(ValueError, match=r"^kv_cluster: .*cannot be clustered"):
        Llama(str(tiny_models["lfm2"]), n_ctx=256, kv_cluster=True, verbose=False)
