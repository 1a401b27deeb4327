"""How a pass ranks candidate merges: the distinctiveness and size terms (kv_cluster_distinct_weight,
kv_cluster_size_weight, whose sign spreads or gathers merges) on the real default model, on varied text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import ClusterOptions, cluster_sizes

WORDS = ("river harbour lantern copper meadow violin saddle orchard pepper glacier falcon marble thimble canyon "
         "parsley beacon walnut tundra compass velvet").split()


def varied_text(n_sentences: int) -> str:
    """Sentences that never repeat: the ranking must tell tokens apart, as on ordinary text."""
    rng = np.random.default_rng(5)
    return " ".join(f"The {rng.choice(WORDS)} near the {rng.choice(WORDS)} was {int(rng.integers(10, 99999))} "
                    f"steps from the {rng.choice(WORDS)}." for _ in range(n_sentences))


def compress(model_path: Path, **weights: object) -> tuple[dict, list[list[float]], np.ndarray]:
    with Llama(str(model_path), n_ctx=2048, n_threads=2, verbose=False, kv_cluster=True, kv_cluster_ratio=0.25,
               **weights) as llm:
        tokens = llm.tokenize(varied_text(60))[:1200]
        llm.eval(tokens)
        assert lib.chelsea_kv_cluster_compress(llm.ctx, 0) > 0
        llm.eval([tokens[3]])
        stats = llm.kv_cluster_stats()
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm.ctx, -1), 4 * llm.n_vocab()),
                               dtype=np.float32).copy()
        return stats, cluster_sizes(llm.ctx, 0, stats["cells"]), logits


UNWEIGHTED = {"kv_cluster_distinct_weight": 0.0, "kv_cluster_size_weight": 0.0, "kv_cluster_value_weight": 0.0,
              "kv_cluster_attn_weight": 0.0}


@pytest.fixture(scope="module")
def default_run(model_path: Path) -> tuple[dict, list[list[float]], np.ndarray]:
    """The ranking by similarity alone, as the paper ranks."""
    return compress(model_path, **UNWEIGHTED)


@pytest.mark.parametrize("weights", [{"kv_cluster_distinct_weight": 2.0}, {"kv_cluster_size_weight": 1.0},
                                     {"kv_cluster_value_weight": 1.0},
                                     # V not transposed, and quantized: the value distance reads it another way
                                     {"kv_cluster_value_weight": 1.0, "flash_attn": True, "type_v": "q8_0"},
                                     {"kv_cluster_distinct_weight": 1.0, "kv_cluster_size_weight": 0.5}])
def test_weighted_ranking_merges_other_cells_to_the_same_budget(model_path: Path, default_run, weights) -> None:
    assert_other_merges_same_budget(default_run, compress(model_path, **weights))


def assert_other_merges_same_budget(base: tuple[dict, list[list[float]], np.ndarray],
                                    run: tuple[dict, list[list[float]], np.ndarray]) -> None:
    """run (stats, sizes, logits) merged other cells than base, to the same cell count, every token in one cell."""
    (base_stats, base_sizes, _), (stats, sizes, logits) = base, run
    assert stats["cells"] == base_stats["cells"] < stats["tokens"] == base_stats["tokens"]
    for head in sizes:
        assert sum(head) == pytest.approx(stats["tokens"])
    assert sizes != base_sizes
    assert np.isfinite(logits).all()


def test_size_weight_spreads_merges(model_path: Path, default_run) -> None:
    """Penalizing merges into grown cells leaves fewer large centroids than the default ranking."""
    _, base_sizes, _ = default_run
    _, sizes, _ = compress(model_path, kv_cluster_size_weight=4.0)
    assert max(max(h) for h in sizes) < max(max(h) for h in base_sizes)


def test_negative_size_weight_gathers_merges(model_path: Path, default_run) -> None:
    """Favouring merges into grown cells gathers the merged tokens into fewer cells: more cells of every head stay
    exact (size 1) than with the similarity ranking, at the same cell count."""
    base_stats, base_sizes, _ = default_run
    stats, sizes, _ = compress(model_path, kv_cluster_size_weight=-1.0)
    assert stats["cells"] == base_stats["cells"]
    exact = [sum(s == 1.0 for s in h) for h in sizes]
    base_exact = [sum(s == 1.0 for s in h) for h in base_sizes]
    assert all(e > b for e, b in zip(exact, base_exact))
    assert max(max(h) for h in sizes) > max(max(h) for h in base_sizes)


def test_zero_weights_leave_the_similarity_ranking(model_path: Path, default_run) -> None:
    """Weights of 0 build the pass graph without the terms: the similarity ranking, the same merges and logits
    run to run."""
    base_stats, base_sizes, base_logits = default_run
    stats, sizes, logits = compress(model_path, **UNWEIGHTED)
    assert sizes == base_sizes and np.array_equal(logits, base_logits)


def test_default_ranking_guards_distinctive_cells(model_path: Path, default_run) -> None:
    """The default ranking merges distinctive cells last (distinct_weight 1, what measured best on the retrieval
    benchmark: bench/results/scoring_ablation.md); weights set to their defaults build the same graph."""
    assert ClusterOptions().distinct_weight == 1.0 and ClusterOptions().size_weight == 0.0
    _, base_sizes, _ = default_run
    _, sizes, logits = compress(model_path)
    _, same_sizes, same_logits = compress(model_path, kv_cluster_distinct_weight=1.0, kv_cluster_size_weight=0.0)
    assert sizes != base_sizes
    assert sizes == same_sizes and np.array_equal(logits, same_logits)
