"""The native Chelsea ops (match, plan, merge) against the NumPy reference, on random data of each cache type."""

from __future__ import annotations

import numpy as np
import pytest

from chelsea_gguf._lib import lib
from chelsea_reference import NONFINITE, reference_match, reference_merge, reference_plan, run_native

# (type, tolerance of a requantized centroid, relative to the largest magnitude in the data)
KV_TYPES = {
    "f32": (lib.GGML_TYPE_F32, 1e-6),
    "f16": (lib.GGML_TYPE_F16, 2e-3),
    "bf16": (lib.GGML_TYPE_BF16, 1e-2),
    "q8_0": (lib.GGML_TYPE_Q8_0, 1e-2),
    "q4_0": (lib.GGML_TYPE_Q4_0, 0.15),
}

N_HEAD, HEAD_DIM = 3, 64


def make_data(rng: np.random.Generator, n_span: int, sizes_max: int = 1) -> tuple[np.ndarray, ...]:
    # neighbouring keys are similar, as in real caches: a random walk plus noise
    walk = np.cumsum(rng.normal(size=(n_span, N_HEAD * HEAD_DIM)), axis=0) * 0.3
    k = (walk + rng.normal(size=walk.shape)).astype(np.float32)
    v = rng.normal(size=(n_span, N_HEAD * HEAD_DIM)).astype(np.float32)
    s = rng.integers(1, sizes_max + 1, size=(N_HEAD, n_span)).astype(np.float32)
    return k, v, s


