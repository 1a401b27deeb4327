"""What reading a prompt's end first, and again before each merge, costs in time to first token.

    python3 bench/lookahead_cost.py                      # 8192-token prompt, R = 0.2, 2 rounds, 1 thread
    python3 bench/lookahead_cost.py --depth 4096 --rounds 3

Three Chelsea contexts sized to the prompt (n_ctx = depth + 320, as latency_bench.py), answering the same document
prompt (``common.document_tokens``) to its first token from an empty cache, in rotating order each round:
``lookahead`` (the default: the end read first, and again before a chunk that merges once
16 x attn_window tokens came since its last reading), ``read once`` (the end read
first only: ``Llama.refresh_read_ahead`` switched off in this process) and ``no lookahead``
(``kv_cluster_lookahead=False``). Writes ``results/lookahead_cost.json`` and ``.md``: median (min-max) seconds to the
first token, clustering seconds and passes, and the ratio to ``no lookahead`` within each round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.sampling import SamplingParams

from common import N_BATCH, RESULTS, document_tokens, provenance, write_json
from retrieval import model_path

CONFIGS = ("lookahead", "read once", "no lookahead")


def first_token(llm: Llama, prompt: list[int], read_again: bool) -> dict[str, float]:
    """Seconds to the first greedy token from an empty cache, clustering seconds and passes."""
    stock = Llama.refresh_read_ahead
    if not read_again:
        Llama.refresh_read_ahead = lambda self, *args: False  # type: ignore[method-assign]
    try:
        llm.reset()
        before = llm.kv_cluster_stats()
        t0 = time.perf_counter()
        for _ in llm.generate_tokens(prompt, SamplingParams(temperature=0.0), 1):
            pass
        seconds = time.perf_counter() - t0
    finally:
        Llama.refresh_read_ahead = stock  # type: ignore[method-assign]
    after = llm.kv_cluster_stats()
    return {"ttft_s": seconds, "cluster_s": (after["time_ms"] - before["time_ms"]) / 1000.0,
            "passes": after["passes"] - before["passes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.perf_counter()

    llms = {c: Llama(model_path("smollm2"), n_ctx=args.depth + 320, n_batch=N_BATCH, n_threads=args.threads,
                     verbose=False, kv_cluster=True, kv_cluster_ratio=args.ratio,
                     kv_cluster_lookahead=c != "no lookahead") for c in CONFIGS}
    prompt = document_tokens(llms[CONFIGS[0]], args.depth)
    for llm in llms.values():   # first touch of the weights and compute buffers, untimed
        for _ in llm.generate_tokens(prompt[:N_BATCH], SamplingParams(temperature=0.0), 2):
            pass
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for config in order:
            out = first_token(llms[config], prompt, read_again=config == "lookahead")
            rows.append({"round": r, "config": config, **out})
            print(f"round {r} {config}: {out['ttft_s']:.2f} s, clustering {out['cluster_s']:.2f} s, "
                  f"{out['passes']} passes", file=sys.stderr, flush=True)
    for llm in llms.values():
        llm.close()

    def cell(values: list[float], digits: int = 2) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    base = {r["round"]: r["ttft_s"] for r in rows if r["config"] == "no lookahead"}
    lines = ["# Reading a prompt's end first, and again before each merge: time to first token", "",
             f"SmolLM2-135M Q4_1, a {args.depth}-token document prompt in a context sized to it, R = {args.ratio:g}, "
             f"{args.threads} thread(s), {args.rounds} rounds in rotating order; median (min-max). "
             "`x`: median over rounds of the ratio to `no lookahead` in the same round. Command: "
             f"`python3 bench/lookahead_cost.py --depth {args.depth} --ratio {args.ratio:g} --rounds {args.rounds} "
             f"--threads {args.threads}`.", "",
             "| config | first token s | x | clustering s | passes |", "|---|---:|---:|---:|---:|"]
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        ratio = statistics.median(r["ttft_s"] / base[r["round"]] for r in mine)
        lines.append(f"| {config} | {cell([r['ttft_s'] for r in mine])} | {ratio:.3f}x | "
                     f"{cell([r['cluster_s'] for r in mine])} | {statistics.median(r['passes'] for r in mine):g} |")
    meta = provenance(" ".join(["python3", "bench/lookahead_cost.py"] + sys.argv[1:]), depth=args.depth,
                      ratio=args.ratio, rounds=args.rounds, threads=args.threads,
                      wall_s=round(time.perf_counter() - t_start, 1))
    write_json("lookahead_cost", {"meta": meta, "rows": rows})
    (RESULTS / "lookahead_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
