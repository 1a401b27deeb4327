"""CPU memory of the Llama-3.1-8B and Qwen2.5-7B shapes (RANDOM-WEIGHT files): KV cache + compute buffers at
32k / 64k / 128k context, full f16 cache vs Chelsea R = 0.2.

    python3 bench/shape_memory.py            # writes (or reuses) the two shape files, then measures (~2 min)
    python3 bench/shape_memory.py --tiny     # the same on the --tiny files (seconds; not the real shapes)

The models are ``bench/shape_models.py`` files: the exact hyper-parameters and tensor shapes of the real models
with **random weights** (memory is all that is measured; no quality is or may be reported from them). Settings:
flash attention on, n_batch = n_ubatch = 512, 1 thread, f16 K/V, Chelsea ``kv_cluster=True,
kv_cluster_ratio=0.2`` (other options at their defaults). How each number is obtained:

* **full KV**: never allocated (a 128k f16 cache of the 8B shape is 16 GiB, and llama.cpp clears it, touching
  every page). ``Llama(...).kv_layout()`` (``chelsea_gguf.kv_memory.measure_kv_layout``) creates two real probe
  contexts (1024 and 2048 cells) of the same model and settings and reads their allocated K/V buffers; the
  allocation is exactly linear in the cells, and ``layout.bytes(n_ctx, clustered=False)`` gives the full cache.
  Cross-checked against the K/V tensor bytes llama.cpp sizes in ``no_alloc`` mode at each context, and against a
  real full 8k context.
* **full compute**: llama.cpp's ``no_alloc`` mode (``llama_model_params.no_alloc``, mmap off: the memory-fit
  pass): the model's metadata only, dummy weight and KV buffers, and the scheduler sizes the compute buffers for
  the full context without allocating them; the size is llama.cpp's own log line
  (``CPU compute buffer size = X MiB``, two decimals). Cross-checked against a real full 8k context.
* **Chelsea KV and compute**: real contexts (``Llama(..., kv_cluster=True, kv_cluster_ratio=0.2)``, about
  0.2 n_ctx + 512 cells, padded to 256), read with ``llm.kv_stats()``: ``buffer_bytes`` (K, V and the cluster
  sizes) and ``compute_bytes`` (the scheduler's buffers as allocated after clustering re-reserved them).

Weights are loaded without llama.cpp's CPU repack copy (``use_extra_bufts`` off: they stay in the file's mmap),
to keep RSS near the KV cache; repacking changes neither KV nor compute buffers (checked on the tiny files).
Results: bench/results/shape_memory[_tiny].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chelsea_gguf import Llama  # noqa: E402
from chelsea_gguf.kv import MIB  # noqa: E402

import shape_models as sm  # noqa: E402
from provenance import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXTS = (32768, 65536, 131072)
CHECK_CTX = 8192
RATIO = 0.2
SETTINGS = {"flash_attn": True, "n_batch": 512, "n_ubatch": 512, "n_threads": 1, "verbose": False}
RANDOM_HEADER = ("**Random weights.** These models are `bench/shape_models.py` files with the exact shapes of the "
                 "real models and random values: memory only, no quality is or may be reported from them.")
METHODS = {
    "full.kv_bytes": "computed: Llama.kv_layout() (measured from two real probe contexts, 1024 and 2048 cells; "
                     "exactly linear) evaluated at n_ctx cells; never allocated",
    "full.kv_tensor_bytes_no_alloc": "sized by llama.cpp in no_alloc mode (K/V tensor bytes), not allocated",
    "full.compute_bytes": "sized by llama.cpp in no_alloc mode (its 'compute buffer size' log line, MiB to 2 "
                          "decimals), not allocated",
    "full_real_check": "a real full context of 8192 tokens (allocated): kv_stats() buffer_bytes and compute_bytes",
    "chelsea.*": "real contexts (allocated): Llama(..., kv_cluster=True, kv_cluster_ratio=0.2).kv_stats()",
    "rss": "/proc/self/status after the context is created; RssFile is the model file's mmap (clean pages)",
}
_COMPUTE_RE = re.compile(r"(\S+) compute buffer size =\s*([0-9.]+) MiB")


def proc_status() -> dict[str, int]:
    """RSS of this process in bytes (total, anonymous, file-backed) and its peak."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def open_llama(path: Path, n_ctx: int, *, no_alloc: bool = False, **kwargs: Any) -> tuple[Llama, str]:
    """A Llama on ``path`` with the benchmark's settings, and the llama.cpp log of its creation."""
    fields = sm.no_alloc_params() if no_alloc else sm.NO_REPACK
    with sm.LogTap() as tap:
        llm = Llama(str(path), n_ctx=n_ctx, model_params=fields, **SETTINGS, **kwargs)
    return llm, tap.text()


