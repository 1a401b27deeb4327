"""The headline table and the quality plots from the recorded results.

    python3 bench/report.py [--quick]    # reads bench/results/*.json, writes summary.md and the PNGs

Headline, per R: KV MiB ratio and decode speed ratio (Chelsea vs full f16 at the longest depth, from the
speed benchmark), retrieval accuracy (passkey + RULER-style tasks) and KL divergence for Chelsea and, at
the same budget, each baseline. Where a baseline scores better than Chelsea, the last column names it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import RESULTS

BASELINES = ("streaming", "context shift", "random merge", "no-bias", "keys-only")


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def family(method: str) -> str:
    if method.startswith("full"):
        return "full"
    if method.startswith("streaming"):
        return "streaming"
    if method.startswith("context shift"):
        return "context shift"
    if method.startswith("random merge"):
        return "random merge"
    if "keys-only" in method:
        return "keys-only"
    return "no-bias" if "no-bias" in method else "chelsea"


def retrieval(tasks: dict[str, Any] | None, task: str | None = None) -> dict[tuple[str, float], float]:
    """Mean score per (family, R) over all passkey and RULER items, or over one task's items."""
    acc: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in (tasks or {}).get("rows", []):
        if task is None or r["task"] == task:
            acc[(family(r["method"]), r["ratio"])].append(r["score"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def kld_by(kld: dict[str, Any] | None) -> dict[tuple[str, float], dict[str, Any]]:
    return {(family(r["method"]), r["ratio"]): r for r in (kld or {}).get("rows", [])}


def speed_at_longest(speed: dict[str, Any] | None, ratio: float) -> tuple[float | None, float | None, int | None]:
    if not speed:
        return None, None, None
    rows = [r for r in speed["rows"] if r["config"] == f"chelsea R={ratio:g}"]
    if not rows:
        return None, None, None
    last = max(rows, key=lambda r: r["depth"])
    return last["kv_mib_ratio"], last["decode_speedup"], last["depth"]


def fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def headline(kld: dict[str, Any] | None, tasks: dict[str, Any] | None, speed: dict[str, Any] | None,
             gemma: dict[str, Any] | None) -> str:
    acc, kl = retrieval(tasks), kld_by(kld)
    per_task = {t: retrieval(tasks, t) for t in dict.fromkeys(r["task"] for r in (tasks or {}).get("rows", []))}
    ratios = sorted({r for (_, r) in kl if r < 1} | {r for (_, r) in acc if r < 1} | {0.5, 0.25, 0.2, 0.1},
                    reverse=True)
    g_depth = max((r["depth"] for r in (gemma or {}).get("rows", [])), default=None)
    lines = [
        "| R | KV MiB vs full | decode vs full (SmolLM2 @ longest) | "
        + (f"decode vs full (Gemma @ {g_depth}) | " if gemma else "")
        + "retrieval: full / Chelsea / streaming / ctx shift / random merge / no-bias / keys-only | "
        "KLD: Chelsea / streaming / ctx shift / random merge / no-bias / keys-only | Chelsea loses to |",
        "|---:|---:|---:|" + ("---:|" if gemma else "") + "---|---|---|",
    ]
    for r in ratios:
        kv, sp, _ = speed_at_longest(speed, r)
        _, gsp, _ = speed_at_longest(gemma, r)
        a = [acc.get(("full", 1.0))] + [acc.get((f, r)) for f in ("chelsea",) + BASELINES]
        k = [kl.get((f, r), {}).get("kld") for f in ("chelsea",) + BASELINES]
        losses = []
        for i, f in enumerate(BASELINES):
            if a[1] is not None and a[2 + i] is not None and a[2 + i] > a[1]:
                losses.append(f"{f} (retrieval)")
            for task, per in per_task.items():
                mine, theirs = per.get(("chelsea", r)), per.get((f, r))
                if mine is not None and theirs is not None and theirs > mine:
                    losses.append(f"{f} ({task})")
            if k[0] is not None and k[1 + i] is not None and k[1 + i] < k[0]:
                losses.append(f"{f} (KLD)")
        if all(x is None for x in a[1:] + k) and kv is None:
            continue
        lines.append(f"| {r:g} | {fmt(kv)} | {fmt(sp, '.2f', 'x')} | "
                     + (f"{fmt(gsp, '.2f', 'x')} | " if gemma else "")
                     + " / ".join(fmt(x) for x in a) + " | " + " / ".join(fmt(x, ".3f") for x in k)
                     + " | " + (", ".join(losses) or ("none" if any(x is not None for x in a[2:] + k[1:])
                                                      else "no baseline run at this R"))
                     + ("" if a[1] is not None or all(x is None for x in k[1:]) else " (KLD only: no retrieval run at this R)")
                     + " |")
    return "\n".join(lines) + "\n"


def amendments(meta: dict[str, Any]) -> str:
    """Where rows were added later (`--only`): which methods, by which command, at which commit."""
    return "".join(f" Rows of {', '.join(a['methods'])} added by `{a['command']}` at commit {a['commit']}, "
                   f"{a['wall_s']:.0f} s." for a in meta.get("amended", []))


def kld_table(kld: dict[str, Any]) -> str:
    m = kld["meta"]
    lines = [f"KL(full || method) in nats/token, top-1 agreement with the full cache and perplexity over the last "
             f"{m['n_scored']} of {m['n_tokens']} tokens of {m['text']}; chunks of {m['chunk']}; commit "
             f"{m['commit']}, {m['cpu']}, {m['cores']} cores; `{m['command']}`, {m['wall_s']:.0f} s." + amendments(m), "",
             "| method | cells held | KLD | KLD p99 | top-1 agree | perplexity |", "|---|---:|---:|---:|---:|---:|"]
    for r in kld["rows"]:
        lines.append(f"| {r['method']} | {r['cells_held']} | {r['kld']:.4f} | {r['kld_p99']:.3f} | "
                     f"{r['top1_agree']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def same_answer(task: str, a: str, b: str) -> bool:
    """Whether two answers say the same thing: the first number for the needle tasks (a longer or shorter
    continuation after it does not matter), the first line of text otherwise."""
    if task in ("passkey", "multikey"):
        na, nb = re.search(r"\d+", a), re.search(r"\d+", b)
        return (na.group(0) if na else None) == (nb.group(0) if nb else None)
    return a.strip().splitlines()[:1] == b.strip().splitlines()[:1]


def agreement(tasks: dict[str, Any]) -> dict[str, float]:
    """Per method, the share of items answered the same way as the full cache answered them."""
    full = {(r["task"], r["length"], r["depth"], r["seed"]): r["answer"] for r in tasks["rows"] if r["kind"] == "full"}
    agree: dict[str, list[bool]] = defaultdict(list)
    for r in tasks["rows"]:
        ref = full.get((r["task"], r["length"], r["depth"], r["seed"]))
        if ref is not None:
            agree[r["method"]].append(same_answer(r["task"], r["answer"], ref))
    return {m: sum(v) / len(v) for m, v in agree.items()}


def tasks_table(tasks: dict[str, Any]) -> str:
    m = tasks["meta"]
    by: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in tasks["rows"]:
        by[r["method"]][r["task"]].append(r)
    names = list(dict.fromkeys(r["task"] for r in tasks["rows"]))
    agree = agreement(tasks)
    lines = [f"Mean score per task (passkey over the length x depth grid) and share of answers that say the same "
             f"as the full cache's (same first number for passkey and multi-key, same first line otherwise); commit {m['commit']}, `{m['command']}`, {m['wall_s']:.0f} s." + amendments(m), "",
             "| method | " + " | ".join(names) + " | same answer as full |", "|---|" + "---:|" * (len(names) + 1)]
    for method, per in by.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{sum(r['score'] for r in per[t]) / len(per[t]):.2f}" if per.get(t) else "-" for t in names)
            + f" | {agree.get(method, 0.0):.2f} |")
    return "\n".join(lines) + "\n"


def plots(kld: dict[str, Any] | None, tasks: dict[str, Any] | None, suffix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []
    if kld:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        fams: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in kld["rows"]:
            if family(r["method"]) != "full":
                fams[family(r["method"])].append(r)
        for f, rows in fams.items():
            rows.sort(key=lambda r: r["ratio"])
            ax1.plot([r["ratio"] for r in rows], [r["kld"] for r in rows], marker="o", label=f)
            ax2.plot([r["ratio"] for r in rows], [r["top1_agree"] for r in rows], marker="o", label=f)
        ax1.set(xlabel="KV budget R (cells kept per token)", ylabel="KL(full || method), nats/token",
                title="KL divergence vs budget", yscale="log")
        ax2.set(xlabel="KV budget R", ylabel="top-1 agreement with full cache", title="Top-1 agreement vs budget")
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        m = kld["meta"]
        fig.suptitle(f"{m['model']}, {m['n_tokens']} tokens of pydoc_data, commit {m['commit']}", fontsize=9)
        fig.tight_layout()
        out.append(RESULTS / f"quality_vs_budget{suffix}.png")
        fig.savefig(out[-1], dpi=110)
    pk = [r for r in (tasks or {}).get("rows", []) if r["task"] == "passkey"]
    if pk:
        methods = list(dict.fromkeys(r["method"] for r in pk))
        lengths = sorted({r["length"] for r in pk})
        depths = sorted({r["depth"] for r in pk})
        fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 2.8), squeeze=False)
        for ax, method in zip(axes[0], methods):
            grid = [[next((r["score"] for r in pk if r["method"] == method and r["length"] == L and r["depth"] == d),
                          float("nan")) for L in lengths] for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_title(method, fontsize=8)
            ax.set_xlabel("context tokens", fontsize=8)
        axes[0][0].set_ylabel("needle depth")
        fig.suptitle(f"Passkey retrieval (green: found), commit {tasks['meta']['commit']}", fontsize=9)
        fig.tight_layout()
        out.append(RESULTS / f"passkey_heatmap{suffix}.png")
        fig.savefig(out[-1], dpi=110)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sfx = "_quick" if args.quick else ""
    kld, tasks = load("quality_kld" + sfx), load("quality_tasks" + sfx)
    speed, gemma = load("decode_bench" + sfx), (None if args.quick else load("decode_bench_gemma"))
    parts = ["# Benchmark summary" + (" (quick smoke run)" if args.quick else ""), "",
             "## Headline: Chelsea vs the full cache and vs the baselines at the same budget", "",
             "Baselines get the physical cells Chelsea allocates at the same R. Retrieval: mean score over the "
             "passkey grid and the RULER-style tasks (1 = all right). KLD: nats/token vs the full cache.", "",
             headline(kld, tasks, speed, gemma)]
    if kld:
        parts += ["## KL divergence, top-1 agreement, perplexity", "", kld_table(kld)]
    if tasks:
        parts += ["## Retrieval tasks", "", tasks_table(tasks)]
    for stem, label in (("retrieval", "SmolLM2"), ("retrieval_gemma", "Gemma-3-270M")):
        md = RESULTS / f"{stem}{sfx}.md"
        if md.exists():
            parts += [f"## Needle retrieval on varied text ({label})", "", md.read_text(), ""]
            png = RESULTS / f"{stem}{sfx}_heatmap.png"
            if png.exists():
                parts += [f"![{png.stem}]({png.name})", ""]
    for name, data in (("SmolLM2", speed), ("Gemma-3-270M", gemma)):
        if data:
            md = RESULTS / f"decode_bench{sfx if name == 'SmolLM2' else '_gemma'}.md"
            parts += [f"## Speed and memory ({name})", "", f"See [{md.name}]({md.name})."
                      if md.exists() else "", ""]
    for p in plots(kld, tasks, sfx):
        parts.append(f"![{p.stem}]({p.name})")
    text = "\n".join(parts) + "\n"
    (RESULTS / f"summary{sfx}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
