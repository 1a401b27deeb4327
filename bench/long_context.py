"""Long context from a small buffer: Gemma-3-270M, a prompt of ~60k tokens with a passkey planted early, in a
64k logical context clustered at R; beside it, the full cache of the same context (allocated, and run if asked).

    python3 bench/long_context.py                 # 64k context, ~60k-token prompt, R = 0.25
    python3 bench/long_context.py --quick         # 8k context, ~7k-token prompt
    python3 bench/long_context.py --run-full      # also prefill the full cache (slow: attention over 60k cells)

Each configuration runs in its own process, so its peak RSS is its own. Beyond the model's trained context
(32k) positions are scaled linearly (rope_freq_scale = n_ctx_train / n_ctx), the usual llama.cpp option.
Results: bench/results/long_context[_quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: build the context, optionally feed the prompt, report."""
    from chelsea_gguf import Llama
    from chelsea_gguf.models import gemma3_270m_path
    from chelsea_gguf.passkey import FILLER, passkey_prompt

    kwargs: dict[str, Any] = {"n_ctx": config["ctx"], "n_batch": 512, "verbose": False}
    if config["ratio"] < 1.0:
        kwargs.update(kv_cluster=True, kv_cluster_ratio=config["ratio"])
    with Llama(str(gemma3_270m_path()), **kwargs) as probe_free:
        n_train = probe_free.n_ctx_train()
        per_filler = len(probe_free.tokenize(FILLER * 20, add_bos=False)) / 20
    scale = min(1.0, n_train / config["ctx"])
    out: dict[str, Any] = dict(config, rope_freq_scale=scale, n_ctx_train=n_train)
    with Llama(str(gemma3_270m_path()), rope_freq_scale=scale if scale < 1.0 else 0.0, **kwargs) as llm:
        kv = llm.kv_stats()
        out.update(cells=llm.n_cells(), kv_mib=kv.kv_mib)
        if config["run"]:
            p = passkey_prompt(int(config["tokens"] / per_filler), config["depth"], seed=config["seed"])
            t0 = time.perf_counter()
            answer = llm(p.prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
            out.update(prompt_tokens=llm.last_timings.prompt_tokens, seconds=round(time.perf_counter() - t0, 1),
                       prompt_tok_s=round(llm.last_timings.prompt_tok_per_s, 1),
                       decode_tok_s=round(llm.last_timings.generation_tok_per_s, 1),
                       passkey=p.passkey, answer=answer, retrieved=p.retrieved(answer))
            if config["ratio"] < 1.0:
                stats = llm.kv_cluster_stats()
                out.update(cells_used=stats["cells"], compression=round(stats["compression"], 2),
                           passes=stats["passes"], cluster_ms=round(stats["time_ms"]))
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return out


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(config, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", "",
             "| config | n_ctx | cells | KV MiB | vs full | prompt tokens | prompt tok/s | passkey | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    full = next((r for r in rows if r["ratio"] == 1.0 and "kv_mib" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['ctx']} | - | - | - | - | - | error: {r['error']} | - |")
            continue
        ratio = f"{r['kv_mib'] / full['kv_mib']:.2f}" if full else "-"
        ran = "passkey" in r
        verdict = ("retrieved" if r["retrieved"] else f"missed ({r['answer'].strip()!r})") if ran else "not run"
        lines.append(f"| {r['name']} | {r['ctx']} | {r['cells']} | {r['kv_mib']:.1f} | {ratio} | "
                     f"{r.get('prompt_tokens', '-')} | {r.get('prompt_tok_s', '-')} | {verdict} | {r['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8k context instead of 64k")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--depth", type=float, default=0.05, help="where the passkey sits (share of the prompt)")
    ap.add_argument("--run-full", action="store_true", help="also feed the prompt to the full cache")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return 0
    ctx = 8192 if args.quick else 65536
    base = {"ctx": ctx, "tokens": int(ctx * 0.92), "depth": args.depth, "seed": 17}
    rows = [run_child(dict(base, name=f"Chelsea R={args.ratio:g}", ratio=args.ratio, run=True)),
            run_child(dict(base, name="full cache", ratio=1.0, run=args.run_full))]
    from common import provenance, write_json  # bench/ is on sys.path when this runs as a script

    suffix = "_quick" if args.quick else ""
    write_json(f"long_context{suffix}", {"provenance": provenance(" ".join(["bench/long_context.py", *sys.argv[1:]])),
                                         "rows": rows})
    md = markdown(rows, f"Long context from a small buffer (Gemma-3-270M, {ctx // 1024}k)")
    (RESULTS / f"long_context{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
