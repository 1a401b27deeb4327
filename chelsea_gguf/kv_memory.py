"""KV memory budgets: how many bytes a context's KV cache allocates, and the clustering ratio that fits a budget.

The bytes are measured, not modelled: two small probe contexts of the same model and settings are created and their
K/V (and cluster-size) buffers read back, which gives the allocation as ``fixed + per_cell * cells``. The fixed part
is what does not grow with the context (the sliding-window cache of models such as Gemma 3); llama.cpp allocates
cells in multiples of 256.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.cluster import ClusterOptions, enable
from chelsea_gguf.kv import MIB, read_kv_stats

CELL_PAD = 256  # llama.cpp pads a context's cells to this

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:([kKmMgGtT])(i?)[bB]?|([bB]))?\s*$")
_UNITS = "kmgt"


def parse_memory_size(value: Any, option: str) -> int:
    """``512M``, ``2G``, ``2GiB``, ``1.5G`` or a byte count -> bytes. K/M/G/T and KiB/MiB/GiB/TiB are powers of
    1024, as llama.cpp's tools count memory; KB/MB/GB/TB are powers of 1000."""
    if isinstance(value, bool):
        raise ValueError(f"{option}: expected a size such as 512M or 2G, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError(f"{option}: cannot parse {value!r}; expected a size such as 512M, 2G or 2GiB")
        number, unit, binary, _ = m.groups()
        decimal = unit is not None and not binary and str(value).strip()[-1] in "bB"
        base = 1000 if decimal else 1024
        n = int(float(number) * base ** (_UNITS.index(unit.lower()) + 1 if unit else 0))
    if n <= 0:
        raise ValueError(f"{option}: {value!r} is not a positive size")
    return n


def padded_cells(n_cells: int) -> int:
    return -(-n_cells // CELL_PAD) * CELL_PAD


@dataclass(frozen=True)
class KVLayout:
    """A context's KV allocation as a function of the cells it is created with (bytes, measured)."""

    fixed_bytes: int        # what does not grow with the cells (a sliding-window cache)
    per_cell_bytes: float   # K and V of every layer
    cluster_per_cell_bytes: float  # the cluster sizes and log sizes clustering keeps beside them
    swa_cells: int          # below this many cells the fixed part shrinks too: the estimate is then an upper bound
    cluster_fixed_bytes: int = 0  # what clustering adds whatever the cells: the prompt queries of the attention score

    def bytes(self, n_cells: int, clustered: bool) -> int:
        per_cell = self.per_cell_bytes + (self.cluster_per_cell_bytes if clustered else 0.0)
        fixed = self.fixed_bytes + (self.cluster_fixed_bytes if clustered else 0)
        return fixed + round(per_cell * padded_cells(n_cells))

    def max_cells(self, budget: int, clustered: bool) -> int:
        """The most cells (a multiple of 256) whose allocation fits `budget` bytes; 0 if none does."""
        per_cell = self.per_cell_bytes + (self.cluster_per_cell_bytes if clustered else 0.0)
        fixed = self.fixed_bytes + (self.cluster_fixed_bytes if clustered else 0)
        n = int((budget - fixed) / per_cell) // CELL_PAD * CELL_PAD
        while n > 0 and self.bytes(n, clustered) > budget:
            n -= CELL_PAD
        return max(n, 0)


def _probe(model: Any, cparams: Any, n_cells: int) -> tuple[int, int]:
    """The KV bytes of a context of n_cells cells with these settings: plain, then with clustering on."""
    owner = ffi.new("struct llama_context_params *", cparams)  # a copy, alive while p is used
    p = owner[0]
    p.n_ctx = n_cells
    p.n_batch = min(p.n_batch, n_cells)
    p.n_ubatch = min(p.n_ubatch, p.n_batch)
    ctx = lib.llama_init_from_model(model, p)
    if ctx == ffi.NULL:
        raise ValueError(f"could not create a {n_cells}-cell probe context to measure the KV memory")
    try:
        plain = read_kv_stats(ctx).buffer_bytes
        enable(ctx, ClusterOptions())
        return plain, read_kv_stats(ctx).buffer_bytes
    finally:
        lib.llama_free(ctx)


def measure_kv_layout(model: Any, cparams: Any) -> KVLayout:
    """Measures the layout with two probe contexts past the sliding window, where the allocation grows linearly."""
    swa_cells = padded_cells(max(int(lib.llama_model_n_swa(model)), 0) * max(int(cparams.n_seq_max), 1)
                             + int(cparams.n_ubatch))
    a = max(4 * CELL_PAD, swa_cells + CELL_PAD)
    b = a + 4 * CELL_PAD
    plain_a, clustered_a = _probe(model, cparams, a)
    plain_b, clustered_b = _probe(model, cparams, b)
    per_cell = (plain_b - plain_a) / (b - a)
    cluster_per_cell = ((clustered_b - clustered_a) - (plain_b - plain_a)) / (b - a)
    return KVLayout(fixed_bytes=round(plain_a - per_cell * a), per_cell_bytes=per_cell,
                    cluster_per_cell_bytes=cluster_per_cell, swa_cells=swa_cells,
                    cluster_fixed_bytes=round(clustered_a - plain_a - cluster_per_cell * a))


@dataclass(frozen=True)
class KVMemoryPlan:
    """The ratio a KV memory budget allows for a logical context, and what it allocates; ratio 1: the full cache
    fits, and is used (no clustering)."""

    budget_bytes: int
    ratio: float
    n_cells: int          # cells Llama asks for (llama.cpp pads them to 256)
    kv_bytes: int         # the allocation at that ratio
    full_bytes: int       # the full cache's at the same context


def plan_for_budget(layout: KVLayout, budget: int, n_ctx: int, n_batch: int, options: ClusterOptions,
                    option: str = "kv_cluster_memory", min_cells: int = 0) -> KVMemoryPlan:
    """The largest ratio (4 decimals) whose allocation fits `budget` bytes for a logical context of n_ctx tokens, 1
    if the full cache fits; ValueError with the numbers if even the cells clustering always keeps (and
    `min_cells`, a sliding-window model's floor) do not fit."""
    full = layout.bytes(n_ctx, clustered=False)
    batch = min(n_batch, n_ctx)
    if full <= budget:  # exact, and smaller than clustering at ratio 1 (no cluster sizes)
        return KVMemoryPlan(budget_bytes=budget, ratio=1.0, n_cells=n_ctx, kv_bytes=full, full_bytes=full)
    slack = max(options.interval, batch)
    floor = options.sinks + options.recent + 2
    max_cells = layout.max_cells(budget, clustered=True)
    room = max_cells - slack
    if room < floor or max_cells < min_cells:
        least = layout.bytes(max(floor + slack, min_cells), clustered=True)
        window = f"; at least {min_cells} cells beside the sliding window" if min_cells > floor + slack else ""
        raise ValueError(
            f"{option}: {budget / MIB:.1f} MiB cannot hold a clustered KV cache for {n_ctx} tokens: the cells "
            f"it always keeps ({options.sinks} sinks + {options.recent} recent + 2, and {slack} for a batch "
            f"of the prompt{window}) take {least / MIB:.1f} MiB (the full cache: {full / MIB:.1f} MiB)")
    ratio = math.floor(room / n_ctx * 1e4) / 1e4
    while ratio > 0 and layout.bytes(_cells(options, ratio, n_ctx, batch, min_cells), clustered=True) > budget:
        ratio = round(ratio - 1e-4, 4)
    if ratio <= 0:
        raise ValueError(f"{option}: {budget / MIB:.1f} MiB leaves a ratio below 0.0001 for {n_ctx} tokens; "
                         f"give a larger budget or a shorter context")
    n_cells = _cells(options, ratio, n_ctx, batch, min_cells)
    return KVMemoryPlan(budget_bytes=budget, ratio=ratio, n_cells=n_cells,
                        kv_bytes=layout.bytes(n_cells, clustered=True), full_bytes=full)


def _cells(options: ClusterOptions, ratio: float, n_ctx: int, n_batch: int, min_cells: int) -> int:
    return max(replace(options, ratio=ratio).physical_cells(n_ctx, n_batch), min_cells)
