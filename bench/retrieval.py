"""Needle retrieval on varied text (haystacks.py) per KV-cache method, at the same physical cells and memory.

    python3 bench/retrieval.py                      # SmolLM2, R = 0.25 and 0.2, every method
    python3 bench/retrieval.py --quick              # 3 tiny items + 1 chat item, full and Chelsea R = 0.25
    python3 bench/retrieval.py --only 'chelsea R=0.25,keydiff' --resume   # add methods to the recorded run
    python3 bench/retrieval.py --model gemma        # Gemma-3-270M, 4k-30k tokens

Every method answers the same prompts greedily (plain completion, the question after the context; the chat
items through ``create_chat_completion``). Rows are written after every answer (an interrupted run keeps what
it measured; ``--resume`` skips the (method, item) pairs already recorded). The table gives retrieved / total
per method and R, per depth band, needle kind and haystack, with the full cache as the ceiling and each
band's share of what the full cache retrieved; the heat map shows depth band x method and length x method.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import chelsea_gguf
from chelsea_gguf import Llama
from chelsea_gguf._lib import lib
from chelsea_gguf.chat import format_chat_prompt

from common import (FULL, RESULTS, Method, chelsea, context_shift, full_quantized, keydiff, knorm, only_methods,
                    provenance, random_merge, streaming, write_json)
from haystacks import (BANDS, HAYSTACKS, NEEDLE_KINDS, ChatItem, RetrievalItem, band, build_chat_items,
                       build_items)

N_GEN = 10
PROTOCOLS = ("compress-then-ask", "in-prompt")
CHAT_N_GEN = 24    # a chat answer is a sentence ("The locker number is 764."): 10 tokens cut some before the answer
MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {"label": "SmolLM2-135M-Instruct Q4_1", "lengths": (1024, 2048, 3072, 4096), "chat": (1024, 1536, 2048),
                "quick": (256,), "suffix": ""},
    "gemma": {"label": "Gemma-3-270M Q4_K_M", "lengths": (4096, 8192, 16384, 30000), "chat": (4096, 8192, 16384),
              "quick": (512,), "suffix": "_gemma"},
}
Item = RetrievalItem | ChatItem


def model_path(model: str) -> str | None:
    if model == "gemma":
        from chelsea_gguf.models import gemma3_270m_path

        return str(gemma3_270m_path())
    return None


def all_methods(ratios: Iterable[float]) -> list[Method]:
    """The full cache first (the ceiling), Chelsea at each R, then at each R the baselines at Chelsea's cells,
    then the configurations at about the same memory (quantized full caches, Chelsea + q8_0)."""
    ratios = list(ratios)
    out: list[Method] = [FULL] + [chelsea(r) for r in ratios]
    for r in ratios:
        out += [streaming(r), keydiff(r), knorm(r), context_shift(r), random_merge(r), chelsea(r, type_kv="q8_0")]
    return out + [full_quantized("q8_0"), full_quantized("q4_0")]


def has_key_reader() -> bool:
    """Whether the library exports chelsea_kv_keys (the KeyDiff and Knorm baselines read keys with it)."""
    try:
        getattr(lib, "chelsea_kv_keys")
    except AttributeError:
        return False
    return True


def chat_tokens(llm: Llama, item: ChatItem) -> list[int]:
    return llm.tokenize(format_chat_prompt(llm.model, item.messages(), llm.chat_format), add_bos=True, special=True)


def prompt_parts(llm: Llama, item: Item, protocol: str) -> list[list[int]]:
    """The token lists a session feeds one after another, settling (compressing or evicting to budget) after
    each but the last: [context, question] for ``compress-then-ask``, [context + question] for ``in-prompt``;
    a chat item is one templated prompt (create_chat_completion's)."""
    if isinstance(item, ChatItem):
        return [chat_tokens(llm, item)]
    if protocol == "in-prompt":
        return [llm.tokenize(item.prompt())]
    return [llm.tokenize(item.context), llm.tokenize(item.question, add_bos=False)]


def answer(method: Method, item: Item, parts: list[list[int]], path: str | None, threads: int,
           n_gen: int) -> tuple[str, int, float]:
    """Greedy answer, cells held after it, seconds (the context's creation included)."""
    t0 = time.perf_counter()
    n_ctx = sum(map(len, parts)) + n_gen + 16
    with method.open(n_ctx, path, threads) as llm:
        if isinstance(item, ChatItem):
            text, cells = method.chat(llm, item.messages(), n_gen)
        else:
            with method.session(llm, n_ctx) as s:
                for part in parts[:-1]:
                    s.feed(part)
                    s.settle()
                out = s.greedy(parts[-1], n_gen)
                cells = s.cells_used()
            text = llm.detokenize(out).decode("utf-8", errors="replace")
    return text, cells, time.perf_counter() - t0


def row_for(method: Method, item: Item, n_tokens: int, n_gen: int, protocol: str, output: str, cells: int,
            secs: float) -> dict[str, Any]:
    return {"method": method.name, "kind": method.kind, "ratio": method.ratio, "type_kv": method.type_kv,
            "item_id": item.item_id, "haystack": item.haystack, "needle_kind": item.needle_kind,
            "depth": item.depth, "band": band(item.depth), "length": item.length, "n_tokens": n_tokens,
            "answer": item.answer, "protocol": protocol, "n_gen": n_gen, "output": output,
            "correct": item.correct(output), "cells_held": cells,
            "seconds": round(secs, 2)}


# ------------------------------------------------------------------ report


def wilson(k: int, n: int) -> float:
    """Half-width of the 95% Wilson interval of k/n, in points."""
    if n == 0:
        return 0.0
    p, z = k / n, 1.96
    return 100 * z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def tally(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Per method, per value of `key`: (retrieved, total)."""
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in rows:
        cell = out[r["method"]][str(r[key])]
        cell[0] += bool(r["correct"])
        cell[1] += 1
    return {m: {k: (v[0], v[1]) for k, v in per.items()} for m, per in out.items()}


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    needle_rows = [r for r in rows if r["haystack"] != "chat"]
    chat_rows = [r for r in rows if r["haystack"] == "chat"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bands = [b for _, _, b in BANDS]
    by_band, by_kind = tally(needle_rows, "band"), tally(needle_rows, "needle_kind")
    by_hay = tally(needle_rows, "haystack")
    chat = tally(chat_rows, "haystack")
    kinds = sorted({r["needle_kind"] for r in needle_rows})
    hays = sorted({r["haystack"] for r in needle_rows})
    full_found = {r["item_id"]: bool(r["correct"]) for r in needle_rows if r["method"] == FULL.name}
    # per method and band: what the full cache retrieved of the items that method answered (a method cut short
    # by time is compared on its own items)
    full_ref: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in needle_rows:
        full_ref[r["method"]][r["band"]] += full_found.get(r["item_id"], False)
    held: dict[str, list[int]] = defaultdict(list)
    secs: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        held[r["method"]].append(r["cells_held"])
        secs[r["method"]].append(r["seconds"])

    def frac(kn: tuple[int, int] | None) -> str:
        return "-" if not kn else f"{kn[0]}/{kn[1]}"

    lines = [f"Needle retrieval on varied text, {meta['model']}; {meta['n_items']} needle items "
             f"({', '.join(hays)} x {', '.join(kinds)}, depths 5-95%, lengths {meta['lengths']}) and "
             f"{meta['n_chat']} multi-turn chat items; greedy, {meta['n_gen']} tokens "
             f"({meta.get('chat_n_gen', meta['n_gen'])} for chat); "
             + ("the context brought to budget before the question is asked"
                if meta.get("protocol", "in-prompt") == "compress-then-ask" else
                "context and question in one prompt (the first answer token from the prompt's last chunk, before the "
                "cache is brought to budget)")
             + f" (chat: create_chat_completion); commit {meta['commit']}, "
             f"{meta['cpu']}, {meta['threads']} thread(s); `{meta['command']}`.", "",
             *([f"**Stopped early**: {meta['stopped']}; the methods after it are missing or partial "
                "(`--resume` completes them).", ""] if meta.get("stopped") else []),
             "Retrieved / total; the full cache is the ceiling, and `(x%)` is a band's share of what the full cache "
             "retrieved of the same items in that band. ± is the 95% interval of the overall share (points). "
             "Baselines at R hold Chelsea's physical cells at R while the prompt is fed and, once it is in, evict "
             "down to the budget Chelsea compresses to (R x tokens), so every method answers from the same number "
             "of cells.", "",
             "| method | all | ± | " + " | ".join(f"depth {b}" for b in bands) + " | " + " | ".join(kinds) + " | "
             + " | ".join(hays) + " | chat | cells held (mean) | s/item |",
             "|---|---:|---:|" + "---:|" * (len(bands) + len(kinds) + len(hays) + 3)]
    for m in methods:
        per_band = by_band.get(m, {})
        k = sum(v[0] for v in per_band.values())
        n = sum(v[1] for v in per_band.values())
        cells = []
        for b in bands:
            kn = per_band.get(b)
            ref = full_ref[m][b]
            share = f" ({100 * kn[0] / ref:.0f}%)" if kn and ref and m != FULL.name else ""
            cells.append(frac(kn) + share)
        lines.append(f"| {m} | {frac((k, n)) if n else '-'} | {wilson(k, n):.0f} | " + " | ".join(cells) + " | "
                     + " | ".join(frac(by_kind.get(m, {}).get(x)) for x in kinds) + " | "
                     + " | ".join(frac(by_hay.get(m, {}).get(x)) for x in hays) + " | "
                     + frac(chat.get(m, {}).get("chat")) + " | "
                     + f"{sum(held[m]) / len(held[m]):.0f} | {sum(secs[m]) / len(secs[m]):.1f} |")
    for key, label in (("needle_kind", "needle kind"), ("haystack", "haystack")):
        lines += ["", *crossed(needle_rows, methods, key, label)]
    return "\n".join(lines) + "\n"


def crossed(rows: list[dict[str, Any]], methods: list[str], key: str, label: str) -> list[str]:
    """A table of retrieved / total per method, per (value of `key`, depth band)."""
    bands = [b for _, _, b in BANDS]
    values = sorted({r[key] for r in rows})
    t: dict[str, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in rows:
        cell = t[r["method"]][(r[key], r["band"])]
        cell[0] += bool(r["correct"])
        cell[1] += 1
    cols = [(v, b) for v in values for b in bands]
    out = [f"By {label} and depth band:", "", "| method | " + " | ".join(f"{v} {b}" for v, b in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{t[m][c][0]}/{t[m][c][1]}" if c in t[m] else "-" for c in cols) + " |")
    return out


def heatmap(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path | None:
    """Share retrieved, depth band x method and length x method (None without matplotlib, the bench extra)."""
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib (pip install 'chelsea-gguf[bench]'): heat map skipped", flush=True)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle_rows = [r for r in rows if r["haystack"] != "chat"]
    methods = list(dict.fromkeys(r["method"] for r in needle_rows))
    panels = (("depth band", [b for _, _, b in BANDS], "band"),
              ("context tokens", [str(x) for x in sorted({r["length"] for r in needle_rows})], "length"))
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(methods) * 2), 3.6))
    for ax, (label, values, key) in zip(axes, panels):
        t = tally(needle_rows, key)
        grid = [[(t.get(m, {}).get(v, (0, 0))[0] / t[m][v][1]) if t.get(m, {}).get(v) else float("nan")
                 for m in methods] for v in values]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, v in enumerate(values):
            for j, m in enumerate(methods):
                kn = t.get(m, {}).get(v)
                if kn:
                    ax.text(j, i, f"{kn[0]}/{kn[1]}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(values)), values, fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(f"Needle retrieval on varied text (green: found), {meta['model']}, commit {meta['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ run


def load_recorded(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of a recorded run and its runs' provenance (for --resume)."""
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    meta = data["meta"]
    earlier = meta.get("earlier_runs", []) + [{k: meta.get(k) for k in ("commit", "date", "command", "wall_s")}]
    return data["rows"], earlier


def report_only(stem: Path) -> int:
    data = json.loads(stem.with_suffix(".json").read_text())
    stem.with_suffix(".md").write_text(markdown(data["meta"], data["rows"]))
    heatmap(data["rows"], data["meta"], stem.parent / f"{stem.name}_heatmap.png")
    print(stem.with_suffix(".md").read_text())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--ratios", default="0.25,0.2", help="comma-separated R for Chelsea and the baselines")
    ap.add_argument("--only", help="comma-separated method name prefixes; the full cache (the ceiling) always runs "
                                   "unless --resume finds it recorded")
    ap.add_argument("--lengths", help="comma-separated context tokens (default per model)")
    ap.add_argument("--depths", help="comma-separated needle depths (default haystacks.DEPTHS)")
    ap.add_argument("--no-chat", action="store_true", help="leave out the multi-turn chat items")
    ap.add_argument("--needle-kinds", help="comma-separated needle kinds (default all)")
    ap.add_argument("--haystacks", help="comma-separated haystacks (default all)")
    ap.add_argument("--resume", action="store_true", help="keep the recorded rows, run only what is missing")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--protocol", choices=PROTOCOLS, default=PROTOCOLS[0],
                    help="compress-then-ask: the context is fed and brought to budget, then the question is asked "
                         "(kvpress' and the measured anchors' protocol); in-prompt: context and question are one "
                         "prompt, so the first answer token comes from the prompt's last chunk, before the cache is "
                         "brought to budget (Llama.create_completion's path)")
    ap.add_argument("--n-gen", type=int, default=N_GEN, help="tokens generated per needle item")
    ap.add_argument("--chat-n-gen", type=int, default=CHAT_N_GEN, help="tokens generated per chat item")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default bench/results)")
    ap.add_argument("--max-minutes", type=float, help="start no answer after this many minutes (the rows so far "
                                                       "are kept; --resume completes them)")
    ap.add_argument("--note", help="free text recorded in the results' meta (e.g. which native build ran)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and the heat map from the "
                                                                 "recorded results, run nothing")
    args = ap.parse_args()
    spec = MODELS[args.model]
    if args.report_only:
        return report_only(args.out / ("retrieval" + spec["suffix"] + ("_in_prompt" if args.protocol == "in-prompt"
                                                                       else "") + ("_quick" if args.quick else "")))
    ratios = tuple(float(r) for r in args.ratios.split(","))
    if args.quick and not args.only:
        methods = [FULL, chelsea(ratios[0]), keydiff(ratios[0])]
    else:
        methods = [FULL] + [m for m in only_methods(all_methods(ratios), args.only) if m != FULL]
    if not has_key_reader():
        skipped = [m.name for m in methods if m.kind in ("keydiff", "knorm")]
        if skipped:
            print(f"skipping {', '.join(skipped)}: this library has no chelsea_kv_keys", flush=True)
        methods = [m for m in methods if m.name not in skipped]
    lengths = (tuple(int(x) for x in args.lengths.split(",")) if args.lengths
               else spec["quick" if args.quick else "lengths"])
    depths = tuple(float(x) for x in args.depths.split(",")) if args.depths else None
    name = ("retrieval" + spec["suffix"] + ("_in_prompt" if args.protocol == "in-prompt" else "")
            + ("_quick" if args.quick else ""))
    path = model_path(args.model)

    t_start = time.time()
    with FULL.open(64, path, 1) as tok_llm:
        def count(text: str) -> int:
            return len(tok_llm.tokenize(text))

        kinds = tuple(args.needle_kinds.split(",")) if args.needle_kinds else NEEDLE_KINDS
        hays = tuple(args.haystacks.split(",")) if args.haystacks else HAYSTACKS
        items: list[Item] = list(build_items(count, lengths, args.quick, depths=depths, haystacks=hays,
                                             needle_kinds=kinds))
        if not args.no_chat:
            items += build_chat_items(count, lengths if args.quick or args.lengths else spec["chat"], args.quick)
        parts = {it.item_id: prompt_parts(tok_llm, it, args.protocol) for it in items}
    # a seeded order that mixes haystacks, needle kinds, depths, lengths and the chat items, so that a method cut
    # short by time still has a balanced subset (run with --resume to complete it)
    random.Random(0).shuffle(items)
    n_chat = sum(isinstance(it, ChatItem) for it in items)
    print(f"{len(items)} items ({n_chat} chat), {sum(len(t) for p in parts.values() for t in p)} prompt tokens; "
          f"methods: {', '.join(m.name for m in methods)}", flush=True)

    def n_gen_of(haystack: str) -> int:
        return args.chat_n_gen if haystack == "chat" else args.n_gen

    def protocol_of(item: Item) -> str:
        return "chat" if isinstance(item, ChatItem) else args.protocol

    rows, earlier = load_recorded(args.out / f"{name}.json") if args.resume else ([], [])
    # a recorded answer counts when it was asked as this run asks it and generated as many tokens (rows from before
    # these fields: in the prompt, 10 tokens)
    rows = [r for r in rows if r.get("n_gen", N_GEN) == n_gen_of(r["haystack"])
            and r.get("protocol", "chat" if r["haystack"] == "chat" else "in-prompt")
            == ("chat" if r["haystack"] == "chat" else args.protocol)]
    done = {(r["method"], r["item_id"]) for r in rows}
    command = ("python3 bench/retrieval.py" + " ".join([""] + sys.argv[1:]))
    meta = provenance(command, model=spec["label"], package=str(Path(chelsea_gguf.__file__).parent),
                      threads=args.threads, ratios=list(ratios), protocol=args.protocol, n_gen=args.n_gen,
                      chat_n_gen=args.chat_n_gen,
                      lengths=list(lengths), n_items=len(items) - n_chat, n_chat=n_chat,
                      methods=[m.name for m in methods], **({"earlier_runs": earlier} if earlier else {}),
                      **({"note": args.note} if args.note else {}))

    def write() -> None:
        meta["wall_s"] = round(time.time() - t_start, 1)
        write_json(name, {"meta": meta, "rows": rows}, args.out)
        (args.out / f"{name}.md").write_text(markdown(meta, rows))

    deadline = t_start + 60 * args.max_minutes if args.max_minutes else math.inf
    for m in methods:
        for it in items:
            if (m.name, it.item_id) in done:
                continue
            if time.time() > deadline:
                meta["stopped"] = f"--max-minutes {args.max_minutes:g} reached before {m.name} / {it.item_id}"
                print(meta["stopped"], flush=True)
                break
            n_gen = n_gen_of(it.haystack)
            text, cells, secs = answer(m, it, parts[it.item_id], path, args.threads, n_gen)
            rows.append(row_for(m, it, sum(map(len, parts[it.item_id])), n_gen, protocol_of(it), text, cells,
                                secs))
            print(json.dumps(rows[-1]), flush=True)
            write()
        if rows:
            heatmap(rows, meta, args.out / f"{name}_heatmap.png")
        if "stopped" in meta:
            break
    write()
    print((args.out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
