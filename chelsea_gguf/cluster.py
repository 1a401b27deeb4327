"""Options and statistics of online KV-cache clustering (Chelsea) for a context."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.options import require_float, require_int


@dataclass(frozen=True)
class ClusterOptions:
    """What ``Llama(kv_cluster=True, kv_cluster_*=...)`` asks for; defaults from the C library."""

    ratio: float = 0.25     # cells kept per token seen
    chunk: int = 64         # cells per matching chunk (even)
    sinks: int = 16         # first tokens never merged
    recent: int = 64        # last tokens never merged
    interval: int = 256     # while generating, compress once a sequence exceeds its budget by this many cells
    max_passes: int = 32
    pass_fraction: float = 0.25  # share of candidate cells one pass may merge: the most similar pairs go first
    bias: bool = True       # proportional attention: + log(cluster size)
    match_values: bool = True  # pair cells by keys and values (False: by keys alone, as the paper)
    random_pairs: bool = False  # benchmark baseline: merge random pairs instead of the most similar ones
    seed: int = 0           # of random_pairs

    def validated(self) -> "ClusterOptions":
        ratio = require_float("kv_cluster_ratio", self.ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"kv_cluster_ratio: {self.ratio} is out of range (must be > 0 and <= 1)")
        require_int("kv_cluster_chunk", self.chunk, 2)
        if self.chunk % 2:
            raise ValueError(f"kv_cluster_chunk: {self.chunk} must be even (chunks split into alternating pairs)")
        require_int("kv_cluster_sinks", self.sinks, 0)
        require_int("kv_cluster_recent", self.recent, 0)
        require_int("kv_cluster_interval", self.interval, 0)
        require_int("kv_cluster_max_passes", self.max_passes, 1, 64)
        fraction = require_float("kv_cluster_pass_fraction", self.pass_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"kv_cluster_pass_fraction: {self.pass_fraction} is out of range (must be > 0 and <= 1)")
        if not isinstance(self.bias, bool):
            raise ValueError(f"kv_cluster_bias: expected a bool, got {self.bias!r}")
        if not isinstance(self.match_values, bool):
            raise ValueError(f"kv_cluster_match_values: expected a bool, got {self.match_values!r}")
        if not isinstance(self.random_pairs, bool):
            raise ValueError(f"kv_cluster_random_pairs: expected a bool, got {self.random_pairs!r}")
        require_int("kv_cluster_seed", self.seed, 0, 2**32 - 1)
        return self

    def physical_cells(self, n_ctx: int, n_batch: int) -> int:
        """KV cells to allocate for a logical context of n_ctx tokens: the budget at a full context plus
        room for whichever is larger, the interval of slack while generating or one batch of the prompt
        (the cache compresses to budget before a batch or a token that would not fit, so a full interval never
        needs a cell more), never more than the full cache."""
        budget = max(math.ceil(self.ratio * n_ctx), self.sinks + self.recent + 2)
        return min(n_ctx, budget + max(self.interval, n_batch))

    def to_native(self) -> Any:
        p = lib.chelsea_kv_cluster_default_params()
        p.ratio = self.ratio
        p.chunk = self.chunk
        p.n_sink = self.sinks
        p.n_recent = self.recent
        p.interval = self.interval
        p.max_passes = self.max_passes
        p.pass_fraction = self.pass_fraction
        p.log_bias = self.bias
        p.match_values = self.match_values
        p.random_pairs = self.random_pairs
        p.seed = self.seed
        return p


def default_options() -> ClusterOptions:
    p = lib.chelsea_kv_cluster_default_params()
    return ClusterOptions(ratio=round(p.ratio, 6), chunk=p.chunk, sinks=p.n_sink, recent=p.n_recent,
                          interval=p.interval, max_passes=p.max_passes, pass_fraction=round(p.pass_fraction, 6),
                          bias=bool(p.log_bias), match_values=bool(p.match_values),
                          random_pairs=bool(p.random_pairs), seed=p.seed)


# Llama's kv_cluster_* keywords and the ClusterOptions fields they set
KEYWORD_FIELDS = {"kv_cluster_ratio": "ratio", "kv_cluster_chunk": "chunk", "kv_cluster_sinks": "sinks",
                  "kv_cluster_recent": "recent", "kv_cluster_interval": "interval", "kv_cluster_bias": "bias",
                  "kv_cluster_max_passes": "max_passes", "kv_cluster_pass_fraction": "pass_fraction",
                  "kv_cluster_match_values": "match_values", "kv_cluster_random_pairs": "random_pairs",
                  "kv_cluster_seed": "seed"}


def options_from_keywords(keywords: Mapping[str, Any]) -> ClusterOptions:
    """The C library's defaults, overridden by the kv_cluster_* keywords given (None keeps the default)."""
    unknown = sorted(set(keywords) - set(KEYWORD_FIELDS))
    if unknown:
        raise TypeError(f"unknown KV-cluster keyword(s): {', '.join(unknown)} "
                        f"(known: {', '.join(KEYWORD_FIELDS)})")
    chosen = {KEYWORD_FIELDS[k]: v for k, v in keywords.items() if v is not None}
    return dataclasses.replace(default_options(), **chosen).validated()