def check_pass(res, s: np.ndarray, c0: int, n_region: int, chunk: int, n_remove: int, tol: float,
               tol_v: float, match_values: bool = False) -> None:
    n_span = s.shape[1]
    n_out = n_span - n_remove
    # match: every A cell picked a B of its chunk with the highest score (ties within float error)
    cos = reference_match(res.k_in, N_HEAD, c0, n_region, chunk, res.v_in if match_values else None)
    best_ref = cos.max(axis=2)
    is_a = res.best >= 0
    assert np.array_equal(is_a, np.isfinite(best_ref))
    assert np.allclose(res.score[is_a], best_ref[is_a], atol=1e-5)
    chunk_start = (np.arange(n_region) // chunk) * chunk
    picked = np.take_along_axis(cos, (res.best - chunk_start)[..., None].clip(0), axis=2)[..., 0]
    assert np.allclose(picked[is_a], best_ref[is_a], atol=1e-5)
    assert np.all(res.best[is_a] % 2 == chunk_start[np.nonzero(is_a)[1]] % 2)
    # plan: exactly the reference's decisions on the same scores
    dst, weight, new_size = reference_plan(res.score, res.best, s, c0, n_remove)
    assert np.array_equal(res.dst, dst)
    assert np.allclose(res.weight, weight, rtol=1e-6)
    assert np.allclose(res.new_size, new_size)
    # every head keeps n_out cells and the same number of tokens
    assert np.allclose(res.new_size[:, :n_out].sum(axis=1), s.sum(axis=1))
    assert np.all(res.new_size[:, n_out:] == 1.0)
    # merge: centroids are the size-weighted means of the stored inputs
    k_ref = reference_merge(res.k_in, dst, weight, n_out)
    v_ref = reference_merge(res.v_in, dst, weight, n_out)
    assert np.allclose(res.k_out, k_ref, atol=tol * np.abs(res.k_in).max())
    assert np.allclose(res.v_out, v_ref, atol=tol_v * np.abs(res.v_in).max())


@pytest.mark.parametrize("match_values", [False, True], ids=["keys", "keys+values"])
@pytest.mark.parametrize("type_name", list(KV_TYPES))
@pytest.mark.parametrize(("n_span", "c0", "n_recent", "chunk", "n_remove"), [
    (160, 16, 16, 32, 60),     # full chunks, most A cells merge
    (203, 5, 7, 16, 40),       # a short last chunk, odd region length
    (96, 0, 0, 96, 1),         # one chunk, a single merge
])
def test_ops_match_reference(type_name: str, n_span: int, c0: int, n_recent: int, chunk: int, n_remove: int,
                             match_values: bool) -> None:
    type_id, tol = KV_TYPES[type_name]
    rng = np.random.default_rng(n_span * 7 + chunk)
    k, v, s = make_data(rng, n_span, sizes_max=5)
    n_region = n_span - c0 - n_recent
    res = run_native(k, v, s, n_head=N_HEAD, c0=c0, n_region=n_region, chunk=chunk, n_remove=n_remove,
                     type_k=type_id, type_v=type_id, match_values=match_values)
    check_pass(res, s, c0, n_region, chunk, n_remove, tol, tol, match_values)


@pytest.mark.parametrize("match_values", [False, True], ids=["keys", "keys+values"])
@pytest.mark.parametrize("type_name", ["f32", "f16", "bf16"])
def test_transposed_v_matches_reference(type_name: str, match_values: bool) -> None:
    type_id, tol = KV_TYPES[type_name]
    rng = np.random.default_rng(11)
    k, v, s = make_data(rng, 130, sizes_max=3)
    res = run_native(k, v, s, n_head=N_HEAD, c0=4, n_region=120, chunk=64, n_remove=50, type_k=type_id,
                     type_v=type_id, v_trans=True, match_values=match_values)
    check_pass(res, s, 4, 120, 64, 50, tol, tol, match_values)
    rows = run_native(k, v, s, n_head=N_HEAD, c0=4, n_region=120, chunk=64, n_remove=50, type_k=type_id,
                      type_v=type_id, v_trans=False, match_values=match_values)
    assert np.array_equal(res.dst, rows.dst)
    assert np.allclose(res.v_out, rows.v_out, atol=tol * np.abs(v).max())


def test_values_keep_alike_keys_with_different_values_apart() -> None:
    # the A cell 1 has keys at cosine 0.95 to B cell 0 and 0.9 to B cell 2, but only cell 2 shares its value:
    # by keys alone it picks cell 0, by keys and values cell 2 (1 - 0.05 * 2 / 2 = 0.95 < 1 - 0.1 * 0 / 2 = 1)
    def at(cos: float) -> np.ndarray:
        head = np.zeros(HEAD_DIM, dtype=np.float32)
        head[0], head[1] = cos, np.sqrt(1.0 - cos * cos)
        return np.tile(head, N_HEAD)

    k = np.stack([at(0.95), at(1.0), at(0.9), at(0.0)])
    v = np.ones((4, N_HEAD * HEAD_DIM), dtype=np.float32)
    v[0] = -1.0
    s = np.ones((N_HEAD, 4), dtype=np.float32)
    keys = run_native(k, v, s, n_head=N_HEAD, c0=0, n_region=4, chunk=4, n_remove=1)
    both = run_native(k, v, s, n_head=N_HEAD, c0=0, n_region=4, chunk=4, n_remove=1, match_values=True)
    assert np.all(keys.best[:, 1] == 0) and np.allclose(keys.score[:, 1], 0.95)
    assert np.all(both.best[:, 1] == 2) and np.allclose(both.score[:, 1], 1.0)
    # a non-finite value marks its cell, like a non-finite key: an A cell ranks last, a B cell is never picked,
    # and nothing finite is averaged with them
    v[1] = np.nan
    k[2, 0::HEAD_DIM] = np.inf
    nan = run_native(k, v, s, n_head=N_HEAD, c0=0, n_region=4, chunk=4, n_remove=1, match_values=True)
    assert np.all(nan.score[:, 1:3] == NONFINITE) and np.all(nan.best[:, 2] == -1)
    assert np.all(nan.score[:, 0] == -2.0) and np.all(nan.score[:, 3] > -2.0) and np.all(nan.best[:, 3] == 0)
    assert np.all(nan.dst[:, 3] == 0) and np.array_equal(nan.dst[:, :3], np.tile(np.arange(3), (N_HEAD, 1)))
    assert np.all(np.isfinite(nan.k_out[0])) and np.all(np.isfinite(nan.v_out[0]))


def test_untouched_cells_move_bit_exact_even_quantized() -> None:
    rng = np.random.default_rng(3)
    k, v, s = make_data(rng, 128)
    res = run_native(k, v, s, n_head=N_HEAD, c0=8, n_region=112, chunk=16, n_remove=20,
                     type_k=lib.GGML_TYPE_Q4_0, type_v=lib.GGML_TYPE_Q8_0)
    d = HEAD_DIM
    for h in range(N_HEAD):
        counts = np.bincount(res.dst[h], minlength=128 - 20)
        for j in np.nonzero(counts == 1)[0]:
            i = int(np.nonzero(res.dst[h] == j)[0][0])
            assert np.array_equal(res.k_out[j, h * d:(h + 1) * d], res.k_in[i, h * d:(h + 1) * d])
            assert np.array_equal(res.v_out[j, h * d:(h + 1) * d], res.v_in[i, h * d:(h + 1) * d])


def test_sinks_and_recent_cells_are_never_merged() -> None:
    rng = np.random.default_rng(5)
    k, v, s = make_data(rng, 100)
    res = run_native(k, v, s, n_head=N_HEAD, c0=10, n_region=70, chunk=8, n_remove=35)
    for h in range(N_HEAD):
        assert np.array_equal(res.dst[h, :10], np.arange(10))
        assert np.array_equal(res.dst[h, 80:], np.arange(80, 100) - 35)


def test_degenerate_keys() -> None:
    # identical keys everywhere: every score ties, the lowest cells merge, deterministically
    k = np.ones((64, N_HEAD * HEAD_DIM), dtype=np.float32)
    v = np.arange(64 * N_HEAD * HEAD_DIM, dtype=np.float32).reshape(64, -1)
    s = np.ones((N_HEAD, 64), dtype=np.float32)
    a = run_native(k, v, s, n_head=N_HEAD, c0=0, n_region=64, chunk=16, n_remove=10)
    b = run_native(k, v, s, n_head=N_HEAD, c0=0, n_region=64, chunk=16, n_remove=10, n_threads=1)
    assert np.array_equal(a.dst, b.dst) and np.array_equal(a.v_out, b.v_out)
    check_pass(a, s, 0, 64, 16, 10, 1e-6, 1e-6)
    # zero keys: similar to nothing (score 0), still merged when asked, no NaN anywhere
    z = run_native(np.zeros_like(k), v, s, n_head=N_HEAD, c0=0, n_region=64, chunk=16, n_remove=32)
    assert np.all(np.isfinite(z.score[z.best >= 0])) and np.all(np.isfinite(z.v_out))
    assert np.allclose(z.new_size[:, :32].sum(axis=1), 64)


def test_bad_arguments_are_rejected() -> None:
    k = np.zeros((32, N_HEAD * HEAD_DIM), dtype=np.float32)
    s = np.ones((N_HEAD, 32), dtype=np.float32)
    with pytest.raises(ValueError):
        run_native(k, k, s, n_head=N_HEAD, c0=0, n_region=32, chunk=15, n_remove=4)   # odd chunk
    with pytest.raises(ValueError):
        run_native(k, k, s, n_head=N_HEAD, c0=0, n_region=32, chunk=16, n_remove=17)  # more than half
    with pytest.raises(ValueError):
        run_native(k, k, s, n_head=N_HEAD, c0=0, n_region=32, chunk=16, n_remove=4,
                   type_v=lib.GGML_TYPE_Q8_0, v_trans=True)                          # quantized along cells
