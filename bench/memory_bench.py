"""What a context allocates besides the weights: KV cache and compute buffers, full cache vs Chelsea.

    python3 bench/memory_bench.py           # SmolLM2-135M and Gemma-3-270M, contexts 8k/32k/64k, FA off and on
    python3 bench/memory_bench.py --quick   # SmolLM2-135M, 8k, FA off and on

Both numbers are read from the backend buffers llama.cpp allocated (``Llama.kv_stats()``: K, V and cluster
sizes; the scheduler's compute buffers). They are taken right after the context is created, which is the worst
case of a run: llama.cpp reserves its compute buffers for the largest batch over the whole cache, and switching
clustering on reserves them again with the per-head log(size) masks that attention adds once cells are merged
(tests/test_cluster.py checks that a run that merges allocates nothing more). Batch sizes are Llama's defaults
(n_batch = n_ubatch = 512), the compute buffer's largest term with the default logits. Ratios are against the
full f16 cache with the same model, context and flash-attention setting.
Results: bench/results/memory_bench[_quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf._lib import lib
from chelsea_gguf.models import gemma3_270m_path, smollm2_path

from common import FULL, RESULTS, Method, chelsea, full_quantized, provenance, write_json

CONFIGS = [FULL, full_quantized("q8_0"), chelsea(0.25), chelsea(0.2), chelsea(0.1),
           chelsea(0.2, type_kv="q8_0")]
MODELS = {"SmolLM2-135M-Instruct Q4_1": smollm2_path, "Gemma-3-270M Q4_K_M": gemma3_270m_path}


def measure(model: str, n_ctx: int, method: Method, flash_attn: bool) -> dict[str, Any]:
    kwargs = method.llama_kwargs()
    if flash_attn:
        kwargs["flash_attn"] = True
    with Llama(str(MODELS[model]()), n_ctx=n_ctx, verbose=False, **kwargs) as llm:
        kv = llm.kv_stats()
        return {"model": model, "n_ctx": n_ctx, "flash_attn": flash_attn, "config": method.name,
                "kv_mib": kv.kv_mib, "compute_mib": kv.compute_mib, "total_mib": kv.kv_mib + kv.compute_mib,
                "cells": kv.n_cells, "n_ubatch": int(lib.llama_n_ubatch(llm._ctx))}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    full = {(r["model"], r["n_ctx"], r["flash_attn"]): r for r in rows if r["config"] == FULL.name}
    for r in rows:
        base = full[r["model"], r["n_ctx"], r["flash_attn"]]
        for key in ("kv_mib", "compute_mib", "total_mib"):
            r[key.replace("_mib", "_ratio")] = r[key] / base[key]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Memory a context allocates: KV cache and compute buffers",
        "",
        f"Commit {meta['commit']}, {meta['date']}; command `{meta['command']}`, {meta['wall_s']:.0f} s. Read from the "
        "allocated backend buffers right after the context is created (the reserve covers the whole run); "
        "default batch sizes (512). Ratios against full f16 with the same model, context and flash attention.",
        "",
        "| model | context | flash attn | config | cells | KV MiB | compute MiB | KV + compute MiB | vs full |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_ctx'] // 1024}k | {'on' if r['flash_attn'] else 'off'} | {r['config']} | "
            f"{r['cells']} | {r['kv_mib']:.1f} ({r['kv_ratio']:.2f}) | {r['compute_mib']:.1f} "
            f"({r['compute_ratio']:.2f}) | {r['total_mib']:.1f} | {r['total_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    models = list(MODELS)[:1] if args.quick else list(MODELS)
    contexts = [8192] if args.quick else [8192, 32768, 65536]
    t0 = time.time()
    rows = []
    for model in models:
        for n_ctx in contexts:
            for flash_attn in (False, True):
                for method in CONFIGS:
                    if method.type_kv and not flash_attn:
                        continue  # llama.cpp quantizes V only with flash attention
                    rows.append(measure(model, n_ctx, method, flash_attn))
                    print(json.dumps(rows[-1]), flush=True)
    add_ratios(rows)
    stem = "memory_bench_quick" if args.quick else "memory_bench"
    meta = provenance("python3 bench/memory_bench.py" + (" --quick" if args.quick else ""),
                      wall_s=round(time.time() - t0, 1))
    print(write_json(stem, {"meta": meta, "rows": rows}))
    (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