def enable(ctx: Any, options: ClusterOptions) -> None:
    params = ffi.new("struct chelsea_kv_cluster_params *", options.to_native())
    err = ffi.new("char[]", 512)
    if lib.chelsea_kv_cluster_enable(ctx, params, err, 512) != 0:
        raise ValueError(f"kv_cluster: {ffi.string(err).decode()}")


@dataclass(frozen=True)
class ClusterStats:
    tokens: int            # tokens the sequence's cells represent
    cells: int             # cells it holds
    passes: int
    compressions: int
    time_ms: float         # spent clustering
    pos_merged_min: int    # positions covered by merged cells (-1: none)
    pos_merged_max: int
    nonfinite: int         # (cell, KV head, layer) slices holding NaN/Inf that compression passes found

    @property
    def compression(self) -> float:
        """Tokens per cell: 4.0 means the cache holds a quarter of what a full cache would."""
        return self.tokens / self.cells if self.cells else 1.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compression"] = self.compression
        return d


def read_stats(ctx: Any, seq_id: int = 0) -> ClusterStats:
    raw = ffi.new("struct chelsea_kv_cluster_seq_stats *")
    if lib.chelsea_kv_cluster_seq_stats_get(ctx, seq_id, raw) != 0:
        raise RuntimeError("clustering is not enabled on this context")
    return ClusterStats(tokens=raw.tokens, cells=raw.cells, passes=raw.passes, compressions=raw.compressions,
                        time_ms=raw.t_ms, pos_merged_min=raw.pos_merged_min, pos_merged_max=raw.pos_merged_max,
                        nonfinite=raw.nonfinite)


def cell_positions(ctx: Any, seq_id: int = 0) -> list[int]:
    """Positions of the cells of seq_id's stream in cell order (-1: empty). For tests and tools."""
    n = lib.chelsea_kv_cluster_cell_positions(ctx, seq_id, ffi.NULL, 0)
    if n < 0:
        raise ValueError(f"seq_id {seq_id} is out of range")
    out = ffi.new("llama_pos[]", n)
    lib.chelsea_kv_cluster_cell_positions(ctx, seq_id, out, n)
    return list(out)


def cluster_sizes(ctx: Any, layer: int, n_cells: int, seq_id: int = 0) -> list[list[float]]:
    """Cluster sizes [KV head][cell] of the first n_cells cells of cache layer `layer`. For tests and tools."""
    buf = ffi.new("float[]", max(1, 64 * n_cells))
    n_head = lib.chelsea_kv_cluster_sizes(ctx, seq_id, layer, buf, n_cells)
    if n_head < 0:
        raise ValueError(f"no cluster sizes for layer {layer}, {n_cells} cells, seq {seq_id}")
    if n_head > 64:
        buf = ffi.new("float[]", n_head * n_cells)
        lib.chelsea_kv_cluster_sizes(ctx, seq_id, layer, buf, n_cells)
    return [list(buf[h * n_cells:(h + 1) * n_cells]) for h in range(n_head)]
