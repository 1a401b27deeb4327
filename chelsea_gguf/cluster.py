"""Options and statistics of online KV-cache clustering (Chelsea) for a context.

Each option is declared once, as a field of :class:`ClusterOptions`: its default is read from the C library
(``chelsea_kv_cluster_default_params``), its metadata names the C field, the CLI flag and a one-line doc, and the
``kv_cluster_*`` keywords, the flags with their help and the error messages are derived from it. The range rules
live in C (``chelsea_kv_cluster_params_check``); Python checks only what the C types cannot carry.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.kv import read_kv_stats

KEYWORD_PREFIX = "kv_cluster_"

_C_PARAMS = ffi.typeof("struct chelsea_kv_cluster_params")
_C_TYPES: dict[str, str] = {name: f.type.cname for name, f in _C_PARAMS.fields}
_C_DEFAULTS = lib.chelsea_kv_cluster_default_params()
# what Python must check before a value can be stored in the C field at all
_C_INT_RANGES: dict[str, tuple[int, int]] = {"int32_t": (-(2**31), 2**31 - 1), "uint32_t": (0, 2**32 - 1)}


def _c_default(c_name: str) -> Any:
    value = getattr(_C_DEFAULTS, c_name)
    kind = _C_TYPES[c_name]
    if kind == "_Bool":
        return bool(value)
    if kind == "float":
        return round(value, 6)  # the float32 default as written in C (0.2f -> 0.2)
    return int(value)


def _option(c_name: str, doc: str, flag: str | None = None, flag_help: str | None = None) -> Any:
    """A ClusterOptions field: the default of C field `c_name`; `flag` is its chelsea-run flag (a bool's flag turns
    it off and `flag_help` says what that does)."""
    return dataclasses.field(default=_c_default(c_name),
                             metadata={"c_name": c_name, "doc": doc, "flag": flag, "flag_help": flag_help})


@dataclass(frozen=True)
class ClusterOptions:
    """What ``Llama(kv_cluster=True, kv_cluster_<field>=...)`` asks for; every default comes from the C library."""

    ratio: float = _option("ratio", "R: cells kept per token seen, in (0, 1]", "--kv-ratio")
    chunk: int = _option("chunk", "cells per matching chunk (even, >= 2)", "--kv-chunk")
    sinks: int = _option("n_sink", "first tokens never merged", "--kv-sinks")
    recent: int = _option("n_recent", "last tokens never merged", "--kv-recent")
    recent_share: float = _option("recent_share", "keep this share of the cells a compression leaves as the newest "
                                  "tokens, exact, in [0, 1): the recent window is max(recent, recent_share x cells "
                                  "kept)", "--kv-recent-share")
    interval: int = _option("interval", "g: while generating, compress once a sequence exceeds its budget by this "
                            "many cells", "--kv-interval")
    max_passes: int = _option("max_passes", "merging passes per compression, at most")
    pass_fraction: float = _option("pass_fraction", "share of candidate cells one pass may merge, in (0, 1]: the "
                                   "most similar pairs go first")
    bias: bool = _option("log_bias", "proportional attention: add log(cluster size) to attention logits",
                         "--kv-no-bias", "do not add log(cluster size) to attention logits")
    match_values: bool = _option("match_values", "pair cells by keys and values (off: by keys alone, as the paper)",
                                 "--kv-match-keys", "pair cells by key similarity alone, as the paper "
                                 "(default: by keys and values)")
    random_pairs: bool = _option("random_pairs", "benchmark baseline: merge seeded random pairs instead of the most "
                                 "similar ones")
    seed: int = _option("seed", "seed of random_pairs")
    distinct_weight: float = _option("distinct_weight", "merge distinctive cells last: lowers a pair's score by this "
                                     "times (1 - cos(key, the head's mean key))/2 of its more distinctive cell; 0: off",
                                     "--kv-distinct-weight")
    size_weight: float = _option("size_weight", "above 0, spread merges: lowers a pair's score by this times "
                                 "tanh(log size) of its A cell; below 0, gather them: raises it by -this times "
                                 "tanh(log size) of its larger cell, so that more cells stay exact; 0: off",
                                 "--kv-size-weight")
    value_weight: float = _option("value_weight", "keep values apart: lowers a pair's score by this times "
                                  "(1 - cos(value of A, value of B))/2; 0: off", "--kv-value-weight")
    attn_weight: float = _option("attn_weight", "keep what the prompt asks for: lowers a pair's score by this times "
                                 "tanh(a/4) of its more attended cell, a = the attention the prompt's last queries "
                                 "pay it in uniform shares; 0: off", "--kv-attn-weight")
    attn_window: int = _option("attn_window", "the last queries of each prompt chunk that attn_weight reads",
                               "--kv-attn-window")
    lookahead: bool = _option("lookahead", "with attn_weight, read a long prompt's last attn_window tokens first, and "
                              "again after the text fed so far before chunks that merge, so that merging while the "
                              "prompt is fed keeps what its end asks for",
                              "--kv-no-lookahead", "merge while a prompt is fed without reading its end first")
    attn_top: float = _option("attn_top", "with attn_weight, when the prompt's own end scores a compression, only the "
                              "attn_top x R x (mergeable cells) cells each head attends most keep their score, so "
                              "that a document read before its questions keeps its distinctive cells; in [0, 1], "
                              "0: every cell keeps it", "--kv-attn-top")

    def validated(self, label: Callable[["OptionSpec"], str] | None = None) -> "ClusterOptions":
        """Self if every option is valid, else ValueError naming the option as `label` calls it (default: its
        Llama keyword) and the value. The ranges are the C library's rules."""
        name_of = label or (lambda o: o.keyword)
        for o in OPTIONS:
            _check_c_type(name_of(o), o, getattr(self, o.name))
        problem = _c_check(self.to_native())
        if problem:
            raise ValueError(_named(problem, name_of))
        return self

    def physical_cells(self, n_ctx: int, n_batch: int, n_swa: int = 0, n_ubatch: int | None = None) -> int:
        """KV cells to allocate for a logical context of n_ctx tokens: the budget at a full context plus
        room for whichever is larger, the interval of slack while generating or one batch of the prompt
        (the cache compresses to budget before a batch or a token that would not fit, so a full interval never
        needs a cell more), never more than the full cache. A model with an n_swa-token sliding window gets at
        least window + ubatch cells: llama.cpp sizes its window cache (never clustered) as min(cells, window +
        ubatch), and a smaller one cannot take the next batch beside the window it must keep."""
        budget = max(math.ceil(self.ratio * n_ctx), self.sinks + self.recent + 2)
        return max(min(n_ctx, budget + max(self.interval, n_batch)), window_cells(n_ctx, n_swa, n_ubatch or n_batch))

    def to_native(self) -> Any:
        """The options as a ``struct chelsea_kv_cluster_params`` (call validated() first: cffi refuses values
        outside the C types)."""
        p = lib.chelsea_kv_cluster_default_params()
        for o in OPTIONS:
            setattr(p, o.c_name, getattr(self, o.name))
        return p


