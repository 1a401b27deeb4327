"""What a user waits for, end to end: time to first token, decode speed over a long answer and the whole
prompt-plus-answer, for the full cache (f16, q8_0, q4_0), Chelsea R = 0.2, and the physical limit of a cache
that small.

    python3 bench/latency_bench.py                  # SmolLM2-135M, depths 8k, 16k, 32k, 256 tokens, 3 rounds
    python3 bench/latency_bench.py --model gemma    # Gemma-3-270M, depths 8k, 32k
    python3 bench/latency_bench.py --depths 1024,2048 --n-gen 64 --rounds 2 --threads 1 \\
        --out-stem latency_bench_smoke              # a smoke run that keeps the recorded results

At every depth each configuration answers the same prompt (the first `depth` tokens of Python's offline
reference text, ``common.document_tokens``) from an empty cache: ``Llama.reset()`` first, so that nothing of the
previous round's prompt is reused (each row checks that all `depth` prompt tokens were evaluated). Time to first
token is the wall clock from starting the prompt until ``Llama.generate_tokens`` yields its first token: the
prompt in chunks of 256 and Chelsea's compressions between chunks (since 2026-12-07 ``Llama`` brings the cache to
budget while generating, with the interval's compressions, not before the first token). Decode tok/s covers the
`--n-gen` greedy tokens from the first to the last, every online compression included; end to end is prompt plus
all of them. ``generate_tokens`` stops at an end-of-generation token and has no option to ignore it, so a run that
meets one feeds the EOS token and goes on (counted in ``eos_restarts``). Clustering milliseconds
(``kv_cluster_stats()["time_ms"]``) are split into before the first token and during decode.

``limit`` is the full f16 cache decoding with as many cells, on average, as Chelsea R = 0.2 held while it decoded
at that depth: no cache of Chelsea's size can decode faster, so Chelsea's decode / limit decode says how much of
that its compressions and bias leave. Chelsea's cells are those of its clustered cache
(``kv_cluster_stats()["cells"]``, Gemma's full-attention layers; ``kv_stats().n_cells_used`` would add the
sliding-window cache), read at every generated token of its first round and averaged. A full cache holds
prompt + k - 1 cells at its k-th token, so the limit's prompt (the first tokens of the same text) is that
average less (n_gen - 1) / 2: over the answer both hold the same cells on average (a prompt of the average
itself would hold (n_gen - 1) / 2 more). It needs ``chelsea R=0.2`` in the run, which runs before it in round 0.

Each configuration runs in its own worker process (decode_bench's ``ConfigProcess``), loading a context with
n_ctx = depth + n_gen + 64 for each depth before any measurement, and warming it with a short untimed answer.
Configurations run in rounds, one answer each per round in rotating order, so a shared machine's load slows them
alike: values are the median and min-max over rounds, and ratios against full f16 are taken within a round, then
the median over rounds. SmolLM2 was trained on 8k tokens (Gemma-3-270M on 32k): beyond that the numbers are
speed only, not answers worth reading. Results are written after every depth:
bench/results/latency_bench[_gemma].{json,md,png} (``--out-stem`` renames them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from chelsea_gguf import Llama
from chelsea_gguf.cluster import read_stats
from chelsea_gguf.sampling import SamplingParams

from common import FULL, N_BATCH, Method, chelsea, document_tokens, full_quantized, print_plot, provenance, write_run
from decode_bench import ConfigProcess, model_path, serve_commands

CHELSEA = chelsea(0.2)
LIMIT = "limit"
CONFIGS: dict[str, Method] = {m.name: m for m in [FULL, full_quantized("q8_0"), full_quantized("q4_0"), CHELSEA]}
CONFIGS[LIMIT] = FULL       # the full f16 cache at Chelsea R=0.2's average cells (limit_depth)
PLANS: dict[str, list[int]] = {"smollm2": [8192, 16384, 32768], "gemma": [8192, 32768]}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct Q4_1", "gemma": "Gemma-3-270M Q4_K_M"}
STEMS = {"smollm2": "latency_bench", "gemma": "latency_bench_gemma"}
CTX_MARGIN = 64
# per-round values summarised as median (min-max), and those compared with full f16 / the limit within a round
TIMED = ("ttft_s", "decode_tok_s", "e2e_s")
SUMMED = TIMED + ("cluster_ms_prompt", "cluster_ms_decode", "cluster_share_prompt", "cells_avg")


# ------------------------------------------------------------------ worker side


class Worker:
    """One configuration in its own process: a context per depth, one timed answer per `run` command."""

    def __init__(self, config: str, model: str, threads: int, n_gen: int) -> None:
        self.config, self.model, self.threads, self.n_gen = config, model, threads, n_gen
        self.method = CONFIGS[config]
        self.llm: Llama | None = None
        self.depth = 0
        self.doc: list[int] = []

    def open(self, depth: int) -> dict[str, Any]:
        """A context for `depth` prompt tokens plus the answer (the previous depth's is closed first)."""
        if self.llm is not None:
            self.llm.close()
        self.llm = Llama(model_path(self.model), n_ctx=depth + self.n_gen + CTX_MARGIN, n_batch=N_BATCH,
                         n_threads=self.threads, verbose=False, **self.method.llama_kwargs())
        self.doc = document_tokens(self.llm, depth)
        self.depth = depth
        # a short untimed answer, so that no round pays for first touching the weights and compute buffers
        for _ in self.llm.generate_tokens(self.doc[:min(N_BATCH, depth)], SamplingParams(temperature=0.0), 4):
            pass
        self.llm.reset()
        return {"n_ctx": self.llm.n_ctx(), "n_cells": self.llm.n_cells(), "n_ctx_train": self.llm.n_ctx_train()}

    def run(self, depth: int) -> dict[str, Any]:
        """One answer from an empty cache: the prompt of `depth` tokens, then n_gen greedy tokens."""
        if self.llm is None or depth != self.depth:
            self.open(depth)
        assert self.llm is not None
        self.llm.reset()
        out = timed_answer(self.llm, self.doc, self.n_gen)
        if out["prompt_tokens"] != depth:
            raise RuntimeError(f"{self.config}: {out['prompt_tokens']} prompt tokens evaluated, not {depth}: "
                               "a cached prefix was reused")
        return out

    def serve(self) -> None:
        """Commands run and open (with depth), as decode_bench's serve_commands reads them."""
        serve_commands(self, self.config)
        if self.llm is not None:
            self.llm.close()


def cluster_ms(llm: Llama) -> float:
    return read_stats(llm.ctx, 0).time_ms if llm.kv_cluster_options is not None else 0.0


def clustered_cells(llm: Llama) -> int:
    """Cells of the full-attention cache (the one Chelsea clusters; Gemma's sliding-window cache left out): with
    clustering its cells, else one per token."""
    if llm.kv_cluster_options is not None:
        return read_stats(llm.ctx, 0).cells
    return llm.kv_stats().tokens


def answer_tokens(llm: Llama, prompt: list[int], n_gen: int, restarts: list[int]) -> Iterator[int]:
    """Exactly n_gen greedy tokens after `prompt`: where ``generate_tokens`` stops at an end-of-generation token,
    the EOS token is fed and generation goes on from the cached tokens (each time appended to `restarts`)."""
    produced = 0
    tokens = prompt
    while True:
        for tok in llm.generate_tokens(tokens, SamplingParams(temperature=0.0), n_gen - produced):
            yield tok
            produced += 1
        if produced >= n_gen or llm.last_timings.stop_reason != "eog":
            return
        restarts.append(produced)
        produced += 1           # the end-of-generation token was generated too: it counts
        if produced >= n_gen:
            return
        tokens = list(llm._tokens) + [llm.token_eos()]


def timed_answer(llm: Llama, prompt: list[int], n_gen: int) -> dict[str, Any]:
    """Wall clock of one answer: to the first token, and from it to the last; clustering time and cells held."""
    restarts: list[int] = []
    ms0 = cluster_ms(llm)
    t0 = time.perf_counter()
    gen = answer_tokens(llm, prompt, n_gen, restarts)
    next(gen)
    t_first = time.perf_counter()
    prompt_tokens = llm.last_timings.prompt_tokens
    ms_first = cluster_ms(llm)
    kv = llm.kv_stats()
    cells = [clustered_cells(llm)]
    n = 1
    for _ in gen:
        n += 1
        cells.append(clustered_cells(llm))
    t_end = time.perf_counter()
    ms_end = cluster_ms(llm)
    ttft, decode = t_first - t0, t_end - t_first
    n_gen_done = n + len(restarts)
    return {"prompt_tokens": prompt_tokens, "generated": n_gen_done, "eos_restarts": len(restarts),
            "ttft_s": ttft, "decode_s": decode, "e2e_s": t_end - t0,
            # steps from the first token to the last
            "decode_tok_s": (n_gen_done - 1) / decode if decode > 0 else math.nan,
            "cluster_ms_prompt": ms_first - ms0, "cluster_ms_decode": ms_end - ms_first,
            "cluster_share_prompt": (ms_first - ms0) / (ttft * 1000.0),
            "cells_first": cells[0], "cells_end": cells[-1], "cells_avg": statistics.fmean(cells),
            "n_cells_used_first": kv.n_cells_used, "n_cells_used_end": llm.kv_stats().n_cells_used,
            "n_cells": kv.n_cells, "kv_mib": kv.kv_mib, "type_k": kv.type_k}


# ------------------------------------------------------------------ parent side


class LatencyProcess(ConfigProcess):
    """decode_bench's handle on a worker process, started on this script's worker."""

    def __init__(self, config: str, args: argparse.Namespace) -> None:
        # not super().__init__, which starts decode_bench's own worker
        self.start(config, [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--model", args.model,
                            "--threads", str(args.threads), "--n-gen", str(args.n_gen)])


def round_order(configs: list[str], r: int) -> list[str]:
    """Round r's order: `configs` rotated by r (round 0 in `configs`' order, where Chelsea precedes the limit)."""
    k = r % len(configs)
    return configs[k:] + configs[:k]


def limit_depth(chelsea_run: dict[str, Any], n_gen: int) -> int:
    """The full cache's prompt whose answer holds Chelsea's average cells: prompt + (n_gen - 1) / 2 on average."""
    return max(1, round(chelsea_run["cells_avg"] - (n_gen - 1) / 2))


def measure_depth(procs: dict[str, LatencyProcess], depth: int, rounds: int, n_gen: int) -> list[dict[str, Any]]:
    """Every configuration's runs at `depth`, in rounds; the limit's prompt is Chelsea's average cells in round 0."""
    configs = list(procs)
    depths = {c: depth for c in configs if c != LIMIT}
    opened = {c: procs[c].call("open", depth=d) for c, d in depths.items()}   # loaded before any measurement
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(rounds):
        for c in round_order(configs, r):
            if c == LIMIT and c not in depths:
                depths[c] = limit_depth(runs[CHELSEA.name][0], n_gen)
                opened[c] = procs[c].call("open", depth=depths[c])
            run = procs[c].call("run", depth=depths[c])
            runs[c].append(run)
            print(json.dumps({"config": c, "depth": depth, "round": r, **{k: run[k] for k in (
                "prompt_tokens", "ttft_s", "decode_tok_s", "e2e_s", "cluster_ms_prompt", "cluster_ms_decode",
                "cells_avg", "eos_restarts")}}), flush=True)
    return [{**summarise(c, depth, runs[c], runs), **opened[c]} for c in configs]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired(mine: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> dict[str, float]:
    """The ratio within each round (runs of one round ran back to back), summarised over rounds."""
    return spread([a[key] / b[key] for a, b in zip(mine, base)])


def summarise(config: str, depth: int, runs: list[dict[str, Any]],
              all_runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    first = runs[0]
    row: dict[str, Any] = {"config": config, "depth": depth, "prompt_tokens": first["prompt_tokens"],
                           "kv_mib": first["kv_mib"], "n_cells": first["n_cells"], "type_k": first["type_k"],
                           "cells_first": first["cells_first"], "cells_end": first["cells_end"],
                           "eos_restarts": sum(r["eos_restarts"] for r in runs), "runs": runs}
    row.update({k: spread([r[k] for r in runs]) for k in SUMMED})
    base = all_runs[FULL.name]
    row["vs_full"] = {k: paired(runs, base, k) for k in TIMED}
    if LIMIT in all_runs:
        row["vs_limit"] = {"decode_tok_s": paired(runs, all_runs[LIMIT], "decode_tok_s")}
    return row


# ------------------------------------------------------------------ report


def fmt(s: dict[str, float], digits: int) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table_row(r: dict[str, Any]) -> str:
    vs = r["vs_full"]
    limit = f"{r['vs_limit']['decode_tok_s']['median']:.2f}" if "vs_limit" in r and r["config"] != LIMIT else "-"
    config = r["config"] + (f" ({r['prompt_tokens']} tokens)" if r["config"] == LIMIT else "")
    cluster = r["cluster_ms_prompt"]["median"] + r["cluster_ms_decode"]["median"] > 0
    return (f"| {config} | {r['depth']} | {fmt(r['ttft_s'], 2)} {vs['ttft_s']['median']:.2f}x | "
            f"{fmt(r['decode_tok_s'], 1)} {vs['decode_tok_s']['median']:.2f}x | "
            f"{fmt(r['e2e_s'], 2)} {vs['e2e_s']['median']:.2f}x | {limit} | "
            + (f"{r['cluster_ms_prompt']['median']:.0f} | {r['cluster_ms_decode']['median']:.0f} | "
               f"{100 * r['cluster_share_prompt']['median']:.1f} | " if cluster else "- | - | - | ")
            + f"{r['cells_first']} / {r['cells_avg']['median']:.0f} / {r['cells_end']} | {r['kv_mib']:.1f} |")


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n_train = meta.get("n_ctx_train")
    beyond = [d for d in meta["depths_done"] if n_train and d > n_train]
    lines = [
        f"# Latency a user waits for: {meta['model']}",
        "",
        f"{meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread(s), commit {meta['commit']}, {meta['date']}; "
        f"command `{meta['command']}`, {meta['wall_s']:.0f} s. Each configuration answers a prompt of `depth` tokens "
        f"with {meta['n_gen']} greedy tokens from an empty cache, once per round, in {meta['rounds']} rounds "
        "(rotating order). TTFT: prompt, Chelsea's compressions, first token. Decode tok/s: from the first token to "
        "the last, every compression included. End to end: TTFT plus decode. Values: median (min-max) over rounds; "
        "`x`: the median over rounds of the ratio to full f16 within a round. `limit`: full f16 holding, on average "
        "over its answer, the cells Chelsea R=0.2 held while decoding (its prompt: that average less (n_gen-1)/2 "
        "tokens, in brackets); its TTFT ratio compares that shorter prompt. Share of limit: decode tok/s / the "
        "limit's, within a round. Clustering ms: "
        "Chelsea's compression time before the first token and during decode; % of prompt: the former over TTFT. "
        "Cells: held at the first token / on average while decoding / at the end (Chelsea: its clustered cache). "
        f"KV MiB: the real allocation for n_ctx = depth + {meta['n_gen']} + {CTX_MARGIN}.",
    ]
    if n_train:
        lines += ["", f"The model's training context is {n_train} tokens"
                  + (f": at depths beyond it ({', '.join(map(str, beyond))}) the numbers are speed only, the "
                     "answers' quality is not what this measures." if beyond else ".")]
    lines += [
        "",
        "| config | depth | TTFT s (vs full) | decode tok/s incl. compressions (vs full) | end-to-end s (vs full) | "
        "share of limit | cluster ms before 1st token | cluster ms decode | cluster % of prompt | "
        "cells first / avg / end | KV MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [table_row(r) for r in rows]
    restarts = sum(r["eos_restarts"] for r in rows)
    if restarts:
        lines += ["", f"{restarts} answers met an end-of-generation token and went on after feeding EOS."]
    return "\n".join(lines) + "\n"


def plot(path: Path) -> Path:
    """Decode and end-to-end speed relative to full f16 against depth, error bars min-max over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows, meta = data["rows"], data["meta"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("decode_tok_s", "e2e_s"), ("decode tok/s vs full f16 (higher: faster)",
                                                                 "end-to-end seconds vs full f16 (lower: faster)")):
        for config in dict.fromkeys(r["config"] for r in rows):
            mine = [r for r in rows if r["config"] == config]
            s = [r["vs_full"][key] for r in mine]
            med = [x["median"] for x in s]
            ax.errorbar([r["depth"] for r in mine], med, yerr=[[m - x["min"] for m, x in zip(med, s)],
                                                               [x["max"] - m for m, x in zip(med, s)]],
                        marker="o", capsize=3, label=config)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt depth (tokens)")
        ax.set_ylabel("ratio to full f16 (within a round)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['model']}, {meta['n_gen']} tokens, {meta.get('cpu')}, {meta['threads']} thread(s), "
                 f"commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------ main


def choose_configs(arg: str | None) -> list[str]:
    configs = arg.split(",") if arg else list(CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if FULL.name not in configs:
        raise SystemExit(f"--configs must include {FULL.name!r}: ratios are taken against it within a round")
    if LIMIT in configs and CHELSEA.name not in configs:
        raise SystemExit(f"--configs: {LIMIT!r} takes its prompt length from {CHELSEA.name!r}, include it")
    # in this order, round 0 runs Chelsea before the limit
    return [c for c in CONFIGS if c in configs]


def command_line(args: argparse.Namespace) -> str:
    out = "python3 bench/latency_bench.py" + (" --model gemma" if args.model == "gemma" else "")
    for flag, value, default in (("--depths", args.depths, None), ("--n-gen", args.n_gen, 256),
                                 ("--rounds", args.rounds, 3), ("--threads", args.threads, 2),
                                 ("--configs", args.configs, None), ("--out-stem", args.out_stem, None)):
        if value != default:
            out += f" {flag} " + (f"'{value}'" if isinstance(value, str) and " " in value else str(value))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(PLANS), default="smollm2")
    ap.add_argument("--depths", help="comma-separated prompt depths (default: 8192,16384,32768; gemma 8192,32768)")
    ap.add_argument("--n-gen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--out-stem", help="result file names (default latency_bench[_gemma])")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Worker(args.worker, args.model, args.threads, args.n_gen).serve()
        return 0
    if args.n_gen < 2 or args.rounds < 1:
        raise SystemExit("--n-gen must be at least 2 and --rounds at least 1")
    depths = [int(d) for d in args.depths.split(",")] if args.depths else PLANS[args.model]
    configs = choose_configs(args.configs)
    stem = args.out_stem or STEMS[args.model]
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    procs = {c: LatencyProcess(c, args) for c in configs}
    try:
        for depth in depths:
            rows += measure_depth(procs, depth, args.rounds, args.n_gen)
            rows.sort(key=lambda r: (configs.index(r["config"]), r["depth"]))
            # written after every depth: an interrupted run keeps what it measured
            meta = provenance(command_line(args), model=MODEL_NAMES[args.model], threads=args.threads,
                              n_gen=args.n_gen, rounds=args.rounds, configs=configs, depths=depths,
                              depths_done=sorted({r["depth"] for r in rows}), n_ctx_train=rows[0]["n_ctx_train"],
                              limit_cells="prompt = chelsea R=0.2's clustered-cache cells averaged over every "
                                          "generated token of its round-0 answer, less (n_gen - 1) / 2",
                              wall_s=round(time.time() - t0, 1))
            path = write_run(stem, meta, rows, markdown(rows, meta))
    finally:
        for p in procs.values():
            p.close()
    print(markdown(rows, meta))
    print_plot(plot, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