def logged_compute_bytes(log: str) -> int:
    """The compute buffer sizes llama.cpp logged (the last reserve, summed over backends), in bytes (MiB to 2
    decimals)."""
    sizes: dict[str, float] = {}
    for backend, mib in _COMPUTE_RE.findall(log):
        sizes[backend] = float(mib)
    if not sizes:
        raise RuntimeError("llama.cpp logged no compute buffer size")
    return round(sum(sizes.values()) * MIB)


def measure_shape(cfg: sm.ShapeConfig, path: Path, contexts: tuple[int, ...]) -> dict[str, Any]:
    res: dict[str, Any] = {"shape": cfg.name, "base": cfg.base, "path": str(path), "random_weights": True,
                           "hparams": {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                                       "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv, "head_dim": cfg.head_dim,
                                       "n_ff": cfg.n_ff, "n_vocab": cfg.n_vocab, "n_ctx_train": cfg.n_ctx_train}}
    t0 = time.time()
    llm, _ = open_llama(path, 512)
    layout = llm.kv_layout()
    llm.close()
    res["kv_layout"] = {"fixed_bytes": layout.fixed_bytes, "per_cell_bytes": layout.per_cell_bytes,
                        "cluster_per_cell_bytes": layout.cluster_per_cell_bytes,
                        "f16_formula_per_cell_bytes": cfg.f16_kv_bytes_per_cell(),
                        "measured_s": round(time.time() - t0, 2)}
    print(json.dumps({"shape": cfg.name, "kv_layout": res["kv_layout"]}), flush=True)

    # the full cache: KV from the layout, compute from no_alloc (and the KV tensor bytes no_alloc sizes)
    full: dict[int, dict[str, Any]] = {}
    for n_ctx in (CHECK_CTX, *contexts):
        t0 = time.time()
        llm, log = open_llama(path, n_ctx, no_alloc=True)
        kv = llm.kv_stats()
        full[n_ctx] = {"n_ctx": n_ctx, "cells": kv.n_cells, "kv_bytes": layout.bytes(n_ctx, clustered=False),
                       "kv_tensor_bytes_no_alloc": kv.k_bytes + kv.v_bytes,
                       "compute_bytes": logged_compute_bytes(log), "s": round(time.time() - t0, 2)}
        llm.close()
        print(json.dumps({"shape": cfg.name, "full_no_alloc": full[n_ctx]}), flush=True)

    # cross-check both methods against a real full context that fits
    t0 = time.time()
    llm, log = open_llama(path, CHECK_CTX)
    kv = llm.kv_stats()
    check = {"n_ctx": CHECK_CTX, "cells": kv.n_cells, "kv_bytes_real": kv.buffer_bytes,
             "kv_bytes_layout": full[CHECK_CTX]["kv_bytes"], "compute_bytes_real": kv.compute_bytes,
             "compute_bytes_no_alloc_log": full[CHECK_CTX]["compute_bytes"],
             "compute_bytes_real_log": logged_compute_bytes(log), "rss": proc_status()}
    llm.close()
    check["kv_match"] = check["kv_bytes_real"] == check["kv_bytes_layout"]
    check["compute_diff_bytes"] = check["compute_bytes_real"] - check["compute_bytes_no_alloc_log"]
    check["s"] = round(time.time() - t0, 2)
    res["full_real_check"] = check
    print(json.dumps({"shape": cfg.name, "full_real_check": check}), flush=True)

    rows = []
    for n_ctx in contexts:
        t0 = time.time()
        llm, _ = open_llama(path, n_ctx, kv_cluster=True, kv_cluster_ratio=RATIO)
        kv = llm.kv_stats()
        rss = proc_status()
        chelsea = {"cells": kv.n_cells, "kv_bytes": kv.buffer_bytes, "k_bytes": kv.k_bytes, "v_bytes": kv.v_bytes,
                   "kv_bytes_layout": layout.bytes(kv.n_cells, clustered=True), "compute_bytes": kv.compute_bytes,
                   "n_ctx_logical": llm.n_ctx(), "rss": rss, "s": round(time.time() - t0, 2)}
        llm.close()
        f = full[n_ctx]
        row = {"shape": cfg.name, "base": cfg.base, "n_ctx": n_ctx, "full": f, "chelsea": chelsea,
               "full_total_bytes": f["kv_bytes"] + f["compute_bytes"],
               "chelsea_total_bytes": chelsea["kv_bytes"] + chelsea["compute_bytes"]}
        row["chelsea_share_of_full_total"] = row["chelsea_total_bytes"] / row["full_total_bytes"]
        row["chelsea_kv_share_of_full_kv"] = chelsea["kv_bytes"] / f["kv_bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    res["rows"] = rows
    return res


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mib = lambda b: f"{b / MIB:,.1f}"  # noqa: E731
    lines = [
        "# Memory of the Llama-3.1-8B and Qwen2.5-7B shapes: KV cache and compute buffers, full f16 vs Chelsea R = 0.2",
        "",
        RANDOM_HEADER,
        "",
        f"Commit {meta['commit']}, {meta['date']}, {meta['cpu']}; command `{meta['command']}`, {meta['wall_s']:.0f} s. "
        "CPU backend, flash attention on, n_batch = n_ubatch = 512, 1 thread, f16 K/V. **Full KV**: computed from "
        "the measured KV layout (two real probe contexts, exactly linear in the cells; a 128k full cache is never "
        "allocated), equal to the K/V tensor bytes llama.cpp sizes in `no_alloc` mode. **Full compute**: sized by "
        "llama.cpp in `no_alloc` mode (its logged `compute buffer size`, 2 decimals), not allocated. **Chelsea**: "
        "real contexts (`kv_cluster=True, kv_cluster_ratio=0.2`), `kv_stats()` `buffer_bytes` (K, V and cluster "
        "sizes) and `compute_bytes`. Share: Chelsea (KV + compute) / full (KV + compute). Weights are not counted.",
        "",
        "| model shape | context | full KV MiB | full compute MiB | Chelsea cells | Chelsea KV MiB | "
        "Chelsea compute MiB | Chelsea total / full total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for r in res["rows"]:
            f, c = r["full"], r["chelsea"]
            lines.append(f"| {res['base']} (random weights) | {r['n_ctx'] // 1024}k | {mib(f['kv_bytes'])} | "
                         f"{mib(f['compute_bytes'])} | {c['cells']} | {mib(c['kv_bytes'])} | "
                         f"{mib(c['compute_bytes'])} | "
                         f"{r['chelsea_share_of_full_total']:.3f} |")
    lines += ["", "The full cache's compute buffer does not grow with the context for these shapes: its size is "
              "consistent with the 512-token batch's logits being the peak (512 x n_vocab x 4 B = 250.5 MiB for "
              "Llama, 297 MiB for Qwen, plus ~15 MiB). Chelsea's grows with the cells: clustering reserves the "
              "buffers again with the per-head `log(size)` masks attention adds once cells merge, and the growth "
              "is consistent with n_head x cells x 512 x 2 B (840 MiB for the 8B shape at 128k). Qwen2.5-7B's GGUF "
              "says 32k context (its model card enables YaRN for 128k); KV and compute buffers do not depend on "
              "the rope scaling.",
              "", "Cross-checks (a real full context of 8k tokens, which fits):", "",
              "| model shape | KV per cell (measured) | f16 formula | real 8k KV = layout | real 8k compute MiB | "
              "no_alloc 8k compute MiB |", "|---|---:|---:|---|---:|---:|"]
    for res in results:
        lay, ch = res["kv_layout"], res["full_real_check"]
        lines.append(f"| {res['base']} | {lay['per_cell_bytes']:.0f} B + {lay['cluster_per_cell_bytes']:.0f} B "
                     f"clustered | {lay['f16_formula_per_cell_bytes']} B | {'yes' if ch['kv_match'] else 'NO'} | "
                     f"{ch['compute_bytes_real'] / MIB:.2f} | {ch['compute_bytes_no_alloc_log'] / MIB:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the --tiny files (fast; not the real shapes)")
    ap.add_argument("--shapes", default=",".join(sm.SHAPES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    results = []
    for name in args.shapes.split(","):
        cfg = sm.tiny(sm.SHAPES[name]) if args.tiny else sm.SHAPES[name]
        path, written = sm.ensure_model(cfg)
        print(json.dumps({"shape": cfg.name, "path": str(path), "written": written}), flush=True)
        results.append(measure_shape(cfg, path, CONTEXTS))
    stem = "shape_memory_tiny" if args.tiny else "shape_memory"
    meta = provenance("python3 bench/shape_memory.py" + (" --tiny" if args.tiny else ""),
                      wall_s=round(time.time() - t0, 1), peak_rss=proc_status().get("VmHWM"),
                      note=RANDOM_HEADER, methods=METHODS, settings={**SETTINGS, "type_k": "f16", "type_v": "f16",
                                                    "kv_cluster_ratio": RATIO})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "shapes": results}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
