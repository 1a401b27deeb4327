"""A NumPy reference of one Chelsea compression pass, and a runner for the native ops on the same data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chelsea_gguf._lib import ffi, lib

NO_SCORE = -2.0   # GGML_CHELSEA_NO_SCORE: a B cell, or an A cell with nothing to compare to
NONFINITE = -3.0  # GGML_CHELSEA_NONFINITE: a cell whose key or value slice holds NaN or Inf


@dataclass
class PassResult:
    k_in: np.ndarray     # [n_span, n_embd] the keys as stored (after conversion to the cache type)
    v_in: np.ndarray
    score: np.ndarray    # [n_head, n_region] best cosine of each A cell, -2 (no candidate) for B cells
    best: np.ndarray     # [n_head, n_region] chosen B (relative to c0), -1 for B cells
    dst: np.ndarray      # [n_head, n_span] destination cell of each source cell
    weight: np.ndarray   # [n_head, n_span]
    new_size: np.ndarray  # [n_head, n_span]
    k_out: np.ndarray    # [n_out, n_embd]
    v_out: np.ndarray


def run_native(k: np.ndarray, v: np.ndarray, s: np.ndarray, *, n_head: int, c0: int, n_region: int, chunk: int,
               n_remove: int, type_k: int = lib.GGML_TYPE_F32, type_v: int = lib.GGML_TYPE_F32,
               v_trans: bool = False, match_values: bool = False, n_threads: int = 2) -> PassResult:
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    s = np.ascontiguousarray(s, dtype=np.float32)
    n_span, n_embd = k.shape
    n_out = n_span - n_remove
    k_in = np.zeros_like(k)
    v_in = np.zeros_like(v)
    match = np.zeros((2, n_head, n_region), dtype=np.float32)
    plan = np.zeros((3, n_head, n_span), dtype=np.float32)
    k_out = np.zeros((n_out, n_embd), dtype=np.float32)
    v_out = np.zeros((n_out, n_embd), dtype=np.float32)

    def ptr(a: np.ndarray) -> object:
        return ffi.cast("float *", ffi.from_buffer(a))

    rc = lib.chelsea_ops_run_cpu(type_k, type_v, v_trans, match_values, n_embd, n_head, n_span, c0, n_region, chunk, n_remove,
                                 ptr(k), ptr(v), ptr(s), ptr(k_in), ptr(v_in), ptr(match), ptr(plan), ptr(k_out),
                                 ptr(v_out), n_threads)
    if rc != 0:
        raise ValueError("chelsea_ops_run_cpu rejected its arguments")
    return PassResult(k_in, v_in, match[0], match[1].astype(np.int64), plan[0].astype(np.int64), plan[1], plan[2],
                      k_out, v_out)


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def reference_match(k: np.ndarray, n_head: int, c0: int, n_region: int, chunk: int,
                    v: np.ndarray | None = None) -> np.ndarray:
    """Score of every A cell (odd offset in its chunk) against every B cell (even offset) of its chunk:
    [n_head, n_region, chunk] with -inf where there is no pair. The cosine of the keys, or with v (matching by
    keys and values) 1 - (1 - cos k)(1 - cos v)/2."""
    d = k.shape[1] // n_head
    dv = v.shape[1] // n_head if v is not None else 0
    score = np.full((n_head, n_region, chunk), -np.inf)
    for h in range(n_head):
        uk = unit_rows(k[c0:c0 + n_region, h * d:(h + 1) * d])
        uv = unit_rows(v[c0:c0 + n_region, h * dv:(h + 1) * dv]) if v is not None else None
        for first in range(0, n_region, chunk):
            length = min(chunk, n_region - first)
            for i in range(1, length, 2):
                for j in range(0, length, 2):
                    sc = uk[first + i] @ uk[first + j]
                    if uv is not None:
                        sc = 1.0 - 0.5 * (1.0 - sc) * (1.0 - uv[first + i] @ uv[first + j])
                    score[h, first + i, j] = sc
    return score


def reference_plan(score: np.ndarray, best: np.ndarray, s: np.ndarray, c0: int, n_remove: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From match results: the n_remove best A cells of each head merge into their B cell; survivors are
    packed low in order. Returns dst, weight and new_size, each [n_head, n_span]."""
    n_head, n_region = score.shape
    n_span = s.shape[1]
    n_out = n_span - n_remove
    dst = np.zeros((n_head, n_span), dtype=np.int64)
    weight = np.zeros((n_head, n_span))
    new_size = np.ones((n_head, n_span))
    for h in range(n_head):
        cands = [(-float(score[h, i]), i) for i in range(n_region) if best[h, i] >= 0]
        cands.sort()
        merged = {i for _, i in cands[:n_remove]}
        new_index = np.full(n_span, -1)
        nxt = 0
        for i in range(n_span):
            if not (c0 <= i < c0 + n_region and (i - c0) in merged):
                new_index[i] = nxt
                nxt += 1
        assert nxt == n_out
        for i in range(n_span):
            dst[h, i] = new_index[i] if new_index[i] >= 0 else new_index[c0 + best[h, i - c0]]
        total = np.zeros(n_out)
        np.add.at(total, dst[h], s[h].astype(np.float64))
        weight[h] = s[h] / total[dst[h]]
        new_size[h, :n_out] = total
    return dst, weight, new_size


def reference_merge(x: np.ndarray, dst: np.ndarray, weight: np.ndarray, n_out: int) -> np.ndarray:
    """x: [n_span, n_embd] -> [n_out, n_embd], each cell of head h the weighted sum of its sources."""
    n_head = dst.shape[0]
    d = x.shape[1] // n_head
    out = np.zeros((n_out, x.shape[1]))
    for h in range(n_head):
        np.add.at(out[:, h * d:(h + 1) * d], dst[h], weight[h][:, None] * x[:, h * d:(h + 1) * d].astype(np.float64))
    return out
