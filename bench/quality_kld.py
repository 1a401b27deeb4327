"""KL divergence, top-1 agreement and perplexity of every KV-cache method against the full cache.

    python3 bench/quality_kld.py            # 3072 tokens, the last 1536 scored, R = 0.5, 0.2, 0.1 (+ Chelsea 0.25)
    python3 bench/quality_kld.py --quick    # 512 tokens, the last 128 scored, R = 0.2

The text is the English topic help of Python's stdlib (``pydoc_data.topics``, offline), fed in chunks of
256 tokens; every method sees exactly the same tokens and is scored on the same positions (the tail of the
text, where the clustered and evicted caches are smallest relative to the context). KLD is
KL(full || method) in nats per token, averaged over the scored positions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from baselines import log_softmax

from common import FULL, Method, amend_json, budget_methods, chelsea, document_tokens, only_methods, provenance, write_json


def method_logprobs(method: Method, tokens: list[int], first: int, threads: int) -> tuple[np.ndarray, int, float]:
    """Log-probabilities of positions first..end-1, cells held at the end, and seconds taken."""
    t0 = time.perf_counter()
    with method.open(len(tokens) + 16, n_threads=threads) as llm:
        with method.session(llm, len(tokens) + 16) as s:
            logits = s.feed(tokens, logits_from=first)
            cells = s.cells_used()
    return log_softmax(logits[:-1]), cells, time.perf_counter() - t0


def score(ref: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    p = np.exp(ref)
    kld = (p * (ref - lp)).sum(axis=-1)
    rows = np.arange(len(targets))
    return {"kld": float(kld.mean()), "kld_p99": float(np.quantile(kld, 0.99)),
            "top1_agree": float((ref.argmax(-1) == lp.argmax(-1)).mean()),
            "ppl": float(np.exp(-lp[rows, targets].mean()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated method name prefixes (e.g. 'random merge'): run these and "
                                   "amend the recorded result instead of replacing it")
    args = ap.parse_args()
    n, n_score = (512, 128) if args.quick else (3072, 1536)
    methods = budget_methods((0.2,)) if args.quick else [chelsea(0.25)] + budget_methods((0.5, 0.2, 0.1))
    methods = only_methods(methods, args.only)
    t_start = time.time()
    with FULL.open(16, n_threads=1) as tok_llm:
        tokens = document_tokens(tok_llm, n)
    first = n - n_score - 1          # logits of position i predict token i + 1
    targets = np.array(tokens[first + 1:], dtype=np.int64)
    ref, cells, secs = method_logprobs(FULL, tokens, first, args.threads)
    rows: list[dict[str, Any]] = [{"method": FULL.name, "kind": "full", "ratio": 1.0, "cells_held": cells,
                                    "seconds": round(secs, 1), **score(ref, ref, targets)}]
    print(json.dumps(rows[-1]), flush=True)
    for m in methods:
        lp, cells, secs = method_logprobs(m, tokens, first, args.threads)
        rows.append({"method": m.name, "kind": m.kind, "ratio": m.ratio, "bias": m.bias, "cells_held": cells,
                     "seconds": round(secs, 1), **score(ref, lp, targets)})
        print(json.dumps(rows[-1]), flush=True)
    meta = provenance("python3 bench/quality_kld.py" + (" --quick" if args.quick else "")
                      + (f" --only '{args.only}'" if args.only else ""),
                      model="SmolLM2-135M-Instruct Q4_1", text="pydoc_data.topics (Python stdlib), sorted topics",
                      n_tokens=n, n_scored=n_score, chunk=256, threads=args.threads,
                      wall_s=round(time.time() - t_start, 1))
    name = "quality_kld_quick" if args.quick else "quality_kld"
    print(amend_json(name, meta, rows) if args.only else write_json(name, {"meta": meta, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
