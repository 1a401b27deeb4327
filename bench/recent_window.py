"""Ablation: how many of the newest tokens Chelsea keeps exact (``kv_cluster_recent``), at the same cells.

    python3 bench/recent_window.py            # R = 0.2 and 0.1, recent 64 (default) .. 384; KLD and passkeys at 3k
    python3 bench/recent_window.py --quick    # R = 0.2, recent 64 and 128; 1k tokens, two passkeys
    python3 bench/recent_window.py --segments # KLD only, recent 64 vs 128 at R = 0.2 and 0.1, on 4 parts of the text
    python3 bench/recent_window.py --shares   # KLD only, kv_cluster_recent_share 0.5 and 0.75 and eviction, the same parts

Every configuration at one R holds the same physical cells (the budget stays above the protected sinks and
recent tokens, so ``kv_cluster_recent`` does not change the allocation; checked). A larger exact window leaves
fewer cells for the older, merged context. Two measures pull against each other: KLD against the full cache over
the tail of a natural text (``quality_kld.py``'s text and scoring), where the last tokens predict the next best,
and passkeys hidden at several depths of a 3k-token prompt, which only the merged history can answer.
StreamingLLM eviction at the same cells (every cell a recent token) is the end point of that trade.
``--segments`` asks whether a KLD difference holds beyond one stretch of text: the same scoring on 3072-token
stretches starting at 4 offsets of the text. Results: bench/results/recent_window[_quick|_segments].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np

from chelsea_gguf.cluster import default_options

from common import (FULL, RESULTS, Chelsea, Method, Streaming, document_tokens, provenance, reference_text, text_stretch,
                    write_json)
from quality_kld import method_logprobs, score
from quality_tasks import PK_GEN, answer, passkey_item

PLANS: dict[str, dict[str, Any]] = {
    "full": {"recents": {0.2: [64, 128, 256, 384], 0.1: [64, 128, 256]}, "kld_tokens": (3072, 1536),
             "pk_tokens": 3072, "depths": [0.1, 0.35, 0.6, 0.85]},
    "quick": {"recents": {0.2: [64, 128]}, "kld_tokens": (1024, 256), "pk_tokens": 1024, "depths": [0.1, 0.5]},
}

SEGMENTS: dict[str, Any] = {"offsets": [0, 30000, 60000, 90000], "recents": {0.2: [64, 128], 0.1: [64, 128]},
                            "kld_tokens": (3072, 1536)}
# a window sized by the cells a compression keeps (kv_cluster_recent_share) instead of a token count
SHARES: dict[float, list[float]] = {0.2: [0.5, 0.75], 0.1: [0.5, 0.75]}


def methods_for(recents: dict[float, list[int]]) -> list[Method]:
    out: list[Method] = []
    for r, windows in recents.items():
        out += [Chelsea(f"chelsea R={r:g} recent={w}", r, extra={"kv_cluster_recent": w}) for w in windows]
        out.append(Streaming(f"streaming R={r:g}", r))
    return out


def recent_of(method: Method) -> int | None:
    return method.extra.get("kv_cluster_recent") if isinstance(method, Chelsea) else None


def check_same_cells(methods: list[Method], n_tokens: int) -> None:
    """Stops unless each configuration's budget at n_tokens is above its protected cells, so that every
    configuration at one R allocates and holds the same cells."""
    sinks = default_options().sinks
    for m in methods:
        w = recent_of(m)
        if w is not None and math.ceil(m.ratio * n_tokens) < sinks + w + 2:
            raise SystemExit(f"{m.name}: at {n_tokens} tokens the budget {math.ceil(m.ratio * n_tokens)} is below the "
                             f"{sinks} sinks + {w} recent cells it protects; the cells would not be the same")


def passkey_items(n_tokens: int, depths: list[float]) -> list[dict[str, Any]]:
    with FULL.open(16, n_threads=1) as tok_llm:
        return [passkey_item(tok_llm, n_tokens, depth, 5000 + n_tokens + int(depth * 100)) for depth in depths]


def kld_reference(tokens: list[int], n_score: int, threads: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The first logits position scored, the target tokens, and the full cache's log-probabilities there."""
    first = len(tokens) - n_score - 1          # logits of position i predict token i + 1
    ref, _, _ = method_logprobs(FULL, tokens, first, threads)
    return first, np.array(tokens[first + 1:], dtype=np.int64), ref


