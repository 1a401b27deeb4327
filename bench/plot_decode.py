"""Plot decode speed against depth, and KV memory / peak RSS, from bench/results/decode_bench*.json.

    python3 bench/plot_decode.py [RESULTS.json]     # writes the PNG beside the JSON (needs matplotlib: .[bench])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "results" / "decode_bench.json"


def plot(results: Path) -> Path:
    data = json.loads(results.read_text())
    rows, meta = data["rows"], data["meta"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        depths = [r["depth"] for r in mine]
        med = [r["decode_tok_s"] for r in mine]
        # error bars: min and max over the decode bursts (older results have none)
        lo = [m - r.get("decode_tok_s_min", m) for m, r in zip(med, mine)]
        hi = [r.get("decode_tok_s_max", m) - m for m, r in zip(med, mine)]
        speed.errorbar(depths, med, yerr=[lo, hi], marker="o", capsize=3, label=config)
    last = [[r for r in rows if r["config"] == c][-1] for c in configs]
    x = range(len(configs))
    memory.bar([i - 0.2 for i in x], [r["kv_mib"] for r in last], width=0.4, label="KV MiB")
    if all("peak_rss_mib" in r for r in last):
        memory.bar([i + 0.2 for i in x], [r["peak_rss_mib"] for r in last], width=0.4, label="peak RSS MiB")
    memory.set_xticks(list(x), configs, rotation=35, ha="right", fontsize=8)
    memory.legend(fontsize=8)
    speed.set_xlabel("depth (tokens in context)")
    speed.set_ylabel("decode tokens / s")
    speed.set_xscale("log", base=2)
    speed.set_title("Decode speed vs depth")
    speed.grid(True, alpha=0.3)
    speed.legend(fontsize=7)
    memory.set_ylabel("MiB")
    memory.set_title(f"KV memory, logical context {meta['n_ctx']}")
    fig.suptitle(f"{meta['model']}, {meta.get('cpu', meta.get('machine'))}, {meta.get('cores', '')} cores, "
                 f"commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
