"""Ablation of how Chelsea ranks merges, on the varied-text retrieval items of retrieval.py.

    python3 bench/scoring_ablation.py --ratio 0.2 --config "distinct=1"          # one configuration, one process
    python3 bench/scoring_ablation.py --ratio 0.2 --config "distinct=1,size=0.5"
    python3 bench/scoring_ablation.py --report                                  # the table of every recorded run

A configuration sets ClusterOptions fields by short names (``distinct`` = ``kv_cluster_distinct_weight``,
``size`` = ``kv_cluster_size_weight``, or any field name); ``default`` is today's defaults. Each run answers the
same needle items (no chat items: they do not depend on the ranking more than the needle items do) and writes
``results/scoring_ablation/<R>_<config>.json``; ``--report`` writes ``results/scoring_ablation.md`` with retrieval
per depth band and needle kind, the full cache's rows (from ``--full``) as the ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from chelsea_gguf.cluster import KEYWORD_FIELDS

from common import FULL, RESULTS, provenance, write_json
from haystacks import BANDS, build_items
from methods import Chelsea
from retrieval import answer, row_for, tally, wilson

SHORT = {"distinct": "distinct_weight", "size": "size_weight"}
OUT = RESULTS / "scoring_ablation"
LENGTHS = (1024, 1536, 2048)
DEPTHS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)


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
        out[keyword] = float(value) if "." in value or name.strip() in SHORT else int(value)
    return out


def run(ratio: float, config: str, threads: int, full: bool) -> Path:
    method = FULL if full else Chelsea(f"chelsea R={ratio:g} {config}", ratio, extra=parse_config(config))
    with FULL.open(64, None, 1) as tok_llm:
        items = build_items(lambda t: len(tok_llm.tokenize(t)), LENGTHS, depths=DEPTHS)
        tokens = {it.item_id: tok_llm.tokenize(it.prompt()) for it in items}
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    name = "full" if full else f"{ratio:g}_{config.replace('=', '').replace(',', '_')}"
    meta = provenance("python3 bench/scoring_ablation.py" + " ".join([""] + sys.argv[1:]), ratio=ratio,
                      config=config, threads=threads, lengths=list(LENGTHS), depths=list(DEPTHS))
    for it in items:
        text, cells, secs = answer(method, it, tokens[it.item_id], None, threads, 10)
        rows.append(row_for(method, it, len(tokens[it.item_id]), text, cells, secs))
        print(json.dumps(rows[-1]), flush=True)
        meta["wall_s"] = round(time.time() - t0, 1)
        write_json(name, {"meta": meta, "rows": rows}, OUT)
    return OUT / f"{name}.json"


def report() -> Path:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    rows = [r for run in runs for r in run["rows"]]
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: (r["method"] != FULL.name, r["method"]))))
    by_band, by_kind = tally(rows, "band"), tally(rows, "needle_kind")
    full = by_band.get(FULL.name, {})
    bands = [b for _, _, b in BANDS]
    kinds = sorted({r["needle_kind"] for r in rows})
    secs: dict[str, list[float]] = {}
    for r in rows:
        secs.setdefault(r["method"], []).append(r["seconds"])
    lines = ["Ablation of the merge ranking on varied-text needles (SmolLM2-135M Q4_1, lengths "
             f"{list(LENGTHS)}, depths {list(DEPTHS)}, 3 haystacks x 3 needle kinds; `bench/scoring_ablation.py`). "
             "Retrieved / total, (x%) = share of what the full cache retrieved in that band; ± = 95% interval "
             "(points). Seconds per item ran beside other jobs on 2 shared cores: compare within a row only.", "",
             "| method | all | ± | " + " | ".join(f"depth {b}" for b in bands) + " | " + " | ".join(kinds) + " | s/item |",
             "|---|---:|---:|" + "---:|" * (len(bands) + len(kinds) + 1)]
    for m in methods:
        per = by_band.get(m, {})
        k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        cells = []
        for b in bands:
            kn, ref = per.get(b), full.get(b)
            share = f" ({100 * kn[0] / ref[0]:.0f}%)" if kn and ref and ref[0] and m != FULL.name else ""
            cells.append((f"{kn[0]}/{kn[1]}" if kn else "-") + share)
        kinds_cells = [f"{by_kind[m][x][0]}/{by_kind[m][x][1]}" if x in by_kind.get(m, {}) else "-" for x in kinds]
        lines.append(f"| {m} | {k}/{n} | {wilson(k, n):.0f} | " + " | ".join(cells) + " | " + " | ".join(kinds_cells)
                     + f" | {sum(secs[m]) / len(secs[m]):.1f} |")
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
    args = ap.parse_args()
    if not args.report:
        print(run(args.ratio, args.config, args.threads, args.full))
    print(report().read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