def run(plan: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    methods = methods_for(plan["recents"])
    n_kld, n_score = plan["kld_tokens"]
    check_same_cells(methods, min(n_kld, plan["pk_tokens"]))
    with FULL.open(16, n_threads=1) as tok_llm:
        tokens = document_tokens(tok_llm, n_kld)
    first, targets, ref = kld_reference(tokens, n_score, threads)
    items = passkey_items(plan["pk_tokens"], plan["depths"])
    full_found = [item["score"](answer(FULL, item["tokens"], PK_GEN, threads)[0]) == 1.0 for item in items]
    rows: list[dict[str, Any]] = [{"method": FULL.name, "kind": "full", "ratio": 1.0, "recent": None,
                                    **score(ref, ref, targets), "passkeys": sum(full_found), "passkey_found": full_found}]
    print(json.dumps(rows[-1]), flush=True)
    for m in methods:
        t0 = time.perf_counter()
        lp, cells, _ = method_logprobs(m, tokens, first, threads)
        found, pk_cells = [], set()
        for item in items:
            text, held, _ = answer(m, item["tokens"], PK_GEN, threads)
            found.append(item["score"](text) == 1.0)
            pk_cells.add(held)
        rows.append({"method": m.name, "kind": m.kind, "ratio": m.ratio, "recent": recent_of(m),
                     **score(ref, lp, targets), "kld_cells_held": cells, "passkeys": sum(found),
                     "passkey_found": found, "passkey_cells_held": sorted(pk_cells),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def share_methods() -> list[Method]:
    """Per R: the default window, each share of SHARES, and eviction at the same cells."""
    out: list[Method] = []
    for r, shares in SHARES.items():
        out.append(Chelsea(f"chelsea R={r:g} recent={default_options().recent}", r))
        out += [Chelsea(f"chelsea R={r:g} recent_share={s:g}", r, extra={"kv_cluster_recent_share": s}) for s in shares]
        out.append(Streaming(f"streaming R={r:g}", r))
    return out


def run_segments(threads: int, methods: list[Method]) -> list[dict[str, Any]]:
    """KLD of each method against the full cache on several stretches of the text (no passkeys)."""
    n, n_score = SEGMENTS["kld_tokens"]
    check_same_cells(methods, n)
    with FULL.open(16, n_threads=1) as tok_llm:
        text = tok_llm.tokenize(reference_text())
    rows: list[dict[str, Any]] = []
    for offset in SEGMENTS["offsets"]:
        tokens = text_stretch(text, offset, n)
        first, targets, ref = kld_reference(tokens, n_score, threads)
        for m in methods:
            lp, cells, _ = method_logprobs(m, tokens, first, threads)
            rows.append({"offset": offset, "method": m.name, "ratio": m.ratio, "recent": recent_of(m),
                         **score(ref, lp, targets), "kld_cells_held": cells})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown_segments(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    offsets = sorted({r["offset"] for r in rows})
    lines = [f"# Exact recent window on several stretches of text: {meta['model']}", "",
             f"{meta['cpu']}, {meta['cores']} cores, commit {meta['commit']}, {meta['date']}; command "
             f"`{meta['command']}`, {meta['wall_s']:.0f} s. KLD (nats/token, vs the full cache) over the last "
             f"{meta['kld_tokens'][1]} of {meta['kld_tokens'][0]} tokens starting at each token offset of "
             f"{meta['text']}; every row of one R holds the same cells.", "",
             "| method | " + " | ".join(f"KLD @ {o}" for o in offsets) + " | mean KLD | mean top-1 |",
             "|---|" + "---:|" * (len(offsets) + 2)]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = {r["offset"]: r for r in rows if r["method"] == name}
        klds = [mine[o]["kld"] for o in offsets]
        top1 = [mine[o]["top1_agree"] for o in offsets]
        lines.append(f"| {name} | " + " | ".join(f"{k:.3f}" for k in klds)
                     + f" | {sum(klds) / len(klds):.3f} | {sum(top1) / len(top1):.3f} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n_pk = len(meta["depths"])
    lines = [f"# Exact recent window vs merged history: {meta['model']}", "",
             f"{meta['cpu']}, {meta['cores']} cores, commit {meta['commit']}, {meta['date']}; command "
             f"`{meta['command']}`, {meta['wall_s']:.0f} s. KLD (nats/token, vs the full cache), top-1 agreement and "
             f"perplexity over the last {meta['kld_tokens'][1]} of {meta['kld_tokens'][0]} tokens of "
             f"{meta['text']}; passkeys found of {n_pk} hidden at depths "
             f"{', '.join(f'{d:.0%}' for d in meta['depths'])} of a {meta['pk_tokens']}-token prompt. At each R every "
             "row holds the same cells; streaming keeps only sinks and the newest tokens.", "",
             "| method | R | recent | KLD | top-1 | ppl | passkeys | cells held (KLD) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['recent'] if r['recent'] is not None else '-'} | "
                     f"{r['kld']:.3f} | {r['top1_agree']:.3f} | {r['ppl']:.2f} | {r['passkeys']}/{n_pk} | "
                     f"{r.get('kld_cells_held', '-')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for ratio in sorted({r["ratio"] for r in rows if r["kind"] != "full"}, reverse=True):
        pts = [r for r in rows if r["ratio"] == ratio and r["kind"] == "chelsea"]
        line, = ax.plot([p["kld"] for p in pts], [p["passkeys"] for p in pts], "o-", label=f"Chelsea R={ratio:g}")
        for p in pts:
            ax.annotate(str(p["recent"]), (p["kld"], p["passkeys"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.plot([r["kld"] for r in rows if r["ratio"] == ratio and r["kind"] == "streaming"],
                [r["passkeys"] for r in rows if r["ratio"] == ratio and r["kind"] == "streaming"], "x",
                color=line.get_color(), markersize=9, label=f"streaming R={ratio:g}")
    ax.set_xlabel("KLD vs full cache (nats/token, lower is better)")
    ax.set_ylabel(f"passkeys found (of {len(meta['depths'])})")
    ax.set_title("Exact recent window (labels) vs merged history", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--segments", action="store_true")
    ap.add_argument("--shares", action="store_true", help="kv_cluster_recent_share against the default and eviction")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.time()
    if args.segments or args.shares:
        flag, name = ("--shares", "recent_window_shares") if args.shares else ("--segments", "recent_window_segments")
        methods = share_methods() if args.shares else \
            [m for m in methods_for(SEGMENTS["recents"]) if isinstance(m, Chelsea)]
        rows = run_segments(args.threads, methods)
        meta = provenance(f"python3 bench/recent_window.py {flag}", model="SmolLM2-135M-Instruct Q4_1",
                          text="pydoc_data.topics (Python stdlib), sorted topics", offsets=SEGMENTS["offsets"],
                          kld_tokens=list(SEGMENTS["kld_tokens"]), threads=args.threads,
                          wall_s=round(time.time() - t_start, 1))
        print(write_json(name, {"meta": meta, "rows": rows}))
        (RESULTS / f"{name}.md").write_text(markdown_segments(rows, meta))
        return 0
    plan = PLANS["quick" if args.quick else "full"]
    rows = run(plan, args.threads)
    meta = provenance("python3 bench/recent_window.py" + (" --quick" if args.quick else ""),
                      model="SmolLM2-135M-Instruct Q4_1", text="pydoc_data.topics (Python stdlib), sorted topics",
                      kld_tokens=list(plan["kld_tokens"]), pk_tokens=plan["pk_tokens"], depths=plan["depths"],
                      threads=args.threads, wall_s=round(time.time() - t_start, 1))
    name = "recent_window_quick" if args.quick else "recent_window"
    print(write_json(name, {"meta": meta, "rows": rows}))
    (RESULTS / f"{name}.md").write_text(markdown(rows, meta))
    plot(rows, meta, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
