"""Retrieval quality: a passkey grid (context length x needle depth) and RULER-style tasks, per KV-cache method.

    python3 bench/quality_tasks.py            # passkey 1k/2k x 3 depths, RULER tasks at 1k; R = 0.2
    python3 bench/quality_tasks.py --quick    # passkey 768 tokens at depth 0.5, a multi-key needle task at 512

Every method answers the same prompts greedily; each is scored on its own (accuracy) and against the
full cache at the same length (``agree_full``: the same answer text as the full cache). Baselines get the
physical cells Chelsea allocates at the same R (bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.passkey import passkey_prompt

from common import FULL, Method, amend_json, budget_methods, only_methods, provenance, write_json
from ruler import GENERATORS, fit_size, make_task

PK_GEN = 8


def answer(method: Method, prompt_tokens: list[int], n_gen: int, threads: int) -> tuple[str, int, float]:
    """Greedy answer, cells held when it started, seconds."""
    t0 = time.perf_counter()
    n_ctx = len(prompt_tokens) + n_gen + 16
    with method.open(n_ctx, n_threads=threads) as llm:
        with method.session(llm, n_ctx) as s:
            out = s.greedy(prompt_tokens, n_gen)
            cells = s.cells_used()
        text = llm.detokenize(out).decode("utf-8", errors="replace")
    return text, cells, time.perf_counter() - t0


def passkey_item(tok_llm: Llama, length: int, depth: float, seed: int) -> dict[str, Any]:
    """A passkey prompt of about `length` tokens with the key at `depth`; score 1.0 when the key is retrieved."""
    size = fit_size(lambda k: passkey_prompt(k, depth, seed).prompt, length, lambda t: len(tok_llm.tokenize(t)))
    pk = passkey_prompt(size, depth, seed)
    return {"task": "passkey", "length": length, "depth": depth, "seed": seed, "tokens": tok_llm.tokenize(pk.prompt),
            "n_gen": PK_GEN, "score": lambda out: float(pk.retrieved(out))}


def task_items(quick: bool) -> list[dict[str, Any]]:
    """The prompts every method answers: the passkey grid, then the RULER-style tasks (see the module doc)."""
    if quick:
        lengths, depths, ruler_len, seeds, tasks = [768], [0.5], 512, [1], ["multikey"]
    else:
        lengths, depths, ruler_len, seeds, tasks = [1024, 2048], [0.1, 0.5, 0.9], 1024, [1], list(GENERATORS)
    with FULL.open(16, n_threads=1) as tok_llm:
        def count(text: str) -> int:
            return len(tok_llm.tokenize(text))

        items: list[dict[str, Any]] = []
        for length in lengths:
            for depth in depths:
                items.append(passkey_item(tok_llm, length, depth, 1000 + length + int(depth * 100)))
        for name in tasks:
            for seed in seeds:
                task = make_task(name, ruler_len, seed, count)
                items.append({"task": name, "length": ruler_len, "depth": None, "seed": seed,
                              "tokens": tok_llm.tokenize(task.prompt), "n_gen": task.n_gen, "score": task.score})
    return items


def answer_items(methods: list[Method], items: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """A row per (method, item), printed as it comes; the full cache must come first (agree_full)."""
    rows: list[dict[str, Any]] = []
    full_answers: dict[int, str] = {}
    for m in methods:
        for i, item in enumerate(items):
            text, cells, secs = answer(m, item["tokens"], item["n_gen"], threads)
            if m.kind == "full":
                full_answers[i] = text
            row = {"method": m.name, "kind": m.kind, "ratio": m.ratio, "bias": m.bias, "task": item["task"],
                   "length": item["length"], "n_tokens": len(item["tokens"]), "depth": item["depth"],
                   "seed": item["seed"], "score": item["score"](text), "agree_full": text == full_answers.get(i),
                   "answer": text, "cells_held": cells, "seconds": round(secs, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratios", default="0.2", help="comma-separated R for Chelsea and the baselines")
    ap.add_argument("--only", help="comma-separated method name prefixes (e.g. 'random merge'): run these (and the "
                                   "full cache, the reference) and amend the recorded result instead of replacing it")
    args = ap.parse_args()
    ratios = tuple(float(r) for r in args.ratios.split(","))
    methods = [FULL] + only_methods(budget_methods(ratios), args.only)
    t_start = time.time()
    items = task_items(args.quick)
    rows = answer_items(methods, items, args.threads)
    meta = provenance("python3 bench/quality_tasks.py" + (" --quick" if args.quick else "")
                      + (f" --ratios {args.ratios}" if args.ratios != "0.2" else "")
                      + (f" --only '{args.only}'" if args.only else ""),
                      model="SmolLM2-135M-Instruct Q4_1", threads=args.threads, ratios=list(ratios),
                      wall_s=round(time.time() - t_start, 1))
    name = "quality_tasks_quick" if args.quick else "quality_tasks"
    print(amend_json(name, meta, rows) if args.only else write_json(name, {"meta": meta, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
