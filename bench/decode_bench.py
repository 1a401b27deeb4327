"""Decode speed, KV memory and clustering overhead at growing depth: full cache vs Chelsea clustering.

One command, one run, ratios computed inside it (these machines are noisy):

    python3 bench/decode_bench.py                 # depths 2k, 4k, 8k; full, R=0.25, R=0.2
    python3 bench/decode_bench.py --quick         # depths 1k, 2k (a smoke run)

Each configuration feeds one growing document (Python's own reference text, pydoc_data, offline) and, at
each depth, generates --n-gen tokens greedily: decode tok/s at that depth. Clustered runs compress after
each prompt chunk and online while generating, so their decode time includes that work. Results go to
bench/results/decode_bench.{json,md}, and a plot to decode_bench.png when matplotlib is there (.[bench]).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def document_tokens(llm: Llama, n: int) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    tokens = llm.tokenize(text)
    if len(tokens) < n:
        raise SystemExit(f"the reference text has only {len(tokens)} tokens, fewer than {n}")
    return tokens[:n]


def run_config(name: str, kwargs: dict[str, Any], depths: list[int], n_gen: int, n_ctx: int,
               n_threads: int | None) -> list[dict[str, Any]]:
    rows = []
    with Llama(None, n_ctx=n_ctx, n_batch=256, n_threads=n_threads, verbose=False, **kwargs) as llm:
        doc = document_tokens(llm, max(depths))
        prompt_ms = 0.0
        fed = 0
        for depth in depths:
            # the cached tokens (document so far and what was generated) plus the document up to this depth
            context = list(llm._tokens) + doc[fed:depth]
            fed = depth
            gen = llm.generate_tokens(context, SamplingParams(temperature=0.0), n_gen)
            n = sum(1 for _ in gen)
            t = llm.last_timings
            prompt_ms += t.prompt_ms
            row: dict[str, Any] = {
                "config": name, "depth": depth, "context_tokens": llm.n_tokens, "generated": n,
                "prompt_tokens": t.prompt_tokens, "prompt_ms": t.prompt_ms,
                "decode_tok_s": t.generation_tok_per_s,
                "kv_mib": llm.kv_stats().kv_mib, "cells_used": llm.kv_stats().n_cells_used,
            }
            if llm.kv_cluster_options is not None:
                cs = llm.kv_cluster_stats()
                row.update(cluster_ms=cs["time_ms"], compression=cs["compression"], passes=cs["passes"],
                           cluster_share_of_prefill=cs["time_ms"] / prompt_ms if prompt_ms else 0.0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    full = {r["depth"]: r for r in rows if r["config"] == "full"}
    for r in rows:
        base = full[r["depth"]]
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["kv_mib_ratio"] = r["kv_mib"] / base["kv_mib"]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Decode speed and KV memory vs depth: full cache vs Chelsea clustering",
        "",
        f"Model {meta['model']}, {meta['machine']}, {meta['threads']} threads, commit {meta['commit']}, "
        f"{meta['date']}. Command: `{meta['command']}`. KV MiB is the real allocation (K, V and cluster sizes) "
        f"for a logical context of {meta['n_ctx']} tokens; clustering time is the share of prefill time spent "
        "compressing.",
        "",
        "| config | depth | decode tok/s | speedup | KV MiB | KV ratio | cells used | clustering / prefill |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = f"{100 * r['cluster_share_of_prefill']:.1f}%" if "cluster_share_of_prefill" in r else "-"
        lines.append(f"| {r['config']} | {r['depth']} | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{r['kv_mib']:.1f} | {r['kv_mib_ratio']:.2f} | {r['cells_used']} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="depths 1k and 2k only")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    depths = [1024, 2048] if args.quick else [2048, 4096, 8192]
    n_ctx = max(depths) + 2 * args.n_gen * len(depths) + 256
    configs = {"full": {}, "chelsea R=0.25": {"kv_cluster": True, "kv_cluster_ratio": 0.25},
               "chelsea R=0.2": {"kv_cluster": True, "kv_cluster_ratio": 0.2}}
    t0 = time.time()
    rows = []
    for name, kw in configs.items():
        rows += run_config(name, kw, depths, args.n_gen, n_ctx, args.threads)
    add_ratios(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    meta = {"model": "SmolLM2-135M-Instruct Q4_1", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads or len(os.sched_getaffinity(0)), "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%d"), "command": "python3 bench/decode_bench.py" + (" --quick" if args.quick else ""),
            "n_ctx": n_ctx, "wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_bench_quick" if args.quick else "decode_bench"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    try:
        from plot_decode import plot
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
    else:
        print(plot(out / f"{stem}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
