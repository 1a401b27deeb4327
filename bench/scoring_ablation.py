"""Ablation of how Chelsea ranks merges, on the varied-text retrieval items of retrieval.py.

    python3 bench/scoring_ablation.py --ratio 0.2 --config "distinct=1"          # one configuration, one process
    python3 bench/scoring_ablation.py --ratio 0.2 --config "distinct=1,size=0.5"
    python3 bench/scoring_ablation.py --ratio 0.2 --config "attn=1" --ctx 16384  # all items in one 16k context
    python3 bench/scoring_ablation.py --ratio 0.2 --ctx 16384 --model gemma       # Gemma-3-270M, the same items
    python3 bench/scoring_ablation.py --kld "default;distinct=1"                 # KLD of each against the full cache
    python3 bench/scoring_ablation.py --kld "default" --offsets 0,30000,60000,90000   # on four stretches, and their mean
    python3 bench/scoring_ablation.py --report                                  # the table of every recorded run

A configuration sets ClusterOptions fields by short names (``distinct`` = ``kv_cluster_distinct_weight``,
``size`` = ``kv_cluster_size_weight``, ``value`` = ``kv_cluster_value_weight``, ``attn`` = ``kv_cluster_attn_weight``,
or any field name); ``default`` is today's defaults. Each run answers the
same needle items (no chat items: they do not depend on the ranking more than the needle items do), each in a
context sized to its prompt (the prompt fills it, so merging starts before the question is read) or, with ``--ctx``,
in one context of that logical size (as ``chelsea-run --ctx 16k``: a prompt that fits its cells is merged only once
the question is in), and writes
``results/scoring_ablation/<R>_<config>.json``; ``--report`` writes ``results/scoring_ablation.md`` with retrieval
per depth band and needle kind, the full cache's rows (from ``--full``) as the ceiling. ``--kld`` scores the
configurations as bench/quality_kld.py does (3072 tokens of pydoc_data.topics, the last 1536 scored; ``--offsets``: the
stretches starting at those tokens) into ``results/scoring_ablation_kld.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from chelsea_gguf import Llama
from chelsea_gguf.cluster import KEYWORD_FIELDS, default_options

from common import FULL, RESULTS, provenance, reference_text, text_stretch, write_json
from haystacks import BANDS, build_items
from methods import Chelsea, Method
from quality_kld import method_logprobs, score
from retrieval import MODELS, answer, model_path, row_for, tally, wilson

SHORT = {"distinct": "distinct_weight", "size": "size_weight", "value": "value_weight", "attn": "attn_weight"}
OUT = RESULTS / "scoring_ablation"
LENGTHS = (1024, 1536, 2048)
DEPTHS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
# context and question in one prompt, as a user's completion call feeds them (retrieval.py's in-prompt protocol)
PROTOCOL = "in-prompt"


def parse_config(text: str) -> dict[str, Any]:
    """``distinct=1,size=0.5`` -> Llama keywords; ``default`` -> none."""
    if text.strip() == "default":
        return {}
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        keyword = "kv_cluster_" + SHORT.get(name.strip(), name.strip())
        if keyword not in KEYWORD_FIELDS:
            raise SystemExit(f"--config {text!r}: unknown option {name!r} (known: {', '.join(SHORT)}, or a field)")
        if isinstance(getattr(default_options(), KEYWORD_FIELDS[keyword]), bool):
            out[keyword] = value.strip().lower() in ("1", "true", "on")
        else:
            out[keyword] = float(value) if "." in value or name.strip() in SHORT else int(value)
    return out


def run(ratio: float, config: str, threads: int, full: bool, kinds: list[str] | None = None,
        n_ctx: int | None = None, model: str = "smollm2", tag: str | None = None,
        lengths: tuple[int, ...] = LENGTHS, depths: tuple[float, ...] = DEPTHS) -> Path:
    """Answers every item; with n_ctx, in one context of that logical size (a user's ``--ctx``), opened once,
    instead of one sized to each prompt. A tag names a run of the same configuration on other code (its file
    and its row); other lengths or depths than the set's make a set of their own (named by its lengths)."""
    method = FULL if full else chelsea_with(ratio, config, tag)
    path = model_path(model)
    with FULL.open(64, path, 1) as tok_llm:
        # the whole set first, then the kinds asked for: the same items (and lengths) as in a run of all of them
        items = build_items(lambda t: len(tok_llm.tokenize(t)), lengths, depths=depths)
        items = [it for it in items if kinds is None or it.needle_kind in kinds]
        tokens = {it.item_id: tok_llm.tokenize(it.prompt()) for it in items}
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    name = "full" if full else f"{ratio:g}_{config.replace('=', '').replace(',', '_')}"
    if kinds is not None:
        name += "_" + "_".join(kinds)
    if n_ctx is not None:
        name += f"_ctx{n_ctx}"
    if (lengths, depths) != (LENGTHS, DEPTHS):
        name += "_len" + "_".join(map(str, lengths))
    name += MODELS[model]["suffix"]
    if tag:
        name += f"_{tag}"
    meta = provenance("python3 bench/scoring_ablation.py" + " ".join([""] + sys.argv[1:]), model=MODELS[model]["label"],
                      ratio=ratio,
                      config=config, threads=threads, lengths=list(lengths), depths=list(depths), kinds=kinds,
                      n_ctx=n_ctx)
    with contextlib.ExitStack() as stack:
        llm = stack.enter_context(method.open(n_ctx, path, threads)) if n_ctx is not None else None
        for it in items:
            if llm is None:
                text, cells, secs = answer(method, it, [tokens[it.item_id]], path, threads, 10)
            else:
                text, cells, secs = answer_in(method, llm, n_ctx, tokens[it.item_id], 10)
            rows.append(row_for(method, it, len(tokens[it.item_id]), 10, PROTOCOL, text, cells, secs))
            print(json.dumps(rows[-1]), flush=True)
            meta["wall_s"] = round(time.time() - t0, 1)
            write_json(name, {"meta": meta, "rows": rows}, OUT)
    return OUT / f"{name}.json"


def answer_in(method: Method, llm: Llama, n_ctx: int, tokens: list[int], n_gen: int) -> tuple[str, int, float]:
    """Greedy answer in an open context (cleared first), cells held after it, seconds."""
    t0 = time.perf_counter()
    with method.session(llm, n_ctx) as s:
        out = s.greedy(tokens, n_gen)
        cells = s.cells_used()
    return llm.detokenize(out).decode("utf-8", errors="replace"), cells, time.perf_counter() - t0


def chelsea_with(ratio: float, config: str, tag: str | None = None) -> Chelsea:
    return Chelsea(f"chelsea R={ratio:g} {config}" + (f" ({tag})" if tag else ""), ratio, extra=parse_config(config))


def kld(ratio: float, configs: list[str], threads: int, tag: str | None = None,
        offsets: tuple[int, ...] = (0,)) -> Path:
    """KLD, top-1 agreement and perplexity of each configuration against the full cache, as quality_kld.py, on the
    stretch of the text that starts at each offset (tokens; recent_window.py's --segments uses 0, 30000, 60000 and
    90000): one stretch moves with rounding-level changes, the mean of four less."""
    n, n_score = 3072, 1536
    with FULL.open(16, n_threads=1) as tok_llm:
        text = tok_llm.tokenize(reference_text())
    path = RESULTS / "scoring_ablation_kld.json"
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    for offset in offsets:
        tokens = text_stretch(text, offset, n, "--offsets")
        first = n - n_score - 1
        targets = np.array(tokens[first + 1:], dtype=np.int64)
        ref, _, _ = method_logprobs(FULL, tokens, first, threads)
        for config in configs:
            m = chelsea_with(ratio, config, tag)
            lp, cells, secs = method_logprobs(m, tokens, first, threads)
            data["rows"] = [r for r in data["rows"] if (r["method"], r.get("offset", 0)) != (m.name, offset)]
            data["rows"].append({"method": m.name, "ratio": ratio, "config": config, "offset": offset,
                                 "cells_held": cells, "seconds": round(secs, 1), **score(ref, lp, targets)})
            print(json.dumps(data["rows"][-1]), flush=True)
            data["meta"] = provenance("python3 bench/scoring_ablation.py" + " ".join([""] + sys.argv[1:]),
                                      n_tokens=n, n_scored=n_score, threads=threads)
            write_json("scoring_ablation_kld", data)
    return path


def report() -> Path:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    # a run of some needle kinds only is its own row (and its full-cache ceiling is the full run of those kinds):
    # it may come from another machine, whose files (the haystacks' sources) differ a little
    # a run in a context of a fixed logical size (--ctx) says so; its ceiling is the full cache's run of the same
    # kinds, whose answers do not depend on the context's size
    # a run on another model than SmolLM2 (--model) says which, and its ceiling is the full cache on that model
    for run in runs:
        kinds, n_ctx = run["meta"].get("kinds"), run["meta"].get("n_ctx")
        label = run["meta"].get("model", MODELS["smollm2"]["label"])
        on_model = "" if label == MODELS["smollm2"]["label"] else f" [{label}]"
        for r in run["rows"]:
            r["method"] += (f" [{','.join(kinds)} only]" if kinds else "") + on_model
            r["ceiling"] = FULL.name + (f" [{','.join(kinds)} only]" if kinds else "") + on_model
            r["method"] += f" [n_ctx {n_ctx}]" if n_ctx else ""
            # a set of other lengths or depths is its own, with the full cache's run of that set as its ceiling
            set_of = (tuple(run["meta"].get("lengths", LENGTHS)), tuple(run["meta"].get("depths", DEPTHS)))
            other = set_of != (LENGTHS, DEPTHS)
            lengths_label = f" [lengths {','.join(map(str, set_of[0]))}]" if other else ""
            r["method"] += lengths_label
            r["ceiling"] += lengths_label
    rows = [r for run in runs for r in run["rows"]]
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: (" [" in r["method"],
                                                                                 not r["method"].startswith(FULL.name), r["method"]))))
    by_band, by_kind = tally(rows, "band"), tally(rows, "needle_kind")
    bands = [b for _, _, b in BANDS]
    kinds = sorted({r["needle_kind"] for r in rows})
    secs: dict[str, list[float]] = {}
    for r in rows:
        secs.setdefault(r["method"], []).append(r["seconds"])
    lines = ["Ablation of the merge ranking on varied-text needles (SmolLM2-135M Q4_1 unless a row names another model, lengths "
             f"{list(LENGTHS)}, depths {list(DEPTHS)}, 3 haystacks x 3 needle kinds, context and question in one prompt; "
             "`bench/scoring_ablation.py`). "
             "Retrieved / total, (x%) = share of what the full cache retrieved in that band on the same items; ± = 95% "
             "interval "
             "(points). Seconds per item ran beside other jobs on 2 shared cores: compare within a row only.", "",
             "| method | all | ± | " + " | ".join(f"depth {b}" for b in bands) + " | " + " | ".join(kinds) + " | s/item |",
             "|---|---:|---:|" + "---:|" * (len(bands) + len(kinds) + 1)]
    for m in methods:
        ceiling_name = next(r["ceiling"] for r in rows if r["method"] == m)
        full_correct = {r["item_id"]: r["correct"] for r in rows if r["method"] == ceiling_name}
        per = by_band.get(m, {})
        k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        # the ceiling on the items this method answered (a run cut short answered fewer)
        ran = {r["item_id"]: r["band"] for r in rows if r["method"] == m}
        ceiling = {b: (sum(full_correct.get(i, False) for i, bb in ran.items() if bb == b), 0) for b in bands}
        cells = []
        for b in bands:
            kn, ref = per.get(b), ceiling.get(b)
            share = f" ({100 * kn[0] / ref[0]:.0f}%)" if kn and ref and ref[0] and not m.startswith(FULL.name) else ""
            cells.append((f"{kn[0]}/{kn[1]}" if kn else "-") + share)
        kinds_cells = [f"{by_kind[m][x][0]}/{by_kind[m][x][1]}" if x in by_kind.get(m, {}) else "-" for x in kinds]
        lines.append(f"| {m} | {k}/{n} | {wilson(k, n):.0f} | " + " | ".join(cells) + " | " + " | ".join(kinds_cells)
                     + f" | {sum(secs[m]) / len(secs[m]):.1f} |")
    kld_path = RESULTS / "scoring_ablation_kld.json"
    if kld_path.exists():
        lines += ["", "KL divergence against the full cache (3072 tokens of pydoc_data.topics from the offset, the last "
                  "1536 scored; the mean where a method was scored at the four offsets of `--offsets 0,30000,60000,90000`):",
                  "", "| method | offset | KLD | top-1 agree | ppl | cells held |", "|---|---:|---:|---:|---:|---:|"]
        kld_rows = json.loads(kld_path.read_text())["rows"]
        for r in sorted(kld_rows, key=lambda r: (r["ratio"], r["method"], r.get("offset", 0))):
            lines.append(f"| {r['method']} | {r.get('offset', 0)} | {r['kld']:.4f} | {r['top1_agree']:.3f} | "
                         f"{r['ppl']:.2f} | {r['cells_held']} |")
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in kld_rows:
            by_method.setdefault(r["method"], []).append(r)
        for m, rs in sorted(by_method.items(), key=lambda kv: (kv[1][0]["ratio"], kv[0])):
            if len({r.get("offset", 0) for r in rs}) == 4:
                mean = sum(r["kld"] for r in rs) / 4
                top1 = sum(r["top1_agree"] for r in rs) / 4
                lines.append(f"| {m} | mean of 4 | {mean:.4f} | {top1:.3f} | | {rs[0]['cells_held']} |")
    path = RESULTS / "scoring_ablation.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--config", default="default", help="e.g. distinct=1,size=0.5 (default: today's defaults)")
    ap.add_argument("--full", action="store_true", help="run the full cache (the ceiling) instead")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only write the table of the recorded runs")
    ap.add_argument("--kld", help="semicolon-separated configurations to score by KLD instead")
    ap.add_argument("--offsets", default="0", help="with --kld: comma-separated token offsets of the stretches "
                                                   "scored (e.g. 0,30000,60000,90000)")
    ap.add_argument("--ctx", type=int, help="answer every item in one context of this logical size (a user's --ctx, "
                                            "e.g. 16384) instead of one sized to each prompt")
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--tag", help="name the run apart from an earlier one of the same configuration (other code)")
    ap.add_argument("--kinds", help="only these needle kinds, comma-separated (e.g. number): a first look; the run "
                                    "is recorded under its own name")
    ap.add_argument("--lengths", help=f"comma-separated prompt lengths (default {','.join(map(str, LENGTHS))}); "
                                      "another set is recorded under its own name")
    ap.add_argument("--depths", help=f"comma-separated needle depths (default {','.join(map(str, DEPTHS))})")
    args = ap.parse_args()
    if args.kld:
        offsets = tuple(int(x) for x in args.offsets.split(","))
        print(kld(args.ratio, args.kld.split(";"), args.threads, args.tag, offsets))
    elif not args.report:
        kinds = None if args.kinds is None else [k.strip() for k in args.kinds.split(",") if k.strip()]
        lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else LENGTHS
        depths = tuple(float(x) for x in args.depths.split(",")) if args.depths else DEPTHS
        print(run(args.ratio, args.config, args.threads, args.full, kinds, args.ctx, args.model, args.tag,
                  lengths, depths))
    print(report().read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
