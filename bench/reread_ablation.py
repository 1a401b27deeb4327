"""Ablation of the re-read ranking (``Llama.kv_cluster_compress(reread=True)``, chelsea_gguf.reread): needles asked
after their document, the document compressed with merges ranked by the re-read's scores turned into importance in
several ways, on the token ids ``kvpress_compare.py --export-tokens`` writes.

Each item's document is read and re-read once; every variant then starts from the same saved state, compresses it
with its importance and weight (``chelsea_gguf.reread.compress_ranked``) and answers greedily. Rows go to
``<out stem>.chelsea.json`` in kvpress_compare.py's row format, with its table beside them (``<out stem>.md``).

    python3 bench/reread_ablation.py --tokens /tmp/kvpress_items63.json --limit 35 \\
        --out bench/results/reread_ablation_63.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from kvpress_compare import gguf_path, load_tokens, make_item, model_name, row_for, select, spread, \
    write_json, write_report  # noqa: E402
from provenance import provenance  # noqa: E402

from chelsea_gguf import Llama  # noqa: E402
from chelsea_gguf.reread import Document, compress_ranked, ranks, reread_scores  # noqa: E402


def top_share(share: float) -> Callable[[np.ndarray], np.ndarray]:
    """1 for the share of cells the re-read scores highest (KVzip's keep at that share), 0 for the rest."""
    return lambda scores: (ranks(scores) >= 1.0 - share).astype(np.float32)


# name -> (scores -> importance in [0, 1], weight)
VARIANTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "re-read rank, w 0.25 (default)": (ranks, 0.25),
    "re-read rank, w 0 (no re-read)": (ranks, 0.0),
    "re-read rank, w 0.1": (ranks, 0.1),
    "re-read rank, w 0.5": (ranks, 0.5),
    "re-read rank^4, w 1": (lambda s: ranks(s) ** 4, 1.0),
    "re-read top 10% marked, w 4": (top_share(0.1), 4.0),
    "re-read top 20% marked, w 4": (top_share(0.2), 4.0),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True, help="token ids from kvpress_compare.py --export-tokens")
    ap.add_argument("--gguf", help="the model the token ids are for (default: the default model)")
    ap.add_argument("--limit", type=int, help="the first N items (spread over lengths and needle kinds)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--variants", help="comma-separated substrings of the variant names to run (default: all)")
    ap.add_argument("--out", required=True, help="the report's .json path (rows go to <stem>.chelsea.json)")
    args = ap.parse_args()

    data = load_tokens(Path(args.tokens))
    path = gguf_path(args.gguf)
    records = select(spread(data["items"]), args.limit)
    wanted = [v.strip() for v in args.variants.split(",")] if args.variants else None
    variants = {k: v for k, v in VARIANTS.items() if wanted is None or any(w in k for w in wanted)}
    out = Path(args.out)
    rows_path = out.with_name(out.stem + ".chelsea.json")
    meta = provenance(" ".join(["python3", "bench/reread_ablation.py"] + sys.argv[1:]), model=model_name(path),
                      tokens_file=args.tokens, tokens_meta=data["meta"], threads=args.threads, ratio=args.ratio,
                      n_ctx=args.ctx, side="llama.cpp (this project)", protocol="compress-then-ask",
                      variants=list(variants))
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    with Llama(str(path), n_ctx=args.ctx, n_threads=args.threads, verbose=False, kv_cluster=True,
               kv_cluster_ratio=args.ratio) as llm:
        for rec in records:
            item = make_item(rec["fields"])
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(rec["context_ids"])
            state = llm.save_state()
            t1 = time.perf_counter()
            scores = reread_scores(Document.of(llm))
            t_reread = time.perf_counter() - t1
            for name, (importance, weight) in variants.items():
                llm.load_state(state)
                t2 = time.perf_counter()
                compress_ranked(Document.of(llm), importance(scores), weight)
                out_text = llm.create_completion(rec["context_ids"] + rec["question_ids"],
                                                 max_tokens=args.max_new_tokens, temperature=0.0)
                text = out_text["choices"][0]["text"]
                t3 = time.perf_counter()
                rows.append(row_for(rec, f"Chelsea ({name})", args.ratio, item.correct(text), text,
                                    {"seconds": round(t1 - t0 + t_reread + t3 - t2, 3),
                                     "reread_s": round(t_reread, 3), "prompt_s": round(t1 - t0, 3),
                                     "protocol": "compress-then-ask"}))
                print(json.dumps(rows[-1]), flush=True)
            meta["wall_s"] = round(time.time() - t_start, 1)
            write_json(rows_path, {"meta": meta, "rows": rows})
    write_report(out, title="Re-read ranking ablation, needles asked after their document")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