def window_cells(n_ctx: int, n_swa: int, n_ubatch: int) -> int:
    """The fewest cells a clustered context of a model with an n_swa-token sliding window may have (0: none)."""
    return min(n_ctx, n_swa + n_ubatch) if n_swa > 0 else 0


@dataclass(frozen=True)
class OptionSpec:
    """One clustering option as the ClusterOptions field declares it."""

    name: str          # the ClusterOptions field
    c_name: str        # its field in struct chelsea_kv_cluster_params
    doc: str
    default: Any       # the C library's
    flag: str | None   # chelsea-run / chelsea-server flag, if any
    flag_help: str | None

    @property
    def keyword(self) -> str:
        """The Llama keyword, kv_cluster_<name>."""
        return KEYWORD_PREFIX + self.name

    @property
    def c_type(self) -> str:
        return _C_TYPES[self.c_name]


OPTIONS: tuple[OptionSpec, ...] = tuple(
    OptionSpec(name=f.name, c_name=f.metadata["c_name"], doc=f.metadata["doc"], default=f.default,
               flag=f.metadata["flag"], flag_help=f.metadata["flag_help"])
    for f in dataclasses.fields(ClusterOptions))
_BY_C_NAME = {o.c_name: o for o in OPTIONS}

# Llama's kv_cluster_* keywords and the ClusterOptions fields they set
KEYWORD_FIELDS: dict[str, str] = {o.keyword: o.name for o in OPTIONS}


