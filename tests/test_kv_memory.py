"""KV memory budgets (kv_cluster_memory, chelsea-run --kv-mem): sizes parsed, the ratio chosen from measured
allocations, the budget kept by the real context, and budgets too small refused with the numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chelsea_gguf import Llama
from chelsea_gguf.kv import MIB
from chelsea_gguf.cluster import ClusterOptions
from chelsea_gguf.kv_memory import KVLayout, padded_cells, parse_memory_size, plan_for_budget
from chelsea_gguf.models import gemma3_270m_path


@pytest.mark.parametrize(("text", "n"), [("512M", 512 * MIB), ("2G", 2 << 30), ("2GiB", 2 << 30), ("1.5g", 3 << 29),
                                         ("64MiB", 64 * MIB), ("1GB", 10**9), ("4096", 4096), (1 << 20, 1 << 20),
                                         ("300 KiB", 300 * 1024)])
def test_sizes_parse_as_llama_cpp_counts_memory(text: str | int, n: int) -> None:
    assert parse_memory_size(text, "--kv-mem") == n


@pytest.mark.parametrize("bad", ["2X", "-1G", "0", "G", "", True, "1..5G"])
def test_bad_sizes_name_the_option_and_value(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape("--kv-mem: ") + ".*" + re.escape(repr(bad))):
        parse_memory_size(bad, "--kv-mem")


@pytest.mark.parametrize("budget_mib", [24, 64, 160])
def test_budget_sets_the_ratio_and_the_allocation_keeps_it(model_path: Path, budget_mib: int) -> None:
    with Llama(str(model_path), n_ctx="32k", verbose=False, kv_cluster_memory=f"{budget_mib}M") as llm:
        plan = llm.kv_memory_plan
        assert plan is not None and llm.kv_cluster_options is not None
        assert llm.kv_cluster_options.ratio == plan.ratio < 1
        allocated = llm.kv_stats().buffer_bytes
        assert allocated == plan.kv_bytes <= budget_mib * MIB
        # the largest ratio that fits: one step more would not (cells grow in steps of 256)
        assert allocated > budget_mib * MIB - 256 * plan.kv_bytes / llm.n_cells() - 1
        assert plan.full_bytes == pytest.approx(llm.kv_stats().k_bytes / llm.n_cells() * 32768 * 2, rel=0.01)


def test_a_budget_the_full_cache_fits_gets_the_full_cache(model_path: Path) -> None:
    with Llama(str(model_path), n_ctx=2048, verbose=False, kv_cluster_memory="1G") as llm:
        assert llm.kv_memory_plan.ratio == 1.0 and llm.n_cells() == 2048
        assert llm.kv_cluster_options is None  # exact, and smaller than clustering at ratio 1
        assert llm.kv_stats().buffer_bytes == llm.kv_memory_plan.kv_bytes == llm.kv_memory_plan.full_bytes


def test_sliding_window_model_fits_its_budget() -> None:
    """Gemma 3's sliding-window cache does not grow with the context: the fixed part of the measured layout."""
    with Llama(str(gemma3_270m_path()), n_ctx="32k", verbose=False, kv_cluster_memory="40M") as g:
        assert g.kv_stats().buffer_bytes == g.kv_memory_plan.kv_bytes <= 40 * MIB
        assert g.kv_cluster_options.ratio < 1


def test_budget_too_small_is_refused_with_the_numbers(model_path: Path) -> None:
    with pytest.raises(ValueError, match=r"kv_cluster_memory: 2\.0 MiB cannot hold .* 65536 tokens.*16 sinks \+ "
                                         r"64 recent.* take [\d.]+ MiB \(the full cache: [\d.]+ MiB\)"):
        Llama(str(model_path), n_ctx="64k", verbose=False, kv_cluster_memory="2M")


def test_budget_and_ratio_together_are_refused(model_path: Path) -> None:
    with pytest.raises(ValueError, match="kv_cluster_memory.*kv_cluster_ratio"):
        Llama(str(model_path), n_ctx="8k", verbose=False, kv_cluster_memory="16M", kv_cluster_ratio=0.2)


def test_budget_with_clustering_off_is_refused(model_path: Path) -> None:
    with pytest.raises(ValueError, match="kv_cluster_memory.*kv_cluster=False"):
        Llama(str(model_path), n_ctx="8k", verbose=False, kv_cluster=False, kv_cluster_memory="16M")


def test_the_readme_example_llama_3_1_8b_shapes() -> None:
    """README's worked example: 32 layers x 8 KV heads x 128 (f16 K and V: 128 KiB a cell, cluster sizes and their
    logs 2 KiB), a 64k context in 2 GiB; and with q8_0 K and V (68 KiB a cell)."""
    options = ClusterOptions()
    f16 = KVLayout(fixed_bytes=0, per_cell_bytes=32 * 2 * 1024 * 2, cluster_per_cell_bytes=32 * 8 * 4 * 2, swa_cells=0)
    plan = plan_for_budget(f16, 2 << 30, 65536, 512, options)
    assert plan.full_bytes == 8 << 30
    assert (plan.ratio, padded_cells(plan.n_cells)) == (0.2382, 16128) and plan.kv_bytes <= 2 << 30
    q8 = KVLayout(fixed_bytes=0, per_cell_bytes=32 * 2 * 1024 * 34 / 32, cluster_per_cell_bytes=2048, swa_cells=0)
    assert plan_for_budget(q8, 2 << 30, 65536, 512, options).ratio == 0.4492
