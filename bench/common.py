"""What every benchmark shares: the KV-cache methods compared, how each gets the same budget, the offline
reference text, and the provenance recorded with results (commit, CPU, cores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from chelsea_gguf import Llama

from baselines import Session
from provenance import provenance
from methods import (FULL, N_BATCH, RANDOM_SEED, Chelsea, Eviction, KeyDiff, Knorm, Method, RandomMerge, Shift,
                     Streaming, chelsea, chelsea_cells, context_shift, full_quantized, keydiff, knorm, random_merge,
                     streaming)

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.5, 0.25, 0.2, 0.1)
__all__ = ["FULL", "N_BATCH", "RANDOM_SEED", "RATIOS", "RESULTS", "Chelsea", "Eviction", "KeyDiff", "Knorm", "Method",
           "RandomMerge", "Shift", "Streaming", "budget_methods", "chelsea", "chelsea_cells", "context_shift",
           "full_quantized", "keydiff", "knorm", "new_session", "open_method", "random_merge", "streaming"]


def budget_methods(ratios: tuple[float, ...] = RATIOS) -> list[Method]:
    """Chelsea at each R, and at each R the baselines with the same physical cells."""
    out: list[Method] = []
    for r in ratios:
        out += [chelsea(r), chelsea(r, bias=False), chelsea(r, match_values=False), random_merge(r), streaming(r),
                context_shift(r)]
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


def open_method(method: Method, n_ctx: int, model_path: str | None = None, n_threads: int | None = None) -> Llama:
    """``method.open``: a Llama that can take n_ctx tokens of one sequence with this method."""
    return method.open(n_ctx, model_path, n_threads)


def new_session(llm: Llama, method: Method, n_ctx: int) -> Session:
    """``method.session``: a fresh session (cleared cache) on a context the method opened."""
    return method.session(llm, n_ctx)


def reference_text() -> str:
    """Long English prose available offline: the topic help of Python's stdlib ``pydoc_data.topics``."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def document_tokens(llm: Llama, n: int) -> list[int]:
    tokens = llm.tokenize(reference_text())
    if len(tokens) < n:
        raise SystemExit(f"the reference text has only {len(tokens)} tokens, fewer than {n}")
    return tokens[:n]


def text_stretch(text: list[int], offset: int, n: int, option: str = "offset") -> list[int]:
    """Tokens [offset, offset + n) of the tokenized reference text; exits naming the offset when the text is shorter."""
    tokens = text[offset:offset + n]
    if len(tokens) < n:
        raise SystemExit(f"{option} {offset}: the reference text has only {len(text)} tokens")
    return tokens


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


def write_run(stem: str, meta: dict[str, Any], rows: list[dict[str, Any]], table: str) -> Path:
    """A run's JSON and its markdown table under bench/results (called after every step, so that an interrupted
    run keeps what it measured); returns the JSON's path."""
    path = write_json(stem, {"meta": meta, "rows": rows})
    (RESULTS / f"{stem}.md").write_text(table)
    return path


def print_plot(plot: Callable[[Path], Path], results: Path) -> None:
    """Prints the plot `plot` draws from `results`, or why there is none: matplotlib is the bench extra."""
    try:
        print(plot(results))
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")


def write_json(name: str, data: dict[str, Any], out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
