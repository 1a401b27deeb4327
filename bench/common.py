"""What every benchmark shares: the KV-cache methods compared, how each gets the same budget, the offline
reference text, and the provenance recorded with results (commit, CPU, cores)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chelsea_gguf import Llama
from chelsea_gguf.baselines import ContextShift, Session, StreamingEviction
from chelsea_gguf.cluster import default_options

RESULTS = Path(__file__).resolve().parent / "results"
N_BATCH = 256   # prompt chunk for every method: Chelsea compresses between chunks, baselines evict between them


@dataclass(frozen=True)
class Method:
    """A KV-cache configuration. kind: full | chelsea | random | streaming | shift (baselines use Chelsea's cells
    at R; random is Chelsea's machinery merging random pairs instead of similar ones)."""

    name: str
    kind: str = "full"
    ratio: float = 1.0
    bias: bool = True
    type_kv: str | None = None      # None: f16
    match_values: bool = True       # False: pair cells by keys alone (the paper's matching; ablation)
    extra: dict[str, Any] = field(default_factory=dict)  # more Llama keywords (kv_cluster_recent=...)

    def llama_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.type_kv:
            kw.update(type_k=self.type_kv, type_v=self.type_kv)
            # llama.cpp needs flash attention for a quantized V cache
            kw["flash_attn"] = True
        if self.kind in ("chelsea", "random"):
            kw.update(kv_cluster=True, kv_cluster_ratio=self.ratio, kv_cluster_bias=self.bias,
                      kv_cluster_match_values=self.match_values)
        if self.kind == "random":
            kw.update(kv_cluster_random_pairs=True, kv_cluster_seed=RANDOM_SEED)
        kw.update(self.extra)
        return kw


def chelsea(ratio: float, bias: bool = True, type_kv: str | None = None, match_values: bool = True) -> Method:
    name = (f"chelsea R={ratio:g}" + ("" if bias else " no-bias") + ("" if match_values else " keys-only")
            + (f" {type_kv}" if type_kv else ""))
    return Method(name, "chelsea", ratio, bias, type_kv, match_values)


FULL = Method("full f16")
RATIOS = (0.5, 0.25, 0.2, 0.1)
RANDOM_SEED = 1


def budget_methods(ratios: tuple[float, ...] = RATIOS) -> list[Method]:
    """Chelsea at each R, and at each R the baselines with the same physical cells."""
    out: list[Method] = []
    for r in ratios:
        out += [chelsea(r), chelsea(r, bias=False), chelsea(r, match_values=False), Method(f"random merge R={r:g}", "random", r),
                Method(f"streaming R={r:g}", "streaming", r), Method(f"context shift R={r:g}", "shift", r)]
    return out


def only_methods(methods: list[Method], only: str | None) -> list[Method]:
    """The methods whose names start with one of the comma-separated prefixes in `only` (None: all)."""
    if not only:
        return methods
    prefixes = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [m for m in methods if any(m.name.startswith(p) for p in prefixes)]
    if not chosen:
        raise SystemExit(f"--only {only!r}: no method matches (methods: {', '.join(m.name for m in methods)})")
    return chosen


def chelsea_cells(ratio: float, n_ctx: int) -> int:
    """Physical cells Chelsea allocates at ratio R for a logical context n_ctx (the baselines get the same)."""
    from dataclasses import replace

    return replace(default_options(), ratio=ratio).physical_cells(n_ctx, N_BATCH)


def open_method(method: Method, n_ctx: int, model_path: str | None = None, n_threads: int | None = None) -> Llama:
    """A Llama for `method` that can take n_ctx tokens of one sequence: the baselines get the physical cells
    Chelsea would allocate at their R, and make room by evicting (see ``new_session``)."""
    if method.kind in ("streaming", "shift"):
        n_ctx = chelsea_cells(method.ratio, n_ctx)
    return Llama(model_path, n_ctx=n_ctx, n_batch=N_BATCH, n_threads=n_threads, verbose=False,
                 **method.llama_kwargs())


def new_session(llm: Llama, method: Method, n_ctx: int) -> Session:
    """A fresh session (cleared cache); eviction policies are stateful, so each session gets a new one."""
    if method.kind in ("streaming", "shift"):
        opts = default_options()
        cls = StreamingEviction if method.kind == "streaming" else ContextShift
        # the cells allocated: those Chelsea requests at this R (budget plus one prompt chunk), padded by
        # llama.cpp as Chelsea's are, and Chelsea fills its buffer too before it merges
        return Session(llm, cls(llm.n_cells(), opts.sinks))
    return Session(llm)


def reference_text() -> str:
    """Long English prose available offline: the topic help of Python's stdlib ``pydoc_data.topics``."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def document_tokens(llm: Llama, n: int) -> list[int]:
    tokens = llm.tokenize(reference_text())
    if len(tokens) < n:
        raise SystemExit(f"the reference text has only {len(tokens)} tokens, fewer than {n}")
    return tokens[:n]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str, **extra: Any) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"commit": (commit or "unknown") + ("+dirty" if dirty else ""), "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command, **extra}


def amend_json(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], out: Path = RESULTS) -> Path:
    """Adds or replaces the rows of the methods in `rows` in a recorded result, keeping the other rows and
    their provenance; the amendment's own provenance goes to meta["amended"]. For adding a method to a long
    benchmark without running the others again."""
    path = out / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path}: no recorded result to amend; run without --only first")
    data = json.loads(path.read_text())
    new = {r["method"] for r in rows}
    data["rows"] = [r for r in data["rows"] if r["method"] not in new] + rows
    data["meta"].setdefault("amended", []).append({**meta, "methods": sorted(new)})
    return write_json(name, data, out)


def write_json(name: str, data: dict[str, Any], out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