def _check_c_type(label: str, option: OptionSpec, value: Any) -> None:
    """What C cannot check once the value is converted: its Python type, and an integer's C range."""
    if option.c_type == "_Bool":
        if not isinstance(value, bool):
            raise ValueError(f"{label}: expected a bool, got {value!r}")
    elif option.c_type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{label}: expected a number, got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label}: expected an integer, got {value!r}")
        lo, hi = _C_INT_RANGES[option.c_type]
        if not lo <= value <= hi:
            raise ValueError(f"{label}: {value} is out of range ({lo} .. {hi})")


def _c_check(params: Any) -> str:
    """The C library's verdict on params: "" if valid, else its message (starting with the C field's name)."""
    err = ffi.new("char[]", 512)
    if lib.chelsea_kv_cluster_params_check(ffi.new("struct chelsea_kv_cluster_params *", params), err, 512) != 0:
        return ffi.string(err).decode()
    return ""


def _named(message: str, label: Callable[[OptionSpec], str]) -> str:
    """A C message starting with a C field name ("n_recent: -4 is ...") with the option's name in its place."""
    m = re.match(r"\w+", message)
    option = _BY_C_NAME.get(m.group(0)) if m else None
    return label(option) + message[m.end():] if option and m else f"kv_cluster: {message}"


def default_options() -> ClusterOptions:
    """The C library's defaults."""
    return ClusterOptions()


def keywords_doc() -> str:
    """The kv_cluster_* keywords, their defaults and meanings, one a line (for docstrings and help)."""
    return "\n".join(f"{o.keyword} (default {o.default}): {o.doc}" for o in OPTIONS)


ClusterOptions.__doc__ = f"{ClusterOptions.__doc__}\n\n" + "\n".join(
    f"{o.name} (default {o.default}, C {o.c_name}): {o.doc}" for o in OPTIONS)


def options_from_keywords(keywords: Mapping[str, Any],
                          label: Callable[[OptionSpec], str] | None = None) -> ClusterOptions:
    """The C library's defaults, overridden by the kv_cluster_* keywords given (None keeps the default);
    TypeError for an unknown keyword, ValueError naming the option (as `label` calls it) for a bad value."""
    unknown = sorted(set(keywords) - set(KEYWORD_FIELDS))
    if unknown:
        raise TypeError(f"unknown keyword(s): {', '.join(unknown)} "
                        f"(the KV-cluster keywords are: {', '.join(KEYWORD_FIELDS)})")
    chosen = {KEYWORD_FIELDS[k]: v for k, v in keywords.items() if v is not None}
    return dataclasses.replace(default_options(), **chosen).validated(label)


def options_for(kv_cluster: Any, keywords: Mapping[str, Any]) -> ClusterOptions | None:
    """What ``kv_cluster=..., kv_cluster_*=...`` ask for: None with clustering off (the keywords are checked
    either way)."""
    if not isinstance(kv_cluster, bool):
        raise ValueError(f"kv_cluster: expected a bool, got {kv_cluster!r}")
    options = options_from_keywords(keywords)
    return options if kv_cluster else None


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


def kv_cluster_stats(ctx: Any, options: ClusterOptions | None) -> dict[str, Any]:
    """Clustering of sequence 0: tokens represented, cells, passes, compressions, time_ms, compression (tokens per
    cell), nonfinite (cache slices holding NaN/Inf that compression found: the model's output is broken) and the
    real KV allocation in MiB (kv_mib). Raises if clustering is off (options None)."""
    require_clustering(options)
    stats = read_stats(ctx, 0).as_dict()
    stats["kv_mib"] = read_kv_stats(ctx, 0).kv_mib
    return stats


def require_clustering(options: ClusterOptions | None) -> None:
    if options is None:
        raise RuntimeError("kv_cluster is off for this Llama")


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
