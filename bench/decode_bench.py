"""Prompt and decode speed, KV memory and peak RSS at growing depth, for the full cache (f16, q8_0, q4_0)
and Chelsea clustering (R = 0.5, 0.25, 0.2, 0.1, and R = 0.2 stacked with q8_0).

    python3 bench/decode_bench.py                  # SmolLM2-135M, depths 2k, 4k, 8k, all configurations
    python3 bench/decode_bench.py --model gemma    # Gemma-3-270M, depths 4k, 16k: full f16, R=0.2
    python3 bench/decode_bench.py --quick          # SmolLM2, depths 512, 1k: full f16, q8_0, R=0.2

Each configuration runs in its own process (peak RSS is per process), feeding one growing document
(Python's own reference text, ``pydoc_data``, offline) in chunks of 256 tokens. At each depth the worker
records prompt tok/s of the segment just fed, then decodes ``--reps`` bursts of ``--n-gen`` greedy tokens:
decode tok/s is given as min/median/max over those bursts. Clustered runs compress after each prompt chunk
and online while generating, so their times include that work. Ratios against the full f16 cache are taken
within one run. Results: bench/results/decode_bench[_gemma|_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.sampling import SamplingParams

from common import FULL, N_BATCH, RESULTS, Method, chelsea, document_tokens, provenance, write_json

CONFIGS: dict[str, Method] = {m.name: m for m in [
    FULL, Method("full q8_0", type_kv="q8_0"), Method("full q4_0", type_kv="q4_0"),
    chelsea(0.5), chelsea(0.25), chelsea(0.2), chelsea(0.1), chelsea(0.2, type_kv="q8_0")]}
PLANS: dict[str, tuple[list[int], list[str]]] = {
    "smollm2": ([2048, 4096, 8192], list(CONFIGS)),
    "gemma": ([4096, 16384], ["full f16", "chelsea R=0.2"]),
    "quick": ([512, 1024], ["full f16", "full q8_0", "chelsea R=0.2"]),
}


def model_path(model: str) -> str | None:
    if model == "gemma":
        from chelsea_gguf.models import gemma3_270m_path

        return str(gemma3_270m_path())
    return None


def worker(config: str, depths: list[int], n_gen: int, reps: int, model: str, threads: int) -> dict[str, Any]:
    """One configuration in this process: a row per depth, and this process's peak RSS."""
    method = CONFIGS[config]
    n_ctx = max(depths) + reps * n_gen * len(depths) + 64
    rows = []
    with Llama(model_path(model), n_ctx=n_ctx, n_batch=N_BATCH, n_threads=threads, verbose=False,
               **method.llama_kwargs()) as llm:
        doc = document_tokens(llm, max(depths))
        fed = 0
        for depth in depths:
            # cached tokens (document so far, generated tokens) plus the document up to this depth
            gen = llm.generate_tokens(list(llm._tokens) + doc[fed:depth], SamplingParams(temperature=0.0), n_gen)
            speeds = [_drain(gen, llm)]
            prompt = llm.last_timings
            fed = depth
            for _ in range(reps - 1):
                speeds.append(_drain(llm.generate_tokens(list(llm._tokens), SamplingParams(temperature=0.0),
                                                         n_gen), llm))
            kv = llm.kv_stats()
            row: dict[str, Any] = {
                "config": config, "depth": depth, "prompt_tokens": prompt.prompt_tokens,
                "prompt_tok_s": prompt.prompt_tok_per_s, "decode_tok_s": statistics.median(speeds),
                "decode_tok_s_min": min(speeds), "decode_tok_s_max": max(speeds), "decode_bursts": speeds,
                "kv_mib": kv.kv_mib, "cells": kv.n_cells, "cells_used": kv.n_cells_used, "type_k": kv.type_k}
            if llm.kv_cluster_options is not None:
                row["cluster_ms"] = llm.kv_cluster_stats()["time_ms"]
            rows.append(row)
    # ru_maxrss is in KiB on Linux
    return {"rows": rows, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _drain(gen: Any, llm: Llama) -> float:
    for _ in gen:
        pass
    return llm.last_timings.generation_tok_per_s


def run_config(config: str, depths: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process, so that its peak RSS is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--depths", ",".join(map(str, depths)),
           "--n-gen", str(args.n_gen), "--reps", str(args.reps), "--model", args.model, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict[str, Any]]) -> None:
    full = {r["depth"]: r for r in rows if r["config"] == FULL.name}
    for r in rows:
        base = full[r["depth"]]
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prompt_speedup"] = r["prompt_tok_s"] / base["prompt_tok_s"]
        r["kv_mib_ratio"] = r["kv_mib"] / base["kv_mib"]
        r["rss_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Speed and memory vs depth: {meta['model']}",
        "",
        f"{meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread(s), commit {meta['commit']}, {meta['date']}; "
        f"command `{meta['command']}`, {meta['wall_s']:.0f} s. Decode tok/s: median (min-max) of {meta['reps']} "
        f"bursts of {meta['n_gen']} tokens at each depth. KV MiB is the real allocation (K, V, cluster sizes) for "
        f"a logical context of {meta['n_ctx']} tokens; peak RSS of the whole process (one per configuration). "
        "Ratios are against full f16 in the same run.",
        "",
        "| config | depth | prompt tok/s | decode tok/s | decode vs full | KV MiB | KV ratio | peak RSS MiB | cells used |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['depth']} | {r['prompt_tok_s']:.0f} ({r['prompt_speedup']:.2f}x) | "
            f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}) | "
            f"{r['decode_speedup']:.2f}x | {r['kv_mib']:.1f} | {r['kv_mib_ratio']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['cells_used']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=["smollm2", "gemma"], default="smollm2")
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: on a shared 2-core machine one thread is faster and steadier")
    ap.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--depths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [int(d) for d in args.depths.split(",")], args.n_gen, args.reps,
                                args.model, args.threads)))
        return 0
    plan = "quick" if args.quick else args.model
    depths, configs = PLANS[plan]
    if args.configs:
        configs = args.configs.split(",")
    if FULL.name not in configs:
        raise SystemExit(f"--configs must include {FULL.name!r}: ratios are taken against it within the run")
    # the full cache first, so that results can be written (with ratios) after every configuration
    configs = [FULL.name] + [c for c in configs if c != FULL.name]
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    stem = {"smollm2": "decode_bench", "gemma": "decode_bench_gemma", "quick": "decode_bench_quick"}[plan]
    command = "python3 bench/decode_bench.py" + (" --quick" if args.quick else
                                                 (" --model gemma" if args.model == "gemma" else ""))
    if args.configs:
        command += f" --configs '{args.configs}'"
    for config in configs:
        result = run_config(config, depths, args)
        for r in result["rows"]:
            r["peak_rss_mib"] = result["peak_rss_mib"]
            print(json.dumps({k: v for k, v in r.items() if k != "decode_bursts"}), flush=True)
        rows += result["rows"]
        add_ratios(rows)
        # written after every configuration: an interrupted run keeps what it measured
        meta = provenance(command, model="Gemma-3-270M Q4_K_M" if args.model == "gemma" else "SmolLM2-135M-Instruct Q4_1",
                          threads=args.threads, n_gen=args.n_gen, reps=args.reps, configs_done=len(set(r["config"] for r in rows)),
                          configs_planned=len(configs),
                          n_ctx=max(depths) + args.reps * args.n_gen * len(depths) + 64, wall_s=round(time.time() - t0, 1))
        path = write_json(stem, {"meta": meta, "rows": rows})
        (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    try:
        from plot_decode import plot
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
    else:
        print(plot(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
