"""bench/shape_models.py: random-weight GGUF files with the shapes of Llama-3.1-8B and Qwen2.5-7B.

The ``--tiny`` variants (same architecture and head_dim, 2 layers, 1024 tokens, ~10-20 MB) are written into
tmp_path, loaded with chelsea_gguf.Llama and decoded one step; the full shapes are only checked on paper (their
tensor plan), since writing them takes ~4.5 GB each. The weights are random: nothing here looks at quality.
"""

from __future__ import annotations

import sys
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import shape_models as sm  # noqa: E402

TINY = {name: sm.tiny(cfg) for name, cfg in sm.SHAPES.items()}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("shape-models")
    files = {}
    for name, cfg in TINY.items():
        path, written = sm.ensure_model(cfg, out_dir=out)
        assert written and path.exists()
        files[name] = path
    return files


def test_full_shapes_on_paper() -> None:
    llama, qwen = sm.SHAPES["llama-3.1-8b"], sm.SHAPES["qwen2.5-7b"]
    assert (llama.arch, llama.n_layer, llama.n_embd, llama.n_head, llama.n_head_kv, llama.head_dim, llama.n_ff,
            llama.n_vocab, llama.n_ctx_train) == ("llama", 32, 4096, 32, 8, 128, 14336, 128256, 131072)
    assert (qwen.arch, qwen.n_layer, qwen.n_embd, qwen.n_head, qwen.n_head_kv, qwen.head_dim, qwen.n_ff,
            qwen.n_vocab, qwen.n_ctx_train) == ("qwen2", 28, 3584, 28, 4, 128, 18944, 152064, 32768)
    assert llama.f16_kv_bytes_per_cell() == 128 * 1024 and qwen.f16_kv_bytes_per_cell() == 56 * 1024
    # tensor data as large as the real Q4_0 files (4.66 GB and 4.43 GB with their tokenizers)
    assert 4.60e9 < sum(t.nbytes() for t in sm.tensor_plan(llama)) < 4.66e9
    assert 4.35e9 < sum(t.nbytes() for t in sm.tensor_plan(qwen)) < 4.43e9
    names = {t.name for t in sm.tensor_plan(qwen)}
    assert {"blk.27.attn_q.bias", "blk.27.attn_k.bias", "blk.27.attn_v.bias", "output.weight"} <= names
    assert "rope_freqs.weight" not in names
    # llama3 rope factors as conversion/llama.py: high frequencies kept, low ones divided by 8, a smooth band between
    f = sm.llama3_rope_factors(llama)
    assert f.shape == (64,) and f[0] == 1.0 and f[-1] == 8.0 and np.all(np.diff(f) >= 0)
    assert sm.config_hash(llama, 0) != sm.config_hash(llama, 1) != sm.config_hash(TINY["llama-3.1-8b"], 1)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_file_loads_and_decodes(tiny_files: dict[str, Path], name: str) -> None:
    cfg, path = TINY[name], tiny_files[name]
    assert sm.ensure_model(cfg, out_dir=path.parent) == (path, False)  # same config hash: reused
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    assert ("blk.1.attn_k.bias" in tensors) == cfg.qkv_bias
    if cfg.llama3_rope:
        np.testing.assert_array_equal(np.asarray(tensors["rope_freqs.weight"].data), sm.llama3_rope_factors(cfg))

    with Llama(str(path), n_ctx=256, n_batch=64, n_threads=1, verbose=False) as llm:
        a = cfg.arch
        assert "RANDOM WEIGHTS" in llm.metadata("general.description")
        assert int(llm.metadata(f"{a}.attention.head_count_kv")) == cfg.n_head_kv == 2
        assert int(llm.metadata(f"{a}.attention.head_count")) == cfg.n_head
        assert int(llm.metadata(f"{a}.block_count")) == cfg.n_layer == 2
        assert int(llm.metadata(f"{a}.embedding_length")) == cfg.n_embd == cfg.n_head * 128
        assert llm.n_vocab() == cfg.n_vocab and llm.n_ctx_train() == cfg.n_ctx_train
        kv = llm.kv_stats()
        assert (kv.type_k, kv.type_v) == ("f16", "f16")
        assert kv.buffer_bytes == kv.n_cells * 2 * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * 2
        assert llm.tokenize("Hello world")[0] == llm.token_bos() == 1  # the SPM vocab tokenizes text
        llm.eval([llm.token_bos(), 300])
        logits = np.array(ffi.unpack(lib.llama_get_logits_ith(llm.ctx, -1), llm.n_vocab()))
        assert np.isfinite(logits).all() and logits.std() > 0
        assert llm.kv_stats().n_cells_used == 2


def test_check_model(tiny_files: dict[str, Path]) -> None:
    for name, path in tiny_files.items():
        out = sm.check_model(path, TINY[name])
        assert out["random_weights"] and out["logits_finite"]


def test_load_modes_size_buffers_alike(tiny_files: dict[str, Path]) -> None:
    """What bench/shape_memory.py relies on: loading without the CPU repack copy changes neither KV nor compute
    buffers, and llama.cpp's no_alloc mode sizes the compute buffers the real context allocates."""
    path = tiny_files["qwen2.5-7b"]
    kwargs = {"n_ctx": 4096, "flash_attn": True, "n_threads": 1, "verbose": False}

    def stats(**fields: int | bool) -> tuple[int, int, int, str]:
        with sm.LogTap() as tap:
            llm = Llama(str(path), model_params=fields, **kwargs)
        kv = llm.kv_stats()
        llm.close()
        return kv.buffer_bytes, kv.k_bytes + kv.v_bytes, kv.compute_bytes, tap.text()

    real = stats()
    no_repack = stats(use_extra_bufts=False)
    assert "CPU_REPACK" in real[3] and "CPU_REPACK" not in no_repack[3]
    assert real[:3] == no_repack[:3]
    sized = stats(**sm.no_alloc_params())
    assert "no_alloc              = 1" in sized[3]
    assert sized[0] == 0 and sized[1] == real[1]  # KV: dummy buffer, tensors sized the same
    compute_log = float(re.findall(r"CPU compute buffer size =\s*([0-9.]+) MiB", sized[3])[-1])
    assert abs(compute_log * 1024 * 1024 - real[2]) <= 0.005 * 1024 * 1024
