"""Prompt and decode speed, KV memory and peak RSS at growing depth, for the full cache (f16, q8_0, q4_0)
and Chelsea clustering (R = 0.5, 0.25, 0.2, 0.1, and R = 0.2 stacked with q8_0).

    python3 bench/decode_bench.py                  # SmolLM2-135M, depths 2k, 4k, 8k, all configurations
    python3 bench/decode_bench.py --model gemma    # Gemma-3-270M, depths 4k, 16k: full f16, R=0.2
    python3 bench/decode_bench.py --quick          # SmolLM2, depths 512, 1k: full f16, q8_0, R=0.2

Each configuration runs in its own process (peak RSS is per process), feeding one growing document
(Python's own reference text, ``pydoc_data``, offline) in chunks of 256 tokens. At each depth every worker
feeds the segment up to that depth (prompt tok/s) and decodes a first burst of ``--n-gen`` greedy tokens, one
configuration after another; then ``--reps`` rounds each decode one burst per configuration, back to back, so
that a shared machine's changing load slows them alike: decode tok/s is min/median/max over those bursts, and
decode vs full the median over rounds of the ratio within a round. Clustered runs compress after prompt chunks
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
import tempfile
import time
from pathlib import Path
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.sampling import SamplingParams

from common import FULL, N_BATCH, Method, chelsea, full_quantized, document_tokens, print_plot, provenance, write_run

CONFIGS: dict[str, Method] = {m.name: m for m in [
    FULL, full_quantized("q8_0"), full_quantized("q4_0"),
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


def context_size(depths: list[int], n_gen: int, reps: int) -> int:
    """Logical context of every configuration: the deepest document plus every burst generated on the way."""
    return max(depths) + (reps + 1) * n_gen * len(depths) + 64


class Worker:
    """One configuration, served in its own process (its peak RSS is its own) to the parent, which interleaves
    the decode bursts of all configurations: a busy shared machine then slows every configuration alike."""

    def __init__(self, config: str, depths: list[int], n_gen: int, reps: int, model: str, threads: int) -> None:
        self.config, self.n_gen = config, n_gen
        self.llm = Llama(model_path(model), n_ctx=context_size(depths, n_gen, reps), n_batch=N_BATCH,
                         n_threads=threads, verbose=False, **CONFIGS[config].llama_kwargs())
        self.doc = document_tokens(self.llm, max(depths))
        self.fed = 0

    def feed(self, depth: int) -> dict[str, Any]:
        """The document up to `depth` after what is cached, then a first burst: with clustering it pays for
        compressing the prompt to budget, so it is recorded apart from the steady bursts."""
        gen = self.llm.generate_tokens(list(self.llm._tokens) + self.doc[self.fed:depth],
                                       SamplingParams(temperature=0.0), self.n_gen)
        first = _drain(gen, self.llm)
        prompt = self.llm.last_timings
        self.fed = depth
        return {"prompt_tokens": prompt.prompt_tokens, "prompt_tok_s": prompt.prompt_tok_per_s,
                "decode_tok_s_first": first}

    def burst(self) -> dict[str, Any]:
        return {"tok_s": _drain(self.llm.generate_tokens(list(self.llm._tokens), SamplingParams(temperature=0.0),
                                                         self.n_gen), self.llm)}

    def stats(self) -> dict[str, Any]:
        kv = self.llm.kv_stats()
        out: dict[str, Any] = {"kv_mib": kv.kv_mib, "cells": kv.n_cells, "cells_used": kv.n_cells_used,
                               "type_k": kv.type_k,
                               # ru_maxrss is in KiB on Linux
                               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.llm.kv_cluster_options is not None:
            out["cluster_ms"] = self.llm.kv_cluster_stats()["time_ms"]
        return out

    def serve(self) -> None:
        """Commands feed (with depth), burst and stats, as serve_commands reads them."""
        serve_commands(self, self.config)
        self.llm.close()


def serve_commands(worker: Any, config: str) -> None:
    """One JSON command per stdin line ({"cmd": NAME, ...keywords} calls worker.NAME(...); "exit" ends), one JSON
    reply per stdout line; the first line says the worker of `config` is ready (what ConfigProcess reads)."""
    print(json.dumps({"ready": config}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "exit":
            break
        print(json.dumps(getattr(worker, cmd)(**msg)), flush=True)


def _drain(gen: Any, llm: Llama) -> float:
    for _ in gen:
        pass
    return llm.last_timings.generation_tok_per_s


class ConfigProcess:
    """The parent's handle on one configuration's worker process."""

    def __init__(self, config: str, depths: list[int], args: argparse.Namespace) -> None:
        self.start(config, [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--depths",
                            ",".join(map(str, depths)), "--n-gen", str(args.n_gen), "--reps", str(args.reps),
                            "--model", args.model, "--threads", str(args.threads)])

    def start(self, config: str, cmd: list[str]) -> None:
        """Starts the worker command `cmd` serving `config` and waits until it is ready."""
        self.config = config
        # stderr to a file: a pipe nobody reads during a long run could fill and stall the worker
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        # loaded and tokenized before the next worker starts, so that no start-up overlaps a measurement
        self.reply("start")

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.reply(cmd)

    def reply(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"{self.config} failed (exit {self.proc.returncode}) at {cmd}:\n{self.log.read()[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def measure_depth(procs: list[ConfigProcess], depth: int, reps: int) -> list[dict[str, Any]]:
    """A row per configuration at `depth`: prompts are fed one configuration after another, then `reps` rounds
    of one burst per configuration."""
    rows = [{"config": p.config, "depth": depth, **p.call("feed", depth=depth)} for p in procs]
    bursts: list[list[float]] = [[] for _ in procs]
    for _ in range(reps):
        for speeds, p in zip(bursts, procs):
            speeds.append(p.call("burst")["tok_s"])
    for row, speeds, p in zip(rows, bursts, procs):
        row.update({"decode_tok_s": statistics.median(speeds), "decode_tok_s_min": min(speeds),
                    "decode_tok_s_max": max(speeds), "decode_bursts": speeds, **p.call("stats")})
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    full = {r["depth"]: r for r in rows if r["config"] == FULL.name}
    for r in rows:
        base = full[r["depth"]]
        paired = [a / b for a, b in zip(r["decode_bursts"], base["decode_bursts"])]
        # bursts of one round ran back to back, so their ratio cancels what the machine's load did meanwhile
        r["decode_speedup"] = statistics.median(paired) if paired else r["decode_tok_s"] / base["decode_tok_s"]
        r["prompt_speedup"] = r["prompt_tok_s"] / base["prompt_tok_s"]
        r["kv_mib_ratio"] = r["kv_mib"] / base["kv_mib"]
        r["rss_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Speed and memory vs depth: {meta['model']}",
        "",
        f"{meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread(s), commit {meta['commit']}, {meta['date']}; "
        f"command `{meta['command']}`, {meta['wall_s']:.0f} s. Decode tok/s: median (min-max) of {meta['reps']} "
        f"bursts of {meta['n_gen']} tokens at each depth, after a first burst that follows the prompt; the bursts "
        "of all configurations run in rounds, one burst each, and decode vs full is the median over rounds of the "
        "ratio within a round. Prompts are fed one configuration after another. KV MiB is the real allocation "
        f"(K, V, cluster sizes) for a logical context of {meta['n_ctx']} tokens; peak RSS of the whole process up "
        "to that depth (one process per configuration). Ratios are against full f16 in the same run.",
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
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: on a shared 2-core machine one thread is faster and steadier")
    ap.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--depths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Worker(args.worker, [int(d) for d in args.depths.split(",")], args.n_gen, args.reps, args.model,
               args.threads).serve()
        return 0
    plan = "quick" if args.quick else args.model
    depths, configs = PLANS[plan]
    if args.configs:
        configs = args.configs.split(",")
    if FULL.name not in configs:
        raise SystemExit(f"--configs must include {FULL.name!r}: ratios are taken against it within the run")
    # the full cache first: ratios are taken against it
    configs = [FULL.name] + [c for c in configs if c != FULL.name]
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    stem = {"smollm2": "decode_bench", "gemma": "decode_bench_gemma", "quick": "decode_bench_quick"}[plan]
    command = "python3 bench/decode_bench.py" + (" --quick" if args.quick else
                                                 (" --model gemma" if args.model == "gemma" else ""))
    if args.configs:
        command += f" --configs '{args.configs}'"
    if args.reps != 5:
        command += f" --reps {args.reps}"
    procs = [ConfigProcess(c, depths, args) for c in configs]
    try:
        for depth in depths:
            new_rows = measure_depth(procs, depth, args.reps)
            for r in new_rows:
                print(json.dumps({k: v for k, v in r.items() if k != "decode_bursts"}), flush=True)
            rows += new_rows
            rows.sort(key=lambda r: (configs.index(r["config"]), r["depth"]))
            add_ratios(rows)
            # written after every depth: an interrupted run keeps what it measured
            meta = provenance(command, model="Gemma-3-270M Q4_K_M" if args.model == "gemma" else "SmolLM2-135M-Instruct Q4_1",
                              threads=args.threads, n_gen=args.n_gen, reps=args.reps, configs=configs,
                              depths_done=sorted({r["depth"] for r in rows}),
                              n_ctx=context_size(depths, args.n_gen, args.reps), wall_s=round(time.time() - t0, 1))
            path = write_run(stem, meta, rows, markdown(rows, meta))
    finally:
        for p in procs:
            p.close()
    print(markdown(rows, meta))
    print_plot(plot, path)
    return 0


def plot(results: Path) -> Path:
    """plot_decode's plot, imported when asked for: it needs matplotlib."""
    from plot_decode import plot as plot_decode

    return plot_decode(results)


if __name__ == "__main__":
    sys.exit(main())
