"""Plot decode speed and KV memory against depth from bench/results/decode_bench.json.

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
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        depths = [r["depth"] for r in mine]
        speed.plot(depths, [r["decode_tok_s"] for r in mine], marker="o", label=config)
        memory.bar(config, mine[-1]["kv_mib"])
    speed.set_xlabel("depth (tokens in context)")
    speed.set_ylabel("decode tokens / s")
    speed.set_xscale("log", base=2)
    speed.set_title("Decode speed vs depth")
    speed.grid(True, alpha=0.3)
    speed.legend()
    memory.set_ylabel("KV MiB (real allocation)")
    memory.set_title(f"KV memory, logical context {meta['n_ctx']}")
    fig.suptitle(f"{meta['model']}, {meta['machine']}, commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
