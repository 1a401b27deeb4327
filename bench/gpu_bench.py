"""Passkey retrieval and decode speed with the whole model and KV cache on the GPU (-ngl 99), full cache vs
Chelsea. Run by scripts/gpu_check.sh on a CUDA machine; needs a chelsea_gguf built with CHELSEA_CUDA=ON.

    GPU=NVIDIA_H200 MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUTDIR=bench/results python3 bench/gpu_bench.py

Writes gpu_check_<GPU>.json and .md to OUTDIR. SmolLM2 is trained to 8k: the 32k decode rows measure speed
only (no RoPE scaling, so text quality beyond 8k is not the point there).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.passkey import passkey_prompt
from chelsea_gguf.sampling import SamplingParams

RATIO = 0.2
PASSKEY_CTX = 8192
PASSKEY_FILLER = 300                 # ~6.6k tokens
DEPTHS = (0.1, 0.5, 0.9)
DECODE_DEPTHS = (8192, 32768)
DECODE_TOKENS = 256
REPEATS = 3


# decode configurations beyond full vs Chelsea's defaults, for finding where GPU time goes
# (GPU_BENCH_VARIANTS="no-bias,g=1024": Chelsea without the log(size) bias, with a decode interval of 1024)
VARIANTS = [v for v in os.environ.get("GPU_BENCH_VARIANTS", "").split(",") if v]


def cluster_kwargs(kind: str) -> dict[str, Any]:
    if kind == "full":
        return {}
    kw: dict[str, Any] = {"kv_cluster": True, "kv_cluster_ratio": RATIO}
    for part in kind.split()[2:]:
        if part == "no-bias":
            kw["kv_cluster_bias"] = False
        elif part.startswith("g="):
            kw["kv_cluster_interval"] = int(part[2:])
    return kw


def passkey_rows(model: str) -> list[dict[str, Any]]:
    rows = []
    for flash_attn in (False, True):
        for kind in ("full", f"chelsea R={RATIO:g}"):
            with Llama(model, n_ctx=PASSKEY_CTX, n_batch=512, n_gpu_layers=99, flash_attn=flash_attn,
                       verbose=False, **cluster_kwargs(kind)) as llm:
                found, tokens = [], 0
                for depth in DEPTHS:
                    p = passkey_prompt(PASSKEY_FILLER, depth, seed=int(depth * 100))
                    tokens = len(llm.tokenize(p.prompt))
                    out = llm.create_completion(p.prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
                    found.append(bool(p.retrieved(out)))
                stats = llm.kv_cluster_stats() if kind != "full" else {}
                kv_mib = llm.kv_stats().kv_mib
            row = {"config": kind, "flash_attn": flash_attn, "prompt_tokens": tokens, "depths": list(DEPTHS),
                   "retrieved": found, "compression": stats.get("compression"), "kv_mib": round(kv_mib, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def document(llm: Llama, n: int) -> list[int]:
    import pydoc_data.topics as topics

    doc = llm.tokenize("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    return (doc * (n // len(doc) + 1))[:n]


def decode_rows(model: str) -> list[dict[str, Any]]:
    rows = []
    for depth in DECODE_DEPTHS:
        for kind in ["full", f"chelsea R={RATIO:g}"] + [f"chelsea R={RATIO:g} {v.replace('+', ' ')}" for v in VARIANTS]:
            with Llama(model, n_ctx=depth + DECODE_TOKENS * (REPEATS + 1), n_batch=2048, n_gpu_layers=99,
                       flash_attn=True, verbose=False, **cluster_kwargs(kind)) as llm:
                doc = document(llm, depth)
                speeds, prompt_tok_s = [], None
                for rep in range(REPEATS):
                    # the first run feeds the prompt; later runs reuse it as a cached prefix and decode again
                    n = sum(1 for _ in llm.generate_tokens(doc, SamplingParams(temperature=0.0), DECODE_TOKENS))
                    t = llm.last_timings
                    if rep == 0:
                        prompt_tok_s = t.prompt_tok_per_s
                    speeds.append(t.generation_tok_per_s)
                kv = llm.kv_stats()
                row = {"config": kind, "depth": depth, "decode_tok_s": sorted(speeds),
                       "decode_tok_s_median": sorted(speeds)[len(speeds) // 2], "prompt_tok_s": prompt_tok_s,
                       "generated": n, "kv_mib": round(kv.kv_mib, 1), "compute_mib": round(kv.compute_mib, 1)}
                if kind != "full":
                    cs = llm.kv_cluster_stats()
                    row.update(compression=round(cs["compression"], 2), cluster_ms=round(cs["time_ms"], 1),
                               passes=cs["passes"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    full = {r["depth"]: r for r in rows if r["config"] == "full"}
    for r in rows:
        f = full[r["depth"]]
        r["decode_speedup"] = round(r["decode_tok_s_median"] / f["decode_tok_s_median"], 3)
        r["kv_mib_ratio"] = round(r["kv_mib"] / f["kv_mib"], 3)
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [f"# GPU check on {m['gpu']}", "",
             f"Model {m['model']}, everything on the GPU (`n_gpu_layers=99`), Chelsea at R={RATIO:g} with the "
             f"default options; `bash scripts/gpu_check.sh run`, {m['date']}, {m['wall_s']:.0f} s.", "",
             f"## Passkey ({res['passkey'][0]['prompt_tokens'] if res['passkey'] else '-'} tokens, context {PASSKEY_CTX}, needle at "
             f"{', '.join(f'{d:.0%}' for d in DEPTHS)})", "",
             "| config | flash attn | retrieved | compression | KV MiB |", "|---|---|---:|---:|---:|"]
    for r in res["passkey"]:
        lines.append(f"| {r['config']} | {'on' if r['flash_attn'] else 'off'} | {sum(r['retrieved'])}/{len(r['retrieved'])} "
                     f"| {r['compression'] or 1:.2f}x | {r['kv_mib']} |")
    lines += ["", f"## Decode ({DECODE_TOKENS} greedy tokens after the prompt, {REPEATS} runs: median, flash "
              "attention on; SmolLM2 is trained to 8k, the 32k rows measure speed only)", "",
              "| config | depth | decode tok/s | vs full | prompt tok/s | KV MiB | vs full | compute MiB | clustering ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["decode"]:
        lines.append(f"| {r['config']} | {r['depth']} | {r['decode_tok_s_median']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{r['prompt_tok_s']:.0f} | {r['kv_mib']} | {r['kv_mib_ratio']:.2f} | {r.get('compute_mib', '-')} | "
                     f"{r.get('cluster_ms', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    gpu, model, out = os.environ["GPU"], os.environ["MODEL"], Path(os.environ.get("OUTDIR", "bench/results"))
    t0 = time.time()
    res: dict[str, Any] = {"passkey": [] if os.environ.get("GPU_BENCH_SKIP_PASSKEY") else passkey_rows(model),
                           "decode": decode_rows(model)}
    res["meta"] = {"gpu": gpu, "model": Path(model).name, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.time() - t0, 1),
                   "command": "bash scripts/gpu_check.sh run"}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{gpu}" + ("_variants" if VARIANTS else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
